"""LLaMA-Adapter: zero-initialised attention over learnable adaption prompts.

Zhang, Han, Liu, Gao, Zhou, Hu, Yan, Lu, Li & Qiao, "LLaMA-Adapter: Efficient Fine-tuning of Language
Models with Zero-init Attention" (arXiv 2303.16199, 2023; ICLR 2024 as "... of Large Language Models
with Zero-initialized Attention"). Official code: github.com/OpenGVLab/LLaMA-Adapter.

Each of the top ``L`` decoder layers gets a learnable adaption prompt ``P_l ∈ R^{K x C}`` (§3.1;
``K = adapter_len``, ``L = adapter_layers``, ``C`` the hidden size). In such a layer a token ``t_l``
attends to the prompt through the layer's own frozen projections (§3.2)::

    Q_l = Linear_q(t_l),   K_l = Linear_k([P_l; T_l; t_l]),   V_l = Linear_v([P_l; T_l; t_l])
    S_l = Q_l K_l^T / √C = [S_l^K ; S_l^{M+1}]^T                                       (Eq. 6)
    S_l^g = [softmax(S_l^K) · g_l ; softmax(S_l^{M+1})]^T                              (Eq. 7)
    t_l^o = Linear_o(S_l^g V_l)                                                        (Eq. 8)

(equation numbers of arXiv v1, §3.2). The scores over the ``K`` prompt tokens and over the ``M + 1``
word tokens are softmaxed *separately*, and the prompt part is scaled by a gating factor ``g_l`` that
starts at zero, so the model is exactly unchanged at initialisation. Per head, this is the frozen
attention output plus a gated prompt branch::

    head_h = softmax(q_h K_h^T / √d_h + mask) V_h  +  tanh(g_{l,h}) · softmax(q_h (P_l W_k,h)^T / √d_h) (P_l W_v,h)

which is how it is implemented: the frozen attention runs untouched, and a forward pre-hook on the
output projection (role ``o``) adds the gated prompt branch to its input, i.e. to the concatenated
per-head outputs, *before* ``Linear_o`` as in Eq. 8. The hook needs the layer's queries: a forward hook
on the q projection (the q slice of GPT-2's ``c_attn`` / GPT-NeoX's ``query_key_value``,
:attr:`~efficientgpt.models.arch.Target.out_index`) keeps them, and on rotary models a forward
pre-hook on the attention module keeps the ``(cos, sin)`` position embeddings it is called with. The
prompt's keys and values come from calling the layer's k and v projections (the k and v slices of a
fused one) on ``P_l``: the modules themselves, so another delta on them (LoRA on ``v``) acts on the
prompt's values as on the words'.

Following the official code (``alpaca_finetuning_v1/llama/model.py``, the training code):

* one gate per head, ``gate`` of shape ``(1, heads, 1, 1)``, applied as ``gate.tanh()``;
* the prompts are an ``nn.Embedding``, so ``P_l ~ N(0, 1)``, fed to ``wk``/``wv`` without the block's
  normalisation;
* the queries are the *rotated* ``xq`` while the prompt keys get no rotary embedding: the prompt has
  no position. The same is done here for Llama, Qwen2 and GPT-NeoX (``transformers``'
  ``apply_rotary_pos_emb`` semantics; GPT-NeoX rotates only the first ``rotary_pct · head_dim``
  features, read from the width of its ``cos``), and GQA models (``num_key_value_heads < heads``)
  share each prompt key/value head among its group of query heads, as their word keys are shared.

Because the prompts take no position, ``adapter_len`` is not bounded by the model's context length.

``peft_compatible=True`` computes what Hugging Face PEFT's ``AdaptionPromptConfig`` computes
(``peft/tuners/adaption_prompt/layer.py``): one gate per *layer* (shape ``(1,)``), used as is, without
``tanh``; rotated queries against unrotated prompt keys, as above. PEFT adds ``o_proj(branch)`` to the
attention output after ``o_proj``; for a bias-free ``o_proj`` (Llama, Mistral: the families PEFT
supports with an output projection) that equals adding the branch before it, which is what this module
does. On GPT-2, PEFT adds the branch to ``c_proj``'s output without projecting it; that is not
reproduced here (the branch always goes through the output projection, as in Eq. 8).

Departures from the paper and the official code:

* The official inference code (``llama/model.py``) applies the raw gate without ``tanh``; its training
  code applies ``tanh``. The training code is followed.
* The paper's ``√C`` is the per-head width ``√d_h`` in the multi-head code; GPT-2's optional
  ``scale_attn_by_inverse_layer_idx`` is not applied to the prompt branch (it is off by default).
* The official code runs the prompt branch in fp16 (``gate.tanh().half()``); here it runs in the
  model's dtype with the prompt softmax in fp32.
* Attention modules with a query/key normalisation (Qwen3's ``q_norm``/``k_norm``) are refused at
  attach time: the captured q projection output would miss the normalisation.

Not mergeable: the prompt branch is a separate softmax attention, not a weight update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from efficientgpt import registry
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.peft import core

#: Families whose attention applies a rotary embedding to q and k (from ``position_embeddings``).
ROTARY_FAMILIES = ("llama", "gpt_neox")


@dataclasses.dataclass
class LlamaAdapterConfig(ConfigBase):
    """LLaMA-Adapter hyperparameters (Zhang et al., ICLR 2024)."""

    adapter_len: int = field(10, "prompt length K: learnable prompt tokens per adapted layer (the paper uses "
                                 "10); not limited by the context length, the prompts take no position",
                             minimum=1)
    adapter_layers: int | None = field(None, "number L of top decoder layers that get a prompt (the paper uses "
                                             "30 of LLaMA-7B's 32); default: all layers", minimum=1)
    peft_compatible: bool = field(False, "compute what HF PEFT's AdaptionPrompt computes: one gate per layer, "
                                         "no tanh (default: one tanh-gate per head, as in the official code)")

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.adapter_layers is not None and (not isinstance(self.adapter_layers, int)
                                                or isinstance(self.adapter_layers, bool)):
            raise ConfigError(f"{name}.adapter_layers must be an integer >= 1, got {self.adapter_layers!r}")

    def layers_for(self, num_layers: int) -> list[int]:
        """Indices of the adapted (topmost ``L``) decoder layers of a ``num_layers``-layer model."""
        n = num_layers if self.adapter_layers is None else self.adapter_layers
        if not 1 <= n <= num_layers:
            raise ConfigError(f"{type(self).__name__}.adapter_layers = {n} is out of range for this model: it has "
                              f"{num_layers} decoder layers; choose 1..{num_layers}")
        return list(range(num_layers - n, num_layers))


class AdaptionPrompt(nn.Module):
    """One layer's adaption prompt ``P_l`` (K x C) and its zero-initialised gate ``g_l``."""

    def __init__(self, adapter_len: int, hidden: int, gates: int):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(adapter_len, hidden))  # N(0, 1), as the official nn.Embedding
        self.gate = nn.Parameter(torch.zeros(gates))  # one per head (or one per layer with peft_compatible)


