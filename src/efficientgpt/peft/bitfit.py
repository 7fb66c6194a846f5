"""BitFit: bias-terms fine-tuning (Ben Zaken, Ravfogel and Goldberg, ACL 2022).

"BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models", §3:
freeze every weight matrix ``W`` and LayerNorm gain ``g`` and train only the additive bias terms
``b`` of the network: those of the query, key, value and output projections of attention, of both
MLP layers, and of the LayerNorms.

Implementation: each bias gets a zero-initialised additive delta ``Δb`` on its module's output,
``y = W x + (b + Δb)``, which is training ``b`` itself while leaving the base tensor untouched (so
disabling or removing the delta restores the model exactly), and the model is unchanged at
initialisation.

* Targets are roles (default ``all-linear``: q, k, v, o, gate, up, down) or module-name patterns. On a
  fused projection (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) each role's delta covers only its
  own output features, so ``b_q``, ``b_k`` and ``b_v`` are separate as in the paper.
* ``norms=True`` adds the LayerNorm biases of each decoder block (before attention and before the
  MLP) and the final LayerNorm (GPT-2, OPT, GPT-NeoX). RMSNorm (Llama, Qwen2) has no bias term by
  design, and BitFit does not add one there: it tunes the biases a model has.
* Bias-free linear layers (all of Llama's; Qwen2's ``o_proj`` and MLP, whose q/k/v do carry biases)
  get a zero-initialised bias: the delta *is* that bias. The paper studies BERT, which has biases
  everywhere; adding zero biases to a bias-free model is what the T-Few code does for T5
  (github.com/r-three/t-few, ``src/models/bitfit.py``).

Mergeable: ``b ← b + Δb``; a module without a bias gets one (a new parameter) on merge, which unmerge
deletes again. :meth:`BitFitDelta.finalize_merged` makes the model's config describe the merged
weights (Llama: ``attention_bias`` / ``mlp_bias``, with zero biases on every module the flag covers
that was not tuned) so ``save_pretrained`` and ``from_pretrained`` reload them. Where no config flag
can give a module a bias (Qwen2's ``o_proj`` and MLP, Mistral's projections), merging is refused: the
merged model could not be saved and reloaded, because ``from_pretrained`` would drop the bias.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from efficientgpt import registry
from efficientgpt.config import field
from efficientgpt.errors import UserError
from efficientgpt.models import arch
from efficientgpt.peft import core
from efficientgpt.peft.common import TargetedConfig

#: model_type -> {config flag: the roles whose linear layers the flag gives a bias}. Model types not
#: listed have no flag: a bias-free linear layer there cannot carry a merged bias.
BIAS_FLAGS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {"attention_bias": ("q", "k", "v", "o"), "mlp_bias": ("gate", "up", "down")},
    "qwen3": {"attention_bias": ("q", "k", "v", "o")},
    "gpt_neox": {"attention_bias": ("q", "k", "v", "o")},
    "opt": {"enable_bias": ("q", "k", "v", "o", "up", "down")},
}


@dataclasses.dataclass
class BitFitConfig(TargetedConfig):
    """BitFit hyperparameters (Ben Zaken et al., 2022): which bias terms train."""

    targets: list[str] = field(["all-linear"], "linear layers whose bias trains: roles (q,k,v,o,gate,up,down; "
                               "groups all-linear, attn-linear, mlp-linear), module-name suffixes or re:REGEX")
    norms: bool = field(True, "also train the LayerNorm biases (per block and final); RMSNorm has none")


class BiasDelta(nn.Module):
    """``Δb``, added to a module's output; zero at initialisation."""

    def __init__(self, n: int, dtype: torch.dtype):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(n, dtype=dtype))


@dataclasses.dataclass(frozen=True)
class BiasTarget:
    """A module whose (role's) bias trains: a linear layer or a LayerNorm."""

    name: str
    module: nn.Module
    key: str
    role: str | None
    out_index: torch.Tensor | None = None


def _matches(pattern: str, name: str) -> bool:
    """The pattern rule of :func:`arch.resolve`: a path suffix at a dot, or ``re:`` full match."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _norm_targets(model: nn.Module, cfg: BitFitConfig) -> list[BiasTarget]:
    """The LayerNorms with a bias: each block's two, and the final one (all layers only)."""
    try:
        arch.family_of(model)
    except UserError as err:
        raise UserError(f"BitFit with norms=True locates the LayerNorms by the model's role table: {err}; "
                        "set norms false to tune only the linear biases of such a model") from None
    names = {id(m): n for n, m in model.named_modules()}
    found: list[nn.Module] = []
    layers = range(arch.num_layers(model)) if cfg.layers is None else \
        sorted({i % arch.num_layers(model) for i in cfg.layers})
    for i in layers:
        for role in ("norm_attn", "norm_mlp"):
            try:
                found.append(arch.block_module(model, i, role))
            except UserError:
                pass
    if cfg.layers is None:
        try:
            found.append(arch.model_module(model, "final_norm"))
        except UserError:
            pass
    out = []
    for m in found:
        if isinstance(m, nn.LayerNorm) and m.bias is not None:
            name = names[id(m)]
            if not any(_matches(p, name) for p in cfg.exclude):
                out.append(BiasTarget(name, m, core.target_key(name), role=None))
    return out


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    return arch.linear_shape(module)[1]


