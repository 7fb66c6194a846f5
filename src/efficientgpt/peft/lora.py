"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022).

A frozen linear map ``W0`` (``d_out x d_in``) is adapted by a rank-``r`` update (paper, Eq. 3)::

    h = W0 x + ΔW x = W0 x + (α / r) · B A x,     A ∈ R^{r x d_in},  B ∈ R^{d_out x r}

``A`` starts from Kaiming-uniform noise and ``B`` from zeros, so ``ΔW = 0`` at initialisation (§4.1);
``init="gaussian"`` draws ``A ~ N(0, 1/r²)`` instead. Dropout applies to the input of ``A``.
``rslora=True`` scales by ``α / √r`` (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor"),
which keeps the update's magnitude stable as ``r`` grows.

Targets are roles or module names (:mod:`efficientgpt.models.arch`). On a fused projection (GPT-2
``c_attn``, GPT-NeoX ``query_key_value``) a role gets its own ``(A, B)`` whose ``B`` writes only that
role's output features, so LoRA on ``q`` and ``v`` leaves ``k`` untouched as the paper's §7.1 setup
intends; naming the fused module itself (``--targets c_attn``) adapts its whole output, as HF PEFT
does. Mergeable: ``W0 ← W0 + (α/r) B A`` (the update is transposed for GPT-2's ``Conv1D``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from efficientgpt import registry
from efficientgpt.config import field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.peft import core
from efficientgpt.peft.common import TargetedConfig

INITS = ("kaiming", "gaussian")


@dataclasses.dataclass
class LoraConfig(TargetedConfig):
    """LoRA hyperparameters (Hu et al., 2022)."""

    rank: int = field(8, "rank r of the update B A", minimum=1)
    alpha: float = field(16.0, "scaling numerator α (the update is scaled by α/r, or α/√r with rslora)",
                         minimum=0.0, exclusive_minimum=True)
    dropout: float = field(0.0, "dropout on the input of A", minimum=0.0, maximum=1.0)
    init: str = field("kaiming", "initialisation of A: kaiming (uniform) or gaussian (N(0, 1/r²)); B = 0",
                      choices=INITS)
    rslora: bool = field(False, "rank-stabilised scaling α/√r instead of α/r")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def validate(self) -> None:
        super().validate()
        if self.dropout >= 1.0:
            raise ConfigError(f"LoraConfig.dropout = {self.dropout} must be < 1")


class LoraPair(nn.Module):
    """The factors of one update: ``A`` (r x d_in) and ``B`` (d_out x r)."""

    def __init__(self, d_in: int, d_out: int, rank: int, init: str):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's default, as in the paper's code
        else:
            nn.init.normal_(self.A, std=1.0 / rank)


class LoraDelta(core.Delta):
    method = "lora"
    mergeable = True

    def attach(self) -> None:
        cfg: LoraConfig = self.config
        self._targets = arch.resolve(self.model, cfg.targets, cfg.layers, cfg.exclude)
        ref = arch.linear_weight(self._targets[0].module)
        by_module: dict[int, list] = {}
        for t in self._targets:
            self.modules[self.key_of(t)] = self.new_factors(t).to(dtype=ref.dtype)
            by_module.setdefault(id(t.module), []).append(t)
        for targets in by_module.values():
            self.hook_output(targets[0].module, self._make_hook(targets))

    def new_factors(self, t: arch.Target) -> nn.Module:
        """The module holding one target's factors (DyLoRA stores them per rank component)."""
        return LoraPair(t.in_features, t.out_features, self.config.rank, self.config.init)

    @staticmethod
    def key_of(t: arch.Target) -> str:
        return core.target_key(t.name, t.role if t.out_index is not None else None)

    def targets(self) -> list[str]:
        return sorted({t.name for t in self._targets})

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        # Follows the model's train/eval mode: the delta's tensors are not the model's children.
        p = self.config.dropout
        return torch.nn.functional.dropout(x, p, training=self.model.training) if p > 0 else x

    def scaling(self, key: str) -> float:
        return self.config.scaling

    def _make_hook(self, targets: list[arch.Target]):
        """One hook per module: the update of a whole module, or of all its fused roles at once."""
        if len(targets) == 1 and targets[0].out_index is None:
            key = self.key_of(targets[0])

            def whole(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                A, B = self.factors(key)
                x = self.dropout(x)
                z = F.linear(x if x.dtype == A.dtype else x.to(A.dtype), A) * self.scaling(key)  # (..., r)
                d = F.linear(z, B)  # (..., d_out)
                return out + (d if d.dtype == out.dtype else d.to(out.dtype))

            return whole
        keys = [self.key_of(t) for t in targets]
        spans = [_span(t.out_index) for t in targets]
        if all(span is not None for span in spans):
            # Each role is a contiguous block of the fused output (GPT-2's c_attn: q, k, v thirds): add each
            # role's update into its block in place. No zero-padded matrix, no scatter, and the work is
            # that of one LoRA per role, as for separate q/k/v projections.
            def blocks(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                if isinstance(out.grad_fn, torch.autograd.function.BackwardCFunction):
                    out = out.clone()  # a custom autograd Function's output (bitsandbytes 4-bit) is not writable
                x = self.dropout(x)
                autocast = torch.is_autocast_enabled(x.device.type)
                if autocast:  # one low-precision copy of x for every role, not one per role
                    x = x.to(torch.get_autocast_dtype(x.device.type))
                for key, (start, stop) in zip(keys, spans):
                    A, B = self.factors(key)
                    z = F.linear(x if autocast or x.dtype == A.dtype else x.to(A.dtype), A) * self.scaling(key)  # (..., r)
                    d = F.linear(z, B)  # (..., stop - start)
                    out[..., start:stop] += d if d.dtype == out.dtype else d.to(out.dtype)
                return out

            return blocks
        d_out = arch.linear_shape(targets[0].module)[1]
        index_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        def rows_cols(device: torch.device, ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            # Where each role's B goes in the fused (d_out x Σr) matrix: its rows, its block of columns.
            cached = index_cache.get(device)
            if cached is None or cached[1].numel() != sum(len(t.out_index) * r for t, r in zip(targets, ranks)):
                rows, cols, start = [], [], 0
                for t, r in zip(targets, ranks):
                    rows.append(t.out_index.repeat_interleave(r))
                    cols.append(torch.arange(start, start + r).repeat(len(t.out_index)))
                    start += r
                cached = index_cache[device] = (torch.cat(rows).to(device), torch.cat(cols).to(device))
            return cached

        def fused(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            factors = [self.factors(k) for k in keys]
            ranks = [a.shape[0] for a, _ in factors]
            A = torch.cat([a * self.scaling(k) for (a, _), k in zip(factors, keys)])  # (Σr, d_in)
            rows, cols = rows_cols(out.device, ranks)
            values = torch.cat([b.reshape(-1) for _, b in factors])  # each B_r row-major: (d_r, r)
            B = A.new_zeros(d_out, A.shape[0]).index_put((rows, cols), values)  # (d_out, Σr), block-sparse
            x = self.dropout(x)
            d = F.linear(F.linear(x if x.dtype == A.dtype else x.to(A.dtype), A), B)  # (..., d_out)
            return out + (d if d.dtype == out.dtype else d.to(out.dtype))

        return fused

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.modules[key]
        return pair.A, pair.B

    def delta_weight(self, key: str) -> torch.Tensor:
        """``ΔW = (α/r) B A`` in ``nn.Linear`` orientation, ``(d_out, d_in)``."""
        A, B = self.factors(key)
        return (B @ A) * self.scaling(key)

    def _fold(self, sign: float) -> None:
        for t in self._targets:
            key = self.key_of(t)
            dw = sign * self.delta_weight(key)
            w = t.module.weight
            dw = dw.to(w.dtype)
            if arch.is_conv1d(t.module):  # weight is (d_in, d_out)
                if t.out_index is None:
                    w.add_(dw.T)
                else:
                    w.index_add_(1, t.out_index.to(w.device), dw.T)
            elif t.out_index is None:
                w.add_(dw)
            else:
                w.index_add_(0, t.out_index.to(w.device), dw)

    def _merge(self) -> None:
        self._fold(+1.0)

    def _unmerge(self) -> None:
        self._fold(-1.0)


def _span(index: torch.Tensor) -> tuple[int, int] | None:
    """``(start, stop)`` when ``index`` is ``start, start + 1, ..., stop - 1``; otherwise ``None``."""
    start, stop = int(index[0]), int(index[-1]) + 1
    return (start, stop) if stop - start == index.numel() and bool((index.diff() == 1).all()) else None


def apply(model, config: LoraConfig, name: str = "default") -> LoraDelta:
    return core.apply(model, LoraDelta, config, name)


SPEC = registry.register(registry.MethodSpec(
    name="lora", family="peft", config_cls=LoraConfig, apply=apply, paper="lora",
    summary="low-rank update (α/r)·BA on chosen linear maps (Hu et al., ICLR 2022)", mergeable=True,
))


# ---- Hugging Face PEFT format --------------------------------------------------------------------
def peft_export(delta: LoraDelta) -> tuple[dict, dict[str, torch.Tensor]]:
    """The delta as a PEFT LoRA adapter (see :mod:`efficientgpt.peft.hf_peft`).

    PEFT puts one LoRA on a whole module. Per-role LoRAs on a fused projection (``q`` and ``v`` on
    GPT-2's ``c_attn``) become one LoRA of rank ``r · roles`` on that module: ``A`` stacks the roles'
    ``A``s and ``B`` is block-structured, writing each role's rows only, so ``B A`` is unchanged; its
    rank and α go into ``rank_pattern``/``alpha_pattern`` so PEFT's scaling equals ours.
    """
    cfg: LoraConfig = delta.config
    by_module: dict[str, list] = {}
    for t in delta._targets:
        by_module.setdefault(t.name, []).append(t)
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    fan_in_fan_out = False
    for path, targets in by_module.items():
        fan_in_fan_out |= arch.is_conv1d(targets[0].module)
        if len(targets) == 1 and targets[0].out_index is None:
            A, B = delta.factors(core.target_key(path))
        else:
            d_out = arch.linear_shape(targets[0].module)[1]
            As, B = [], torch.zeros(d_out, cfg.rank * len(targets), dtype=targets[0].module.weight.dtype)
            for i, t in enumerate(targets):
                a, b = delta.factors(core.target_key(path, t.role))
                As.append(a)
                B[t.out_index, i * cfg.rank : (i + 1) * cfg.rank] = b.detach()
            A = torch.cat(As, dim=0)
            r = A.shape[0]
            rank_pattern[path] = r
            alpha_pattern[path] = cfg.scaling * (math.sqrt(r) if cfg.rslora else r)
        tensors[f"{path}.lora_A.weight"] = A.detach()
        tensors[f"{path}.lora_B.weight"] = B.detach()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "use_rslora": cfg.rslora, "lora_dropout": cfg.dropout, "target_modules": sorted(by_module),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "fan_in_fan_out": fan_in_fan_out,
        "bias": "none", "init_lora_weights": True, "use_dora": False, "modules_to_save": None,
    }
    return config, tensors


def peft_import(model, adapter_config: dict, tensors: dict[str, torch.Tensor], name: str = "default") -> LoraDelta:
    """A PEFT LoRA adapter as our delta: one LoRA per module, PEFT's per-module scaling kept exactly.

    Modules of smaller rank (``rank_pattern``) are zero-padded to the largest rank, and each module's
    scaling ratio to ours is folded into its ``B``: the product ``s · B A`` is what PEFT computes.
    """
    for flag in ("use_dora",):
        if adapter_config.get(flag):
            raise UserError(f"PEFT LoRA adapters with {flag}=true are not supported")
    if adapter_config.get("bias", "none") != "none":
        raise UserError(f"PEFT LoRA adapters with bias={adapter_config['bias']!r} are not supported")
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k})
    if not paths:
        raise UserError("the PEFT adapter holds no lora_A tensors")
    ranks = {p: tensors[f"{p}.lora_A.weight"].shape[0] for p in paths}
    r_max = max(ranks.values())
    alpha = float(adapter_config.get("lora_alpha", 8))
    rslora = bool(adapter_config.get("use_rslora", False))
    cfg = LoraConfig(targets=paths, rank=r_max, alpha=alpha, rslora=rslora,
                     dropout=float(adapter_config.get("lora_dropout", 0.0)))
    delta = apply(model, cfg, name=name)
    ours = cfg.scaling
    state = {}
    for p in paths:
        r = ranks[p]
        a_p = _pattern_value(adapter_config.get("alpha_pattern") or {}, p, alpha)
        theirs = a_p / (math.sqrt(r) if rslora else r)
        A, B = tensors[f"{p}.lora_A.weight"], tensors[f"{p}.lora_B.weight"]
        key = core.target_key(p)
        state[f"{key}.A"] = torch.cat([A, A.new_zeros(r_max - r, A.shape[1])])
        state[f"{key}.B"] = torch.cat([B * (theirs / ours), B.new_zeros(B.shape[0], r_max - r)], dim=1)
    delta.load_state_dict(state)
    return delta


def _pattern_value(pattern: dict, path: str, default: float) -> float:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a module path's suffix."""
    import re

    for key, value in pattern.items():
        if path == key or re.fullmatch(rf"(.*\.)?{key}", path):
            return float(value)
    return default