@dataclasses.dataclass
class _Layer:
    """The modules of one adapted layer and what its hooks pass along during a forward."""

    index: int
    key: str
    q: arch.Target
    k: arch.Target
    v: arch.Target
    o: arch.Target
    attn: nn.Module
    queries: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``q`` (B, heads, T, d_h) with ``cos``/``sin`` (B, T, r); only the first ``r`` features
    when ``r < d_h`` (GPT-NeoX's partial rotary), as ``transformers``' ``apply_rotary_pos_emb``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, r)
    r = cos.shape[-1]
    q_rot, q_pass = q[..., :r], q[..., r:]
    return torch.cat(((q_rot * cos) + (rotate_half(q_rot) * sin), q_pass), dim=-1)


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The gated prompt branch ``gate · softmax(q k^T / √d_h) v`` (Eq. 7, prompt part).

    ``q`` (B, heads, T, d_h); ``k``, ``v`` (heads, K, d_h); ``gate`` broadcastable to (1, heads, 1, 1).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, heads, T, K)
    probs = F.softmax(scores.float(), dim=-1).to(q.dtype)  # its own softmax, apart from the word tokens'
    return torch.matmul(gate * probs, v)  # (B, heads, T, d_h)


class LlamaAdapterDelta(core.Delta):
    method = "llama_adapter"
    mergeable = False

    def attach(self) -> None:
        cfg: LlamaAdapterConfig = self.config
        model = self.model
        fam = arch.family_of(model)
        self._rotary = fam.name in ROTARY_FAMILIES
        self._heads, self._kv_heads, self._head_dim = arch.head_dims(model)
        hidden = model.config.hidden_size
        layers = cfg.layers_for(arch.num_layers(model))
        self._layers: dict[int, _Layer] = {}
        self._prompt_pass = False
        for i in layers:
            attn = arch.block_module(model, i, "attn")
            norms = [n for n in ("q_norm", "k_norm") if getattr(attn, n, None) is not None]
            if norms:
                raise UserError(
                    f"llama_adapter does not support {model.config.model_type!r}: its attention normalises the "
                    f"queries and keys ({', '.join(norms)}) after the projections, which the prompt branch "
                    "does not reproduce; supported: gpt2, llama, mistral, qwen2, opt, gpt_neox")
            by_role = {t.role: t for t in arch.resolve(model, ["q", "k", "v", "o"], layers=[i])}
            layer = _Layer(index=i, key=core.target_key(f"{fam.blocks}.{i}"), q=by_role["q"], k=by_role["k"],
                           v=by_role["v"], o=by_role["o"], attn=attn)
            ref = arch.linear_weight(layer.q.module)
            gates = 1 if cfg.peft_compatible else self._heads
            self.modules[layer.key] = AdaptionPrompt(cfg.adapter_len, hidden, gates).to(dtype=ref.dtype)
            self._layers[i] = layer
        for layer in self._layers.values():
            self.hook_output(layer.q.module, self._keep_queries(layer))
            if self._rotary:
                self._add_hook(layer.attn, "pre_kwargs", self._keep_positions(layer))
            self.hook_input(layer.o.module, self._add_prompt_branch(layer))

    def targets(self) -> list[str]:
        return sorted({t.name for layer in self._layers.values() for t in (layer.q, layer.k, layer.v, layer.o)})

    @contextlib.contextmanager
    def _computing_prompt(self) -> Iterator[None]:
        # The prompt goes through the (possibly fused) projections too; their query hook must skip it.
        self._prompt_pass = True
        try:
            yield
        finally:
            self._prompt_pass = False

    def _keep_queries(self, layer: _Layer):
        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            if not self._prompt_pass:
                idx = layer.q.out_index
                layer.queries = out if idx is None else out.index_select(-1, idx.to(out.device))  # (B, T, h·d_h)
            return out

        return fn

    def _keep_positions(self, layer: _Layer):
        def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]):
            if self.enabled:
                layer.position_embeddings = kwargs.get("position_embeddings")
            return None

        return hook

    def gate(self, layer_index: int) -> torch.Tensor:
        """The factor on layer ``layer_index``'s prompt attention, shaped to broadcast over (B, heads, T, K)."""
        g = self.modules[self._layers[layer_index].key].gate
        if self.config.peft_compatible:
            return g.view(1, 1, 1, 1)
        return torch.tanh(g).view(1, -1, 1, 1)

    def prompt_keys_values(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``P_l W_k`` and ``P_l W_v`` through the layer's frozen projections: each (heads, K, d_h), a
        key/value head repeated for every query head of its group under GQA."""
        layer = self._layers[layer_index]
        P = self.modules[layer.key].prompt  # (K, C)
        kv = []
        with self._computing_prompt():
            fused = layer.k.module is layer.v.module
            out = layer.k.module(P) if fused else None  # (K, 3·h·d_h) for a fused q/k/v projection
            for t in (layer.k, layer.v):
                y = out if fused else t.module(P)
                if t.out_index is not None:
                    y = y.index_select(-1, t.out_index.to(y.device))
                kv.append(y)  # (K, kv_heads·d_h)
        K = P.shape[0]
        groups = self._heads // self._kv_heads
        return tuple(  # type: ignore[return-value]
            y.view(K, self._kv_heads, self._head_dim).transpose(0, 1).repeat_interleave(groups, dim=0)
            for y in kv
        )

    def _add_prompt_branch(self, layer: _Layer):
        def fn(x: torch.Tensor) -> torch.Tensor:  # x: (B, T, heads·d_h), the concatenated head outputs
            q, layer.queries = layer.queries, None
            pos, layer.position_embeddings = layer.position_embeddings, None
            if q is None:
                raise RuntimeError(f"llama_adapter: layer {layer.index}'s output projection ran without its "
                                   "q projection; this attention layout is not supported")
            q = q.view(*q.shape[:-1], self._heads, self._head_dim).transpose(-3, -2)  # (B, heads, T, d_h)
            if self._rotary:
                if pos is None:
                    raise RuntimeError(f"llama_adapter: layer {layer.index}'s attention was called without "
                                       "position_embeddings; this transformers version is not supported")
                q = apply_rotary(q, *pos)  # rotated queries, unrotated prompt keys (official code)
            k, v = self.prompt_keys_values(layer.index)  # (heads, K, d_h)
            branch = prompt_attention(q.to(k.dtype), k, v, self.gate(layer.index))  # (B, heads, T, d_h)
            branch = branch.transpose(-3, -2).reshape(x.shape)  # (B, T, heads·d_h)
            return x + branch.to(x.dtype)

        return fn


def apply(model, config: LlamaAdapterConfig, name: str = "default") -> LlamaAdapterDelta:
    return core.apply(model, LlamaAdapterDelta, config, name)


SPEC = registry.register(registry.MethodSpec(
    name="llama_adapter", family="peft", config_cls=LlamaAdapterConfig, apply=apply, paper="llama-adapter",
    summary="zero-gated attention over learnable prompts in the top L layers (Zhang et al., ICLR 2024)",
    mergeable=False,
))