class BitFitDelta(core.Delta):
    method = "bitfit"
    mergeable = True

    def attach(self) -> None:
        cfg: BitFitConfig = self.config
        self.biased: list[BiasTarget] = []
        seen = set()
        for t in arch.resolve(self.model, cfg.targets, cfg.layers, cfg.exclude):
            key = core.target_key(t.name, t.role if t.out_index is not None else None)
            if key not in seen:  # the same module named twice (a role and a pattern)
                seen.add(key)
                self.biased.append(BiasTarget(t.name, t.module, key, t.role, t.out_index))
        if cfg.norms:
            self.biased.extend(_norm_targets(self.model, cfg))
        self._created: list[nn.Module] = []
        dtype = self.biased[0].module.weight.dtype
        for t in self.biased:
            n = len(t.out_index) if t.out_index is not None else _width(t.module)
            self.modules[t.key] = BiasDelta(n, dtype)
            self.hook_output(t.module, self._add_bias(t.key, t.out_index))

    def targets(self) -> list[str]:
        return sorted({t.name for t in self.biased})

    def _add_bias(self, key: str, out_index: torch.Tensor | None):
        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            b = self.modules[key].b.to(out.dtype)
            if out_index is None:
                return out + b  # (..., d_out) + (d_out,)
            # Only this role's features of the fused output: (..., d_fused) += (..., d_role) at out_index.
            return out.index_add(-1, out_index.to(out.device), b.expand(*out.shape[:-1], -1))

        return fn

    # ---- merging ----------------------------------------------------------------------------------
    def _flag_modules(self) -> dict[str, list[nn.Module]]:
        """config flag -> the modules it gives a bias (every layer), for this model type."""
        flags = BIAS_FLAGS.get(getattr(self.model.config, "model_type", None), {})
        out: dict[str, list[nn.Module]] = {}
        for flag, roles in flags.items():
            mods: list[nn.Module] = []
            for i in range(arch.num_layers(self.model)):
                for role in roles:
                    try:
                        m = arch.block_module(self.model, i, role)
                    except UserError:
                        continue
                    if all(m is not x for x in mods):
                        mods.append(m)
            out[flag] = mods
        return out

    def _merge(self) -> None:
        flagged = [m for mods in self._flag_modules().values() for m in mods]
        model_type = getattr(self.model.config, "model_type", None)
        for t in self.biased:
            if getattr(t.module, "bias", None) is None and all(t.module is not m for m in flagged):
                raise UserError(
                    f"cannot merge BitFit into this {model_type} model: {t.name} has no bias and the {model_type} "
                    "config has no flag that gives it one, so from_pretrained would drop a merged bias and the "
                    "saved model would silently differ; keep the delta unmerged (save_delta / --delta), or train "
                    "only biases the model has (e.g. targets=q,k,v on Qwen2)")
        self._created = []
        for t in self.biased:
            m = t.module
            if getattr(m, "bias", None) is None:
                w = m.weight
                m.bias = nn.Parameter(torch.zeros(_width(m), dtype=w.dtype, device=w.device), requires_grad=False)
                self._created.append(m)
            self._fold(t, +1.0)

    def _fold(self, t: BiasTarget, sign: float) -> None:
        bias = t.module.bias
        b = (sign * self.modules[t.key].b.detach()).to(bias.dtype)
        if t.out_index is None:
            bias.add_(b)
        else:
            bias.index_add_(0, t.out_index.to(bias.device), b)

    def _unmerge(self) -> None:
        for t in self.biased:
            if all(t.module is not m for m in self._created):
                self._fold(t, -1.0)
        for m in self._created:
            m.bias = None  # registered as an empty parameter slot again, as nn.Linear(bias=False) leaves it
        self._created = []

    def finalize_merged(self) -> None:
        """Set the config flags for the biases merge created, with zero biases on every module a flag
        covers that has none, so the saved model reloads with the same weights."""
        for flag, mods in self._flag_modules().items():
            if not any(m in self._created for m in mods):
                continue
            for m in mods:
                if getattr(m, "bias", None) is None:
                    w = m.weight
                    m.bias = nn.Parameter(torch.zeros(_width(m), dtype=w.dtype, device=w.device))
            setattr(self.model.config, flag, True)
        self._created = []


def apply(model, config: BitFitConfig, name: str = "default") -> BitFitDelta:
    return core.apply(model, BitFitDelta, config, name)


SPEC = registry.register(registry.MethodSpec(
    name="bitfit", family="peft", config_cls=BitFitConfig, apply=apply, paper="bitfit",
    summary="train only the bias terms, as zero-initialised additive deltas (Ben Zaken et al., ACL 2022)",
    mergeable=True,
))
