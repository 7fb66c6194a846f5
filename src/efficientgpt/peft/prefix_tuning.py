"""Prefix tuning (Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021).

A frozen LM is steered by a *prefix* of ``n`` virtual tokens whose activations are free parameters in
every layer (paper §4.2, Eq. 3): with prefix indices ``P_idx``, ``h_i = P_θ[i, :]`` for ``i ∈ P_idx``
and ``h_i = LM_φ(z_i, h_<i)`` otherwise. In a decoder-only LM the only activations of the prefix that the
real tokens read are its attention keys and values, so (as in the official code) ``P_θ`` holds, per virtual token, a key and a
value vector for each layer: ``P_θ ∈ R^{n x (L·2·kv_dim)}``, ``kv_dim = kv_heads · head_dim``.

Optimising ``P_θ`` directly is unstable (§4.3), so it is reparametrised by a smaller matrix ``P'_θ``
(``n x d``) and an MLP (Eq. 5)::

    P_θ[i, :] = MLP_θ(P'_θ[i, :]) = W2 · tanh(W1 · P'_θ[i, :] + b1) + b2,    W1 ∈ R^{h x d}, W2 ∈ R^{(L·2·kv_dim) x h}

After training only ``P_θ`` is needed: :meth:`PrefixTuningDelta.prepare_for_saving` (called by
``save_delta``) folds the MLP away, storing ``P_θ`` itself (``n·L·2·kv_dim`` numbers) and setting
``config.folded`` so the saved delta loads back as the folded structure.

The prefix reaches the model as a pre-filled KV cache (:mod:`efficientgpt.peft.kv_prefix`): real tokens
sit at positions ``n .. n+T-1`` and attend to the prefix like to cached past tokens.

``layers`` restricts the prefix to some decoder layers (as the design-space methods of Chen et al., ICLR
2023, assign prefix tuning to groups of layers): ``P_θ`` then holds keys and values for those layers only
(``n x (|layers|·2·kv_dim)``). Every layer's cache must hold the same number of tokens, so the other layers
get ``n`` zero slots that their attention masks out exactly (:func:`kv_prefix.hide_virtual_tokens`, a
pre-hook on those layers' attention modules): they attend to no prefix. The real tokens still take
positions ``n ..`` in every layer (a model has one position sequence): on rotary models that is invisible
(attention sees relative positions only), so a layer before the first prefixed one computes exactly what
it computes without the prefix; on absolute-position models (GPT-2, OPT) the shift reaches every layer,
as it does with a prefix on all layers. This needs a 4-D attention mask, i.e. ``eager`` or ``sdpa``
attention; other implementations are refused at attach.

Departures from the paper and its code:

* The paper used GPT-2 and BART. On rotary-position models (Llama, Qwen2, GPT-NeoX) the prefix keys
  enter the cache as they are, unrotated (as in HF PEFT): every virtual token acts as a key at position 0,
  while the real tokens sit at ``n ..``. Grouped-query models get prefixes for their ``kv_heads`` only.
* ``P'_θ`` is ``n x d`` with ``d`` the model width and ``h`` defaults to 512, as in the official code
  (``n_embd``, ``mid_dim``); ``P'_θ ~ N(0, 1)`` like the code's ``nn.Embedding``. Without the
  reparametrisation (``reparam=False``) ``P_θ`` starts from ``MLP(P'_θ)`` of a fresh MLP, i.e. from the
  same distribution as with it (the code draws ``N(0, 1)`` there).
* The paper's initialisation from the activations of real words (§7.4) is not offered.
* ``dropout`` is applied to the prefix keys and values in training, as the code's ``prefix_dropout``.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from efficientgpt import registry
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.peft import core
from efficientgpt.peft.kv_prefix import KVPrefixDelta, hide_virtual_tokens


@dataclasses.dataclass
class PrefixTuningConfig(ConfigBase):
    """Prefix-tuning hyperparameters (Li & Liang, 2021)."""

    num_virtual_tokens: int = field(10, "prefix length n (the paper uses 10 for table-to-text, 200 for "
                                        "summarization)", minimum=1)
    reparam: bool = field(True, "train P = MLP(P') (paper §4.3) instead of P directly")
    hidden: int = field(512, "hidden width h of the reparametrisation MLP", minimum=1)
    dropout: float = field(0.0, "dropout on the prefix keys and values in training", minimum=0.0, maximum=1.0)
    folded: bool = field(False, "the MLP has been folded into P (set when a delta is saved)", cli=False)
    layers: list[int] | None = field(None, "only these decoder layers get a prefix; the others attend to none "
                                           "(default: all)")

    def validate(self) -> None:
        super().validate()
        if self.dropout >= 1.0:
            raise ConfigError(f"PrefixTuningConfig.dropout = {self.dropout} must be < 1")
        if self.layers is not None:
            try:
                self.layers = [int(x) for x in self.layers]
            except (TypeError, ValueError):
                raise ConfigError(f"PrefixTuningConfig.layers = {self.layers!r} must be a list of layer indices") from None
            if not self.layers:
                raise ConfigError("PrefixTuningConfig.layers is empty; give at least one layer, or none for all layers")

    @property
    def direct(self) -> bool:
        """Whether ``P`` is itself the parameter (no MLP: never reparametrised, or folded)."""
        return not self.reparam or self.folded


class ReparamPrefix(nn.Module):
    """``P = MLP(P')`` (Eq. 5): ``P'`` (n x d), ``Linear(d, h) -> tanh -> Linear(h, L·2·kv_dim)``."""

    def __init__(self, n: int, d: int, hidden: int, width: int):
        super().__init__()
        self.P_prime = nn.Parameter(torch.randn(n, d))
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, width))

    def forward(self) -> torch.Tensor:
        return self.mlp(self.P_prime)  # (n, L·2·kv_dim)


class DirectPrefix(nn.Module):
    """``P`` itself (n x L·2·kv_dim): the folded form, or training without reparametrisation."""

    def __init__(self, P: torch.Tensor):
        super().__init__()
        self.P = nn.Parameter(P)

    def forward(self) -> torch.Tensor:
        return self.P


class PrefixTuningDelta(KVPrefixDelta):
    method = "prefix_tuning"
    mergeable = False

    def build(self) -> None:
        cfg: PrefixTuningConfig = self.config
        try:
            self.layers = arch.num_layers(self.model)
        except UserError:
            self.layers = self.model.config.num_hidden_layers
        self.selected = self._selected_layers()
        _, self.kv_heads, self.head_dim = arch.head_dims(self.model)
        d = self.model.config.hidden_size
        width = len(self.selected) * 2 * self.kv_heads * self.head_dim
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        reparam = ReparamPrefix(cfg.num_virtual_tokens, d, cfg.hidden, width)
        if cfg.direct:
            with torch.no_grad():
                self.modules["prefix"] = DirectPrefix(reparam().to(dtype))
        else:
            self.modules["prefix"] = reparam.to(dtype)
        for layer in range(self.layers):
            if layer not in self.selected:
                self._add_hook(arch.block_module(self.model, layer, "attn"), "pre_kwargs", self._hide_in(layer))

    def _selected_layers(self) -> list[int]:
        """The layers with a prefix (all, or ``config.layers`` checked against the model)."""
        cfg: PrefixTuningConfig = self.config
        if cfg.layers is None:
            return list(range(self.layers))
        bad = [i for i in cfg.layers if not -self.layers <= i < self.layers]
        if bad:
            raise ConfigError(f"PrefixTuningConfig.layers {bad} out of range: the model has {self.layers} layers "
                              f"(0..{self.layers - 1})")
        selected = sorted({i % self.layers for i in cfg.layers})
        impl = getattr(self.model.config, "_attn_implementation", None) or "eager"
        if len(selected) < self.layers and impl not in ("eager", "sdpa"):
            raise UserError(f"prefix tuning on some layers only masks the prefix out of the others' attention, which "
                            f"needs eager or sdpa attention; this model uses {impl!r} (load it with "
                            "attn_implementation='sdpa')")
        return selected

    def _hide_in(self, layer: int):
        """Pre-hook on the attention of a layer without a prefix: mask this delta's slots out there."""
        names = [n for n, p in inspect.signature(arch.block_module(self.model, layer, "attn").forward).parameters
                 .items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

        def hook(mod, args, kwargs):
            if not self.enabled:
                return None
            kwargs = {**kwargs, **dict(zip(names, args))}  # the attention's inputs by name
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, q, d)
            additive = getattr(self.model.config, "_attn_implementation", None) == "eager"
            return (), hide_virtual_tokens(kwargs, self.name, hidden, layer, additive)

        return hook

    def prefix(self) -> torch.Tensor:
        """``P_θ``: (n, |layers|·2·kv_dim), laid out per token as ``[layer][key|value][kv_head][head_dim]``
        (the official code's and HF PEFT's layout)."""
        return self.modules["prefix"]()

    def extend_cache(self, cache, batch_size: int):
        P = self.prefix()
        kv = P.view(self.n, len(self.selected) * 2, self.kv_heads, self.head_dim)  # (n, |layers|·2, kvh, hd)
        kv = kv.permute(1, 2, 0, 3)  # (|layers|·2, kvh, n, hd)
        kv = nn.functional.dropout(kv, self.config.dropout, training=self.model.training)
        cache = cache if cache is not None else self.new_cache()
        slot = {layer: j for j, layer in enumerate(self.selected)}
        for layer in range(self.layers):
            if layer in slot:
                k = kv[2 * slot[layer]].unsqueeze(0).expand(batch_size, -1, -1, -1)  # (B, kvh, n, hd)
                v = kv[2 * slot[layer] + 1].unsqueeze(0).expand(batch_size, -1, -1, -1)  # (B, kvh, n, hd)
            else:  # a placeholder the layer's attention masks out (_hide_in)
                k = v = kv.new_zeros(batch_size, self.kv_heads, self.n, self.head_dim)  # (B, kvh, n, hd)
            cache.update(k, v, layer)
        return cache

    def prepare_for_saving(self) -> None:
        """Fold the reparametrisation: keep ``P = MLP(P')`` as the parameter and drop ``P'`` and the MLP.

        Training after this continues on ``P`` directly (an optimizer built before must be rebuilt).
        """
        if self.config.direct:
            return
        with torch.no_grad():
            P = self.prefix().detach().clone()  # (n, L·2·kv_dim)
        folded = DirectPrefix(P)
        folded.P.requires_grad_(self.active)
        self.modules["prefix"] = folded
        self.config = dataclasses.replace(self.config, folded=True)


def apply(model, config: PrefixTuningConfig, name: str = "default") -> PrefixTuningDelta:
    return core.apply(model, PrefixTuningDelta, config, name)


SPEC = registry.register(registry.MethodSpec(
    name="prefix_tuning", family="peft", config_cls=PrefixTuningConfig, apply=apply, paper="prefix-tuning",
    summary="learned keys and values of n virtual tokens in every layer, P = MLP(P') in training "
            "(Li & Liang, ACL 2021)",
    mergeable=False,
))
