"""Unstructured and N:M pruning of linear layers: shared mask utilities, magnitude pruning and Wanda.

**Sparsity patterns.** The config field ``sparsity`` is either a fraction ``s`` in ``[0, 1)``
(unstructured: that fraction of the weights becomes zero) or ``"N:M"`` (semi-structured: *exactly N
nonzeros* in every group of M consecutive input weights of each output row, so ``2:4`` and ``4:8``
keep half of the weights; ``1 <= N <= M``). Matrices are always handled in ``nn.Linear`` orientation
``(d_out, d_in)``; GPT-2's ``Conv1D`` (stored ``(d_in, d_out)``) is transposed on read and on write,
so its N:M groups run along the input features too. Unstructured counts are exact: ``k = round(s·n)``
weights of the comparison group (``n`` weights) are removed, ties broken by ``torch.topk``, never by a
threshold (a threshold removes every weight tied with it, so the achieved sparsity can overshoot).

**Magnitude pruning** (Han et al., "Learning both Weights and Connections for Efficient Neural
Networks", NeurIPS 2015, §3): remove the weights of smallest ``|W_ij|``, compared over the whole
matrix (the layer-wise baseline of Sun et al., 2024, §4); for N:M, keep the N largest ``|W_ij|`` of
every group. No calibration and no retraining (the paper retrains; the LLM baselines do not).

**Wanda** (Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large Language
Models", ICLR 2024, Eq. 1 and §3): the score of weight ``W_ij`` is ``S_ij = |W_ij| · ‖X_j‖₂``, where
``‖X_j‖₂`` is the norm of input feature ``j`` over all calibration tokens
(:attr:`~efficientgpt.compress.calibration.InputStats.col_norm`). Scores are compared *per output
row* (each row loses exactly ``round(s·d_in)`` weights; §3 "comparison group"), or per N:M group.
The weights that stay are not updated. Calibration follows the official code: decoder blocks are
visited in order and block ``i`` is calibrated on the outputs of the already-pruned blocks before it
(:func:`~efficientgpt.compress.calibration.run_sequential`; only the column norms are accumulated,
not the Gram matrix).

**Fused q/k/v projections** (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) are one weight matrix
and are pruned as one matrix: magnitude pruning compares all of its ``3·d`` output rows together.
When only some of q, k, v are targeted, only their output rows are pruned (still compared as one
matrix). Embeddings and the LM head are never targeted by the default ``all-linear``.

Departures from the official code (locuslab/wanda ``prune_magnitude`` / ``prune_wanda``): the number
of pruned weights is exactly ``round(s·n)`` (``topk``) instead of ``int(s·n)`` or a threshold that
also removes ties; the Wanda row norms are summed, not averaged, over the calibration tokens (a
positive factor per matrix that changes no mask).

SparseGPT lives in :mod:`efficientgpt.compress.sparsegpt` and reuses the utilities here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from efficientgpt import registry
from efficientgpt.compress.report import CompressionResult, linear_sparsity
from efficientgpt.config import field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.peft.common import TargetedConfig

# ---------------------------------------------------------------------------------------------
# Sparsity specification


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A parsed sparsity spec: ``fraction`` for unstructured, or ``n`` nonzeros per ``m`` for N:M."""

    fraction: float | None = None
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def target_sparsity(self) -> float:
        """The fraction of zeros the pattern asks for."""
        return 1.0 - self.n / self.m if self.is_nm else self.fraction

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.fraction:g}"


def parse_sparsity(value: Any, owner: str = "sparsity") -> Pattern:
    """Parse ``"0.5"`` / ``0.5`` (unstructured) or ``"2:4"`` (N nonzeros per M); errors name the value."""
    allowed = ("a fraction in [0, 1) such as 0.5 (unstructured), or N:M with 1 <= N <= M such as 2:4 "
               "(exactly N nonzeros in every group of M consecutive input weights)")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{owner} = {value!r} is not a sparsity; give {allowed}")
    text = str(value).strip()
    if ":" in text:
        parts = text.split(":")
        try:
            n, m = (int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"{owner} = {value!r} is malformed; give {allowed}") from None
        if m < 1 or n < 1:
            raise ConfigError(f"{owner} = {value!r}: N and M must be >= 1 (N = 0 would remove every weight); "
                              f"give {allowed}")
        if n > m:
            raise ConfigError(f"{owner} = {value!r}: N = {n} > M = {m}, but a group of {m} cannot hold {n} "
                              f"nonzeros; give {allowed}")
        return Pattern(n=n, m=m)
    try:
        s = float(text)
    except ValueError:
        raise ConfigError(f"{owner} = {value!r} is malformed; give {allowed}") from None
    if not math.isfinite(s) or not 0.0 <= s < 1.0:
        raise ConfigError(f"{owner} = {value!r} is outside [0, 1); give {allowed}")
    return Pattern(fraction=s)


def prune_count(fraction: float, n: int) -> int:
    """Weights removed from a comparison group of ``n`` at sparsity ``fraction``: ``round(fraction·n)``."""
    return min(n, int(round(fraction * n)))


# ---------------------------------------------------------------------------------------------
# Masks (``True`` = keep). Every score is in (d_out, d_in) orientation.


def keep_mask(score: torch.Tensor, pattern: Pattern, per_row: bool) -> torch.Tensor:
    """Boolean keep-mask ``(d_out, d_in)`` keeping the highest scores.

    Unstructured: the ``round(s·n)`` lowest scores are removed, over the whole matrix
    (``per_row=False``, ``n = d_out·d_in``) or in each row (``per_row=True``, ``n = d_in``).
    N:M: the N highest scores of every group of M consecutive columns of each row are kept.
    """
    d_out, d_in = score.shape
    mask = torch.ones(d_out, d_in, dtype=torch.bool, device=score.device)
    if pattern.is_nm:
        n, m = pattern.n, pattern.m
        if d_in % m:
            raise UserError(f"N:M sparsity {pattern}: M = {m} does not divide the {d_in} input features")
        groups = score.reshape(d_out, d_in // m, m)  # (d_out, groups, M)
        drop = torch.topk(groups, m - n, dim=-1, largest=False).indices  # (d_out, groups, M-N)
        mask.view(d_out, d_in // m, m).scatter_(-1, drop, False)
        return mask
    if per_row:
        k = prune_count(pattern.fraction, d_in)
        if k:
            mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
        return mask
    k = prune_count(pattern.fraction, score.numel())
    if k:
        mask.view(-1)[torch.topk(score.reshape(-1), k, largest=False).indices] = False
    return mask


def magnitude_mask(w: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of magnitude pruning: smallest ``|W|`` per matrix, or per N:M group."""
    return keep_mask(w.abs().float(), pattern, per_row=False)


def wanda_mask(w: torch.Tensor, col_norm: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of Wanda (Eq. 1): ``S = |W| · ‖X_j‖₂`` compared per output row, or per N:M group."""
    score = w.abs().float() * col_norm.float().to(w.device)[None, :]  # (d_out, d_in)
    return keep_mask(score, pattern, per_row=True)


# ---------------------------------------------------------------------------------------------
# Targets: which matrices (and which rows of a fused matrix) are pruned


@dataclasses.dataclass
class PruneTarget:
    """One weight matrix to prune; ``rows`` selects output rows of a fused q/k/v (``None`` = all)."""

    name: str
    module: nn.Module
    layer: int | None
    rows: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        d_in, d_out = arch.linear_shape(self.module)
        return (len(self.rows) if self.rows is not None else d_out), d_in

    def read(self) -> torch.Tensor:
        """A float32 copy of the pruned rows, ``(d_out_sel, d_in)`` (transposed back for ``Conv1D``)."""
        w = arch.linear_weight(self.module)  # (d_out, d_in), a view for Conv1D
        w = w[self.rows.to(w.device)] if self.rows is not None else w
        return w.detach().to(torch.float32, copy=True, memory_format=torch.contiguous_format)

    @torch.no_grad()
    def write(self, w_new: torch.Tensor) -> None:
        w = arch.linear_weight(self.module)  # (d_out, d_in) view: writes land in the stored layout
        w_new = w_new.to(device=w.device, dtype=w.dtype)
        if self.rows is None:
            w.copy_(w_new)
        else:
            w[self.rows.to(w.device)] = w_new


@dataclasses.dataclass
class PruneConfig(TargetedConfig):
    """Fields shared by the pruning methods: where to prune and to what sparsity."""

    targets: list[str] = field(["all-linear"], "roles (q,k,v,o,gate,up,down; groups all-linear, attn-linear, "
                                               "mlp-linear), module-name suffixes, or re:REGEX patterns")
    sparsity: str = field("0.5", "a fraction in [0, 1) (unstructured) or N:M (exactly N nonzeros in every "
                                 "group of M consecutive input weights, e.g. 2:4)")

    def validate(self) -> None:
        super().validate()
        self.pattern  # noqa: B018 - parsing is the check

    @property
    def pattern(self) -> Pattern:
        return parse_sparsity(self.sparsity, f"{type(self).__name__}.sparsity")


def resolve_targets(model: nn.Module, cfg: PruneConfig, in_blocks: bool = False) -> list[PruneTarget]:
    """Group resolved targets by module (a fused q/k/v resolved per role is one matrix) and check shapes."""
    by_module: dict[int, PruneTarget] = {}
    for t in arch.resolve(model, cfg.targets, cfg.layers, cfg.exclude):
        if in_blocks and t.layer is None:
            raise UserError(f"{t.name} lies outside the decoder blocks; calibrated pruning visits the blocks in "
                            "order and prunes only linear layers inside them (drop it from --targets)")
        prev = by_module.get(id(t.module))
        if prev is None:
            by_module[id(t.module)] = PruneTarget(t.name, t.module, t.layer, t.out_index)
        elif prev.rows is not None:
            prev.rows = None if t.out_index is None else torch.unique(torch.cat([prev.rows, t.out_index]))
    targets = list(by_module.values())
    for t in targets:
        if t.rows is not None and len(t.rows) == arch.linear_shape(t.module)[1]:
            t.rows = None  # q, k and v together: the whole fused matrix
    pattern = cfg.pattern
    if pattern.is_nm:
        bad = [f"{t.name} ({t.shape[1]})" for t in targets if t.shape[1] % pattern.m]
        if bad:
            raise UserError(f"N:M sparsity {pattern}: M = {pattern.m} must divide the input features of every "
                            f"target, but not of {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; use an M "
                            "that divides them, or --exclude those modules")
    return targets


def calibration_roles(model: nn.Module, cfg: PruneConfig, targets: list[PruneTarget]) -> tuple[str, ...]:
    """Roles for :func:`run_sequential`: the targets' own roles when they are plain roles in every block;
    otherwise (layers, exclusions, name patterns) all linear roles, of which only the targets are pruned."""
    wanted = arch.expand_roles(cfg.targets)
    if cfg.layers is None and not cfg.exclude and all(r in arch.LINEAR_ROLES for r in wanted):
        return tuple(wanted)
    covered = {t.name for t in arch.resolve(model, ["all-linear"])}
    outside = [t.name for t in targets if t.name not in covered]
    if outside:
        raise UserError(f"calibrated pruning supports the decoder's linear roles; {outside[0]} is none of them")
    return ("all-linear",)


def check_windows(method: str, windows) -> None:
    if windows is None or not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
        raise UserError(f"{method} needs calibration windows: a (N, T) tensor of token ids "
                        "(the pipeline draws them with --calib-data / --calib-samples)")


# ---------------------------------------------------------------------------------------------
# Reporting


def layer_entry(t: PruneTarget, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Exact counts of one pruned matrix, measured on the weights after pruning."""
    w = t.read()
    zeros = int((w == 0).sum().item())
    full = arch.linear_weight(t.module)
    return {"layer": t.layer, "shape": list(w.shape), "weights": w.numel(), "zeros": zeros,
            "sparsity": zeros / w.numel(), "module_sparsity": int((full == 0).sum().item()) / full.numel(),
            **(extra or {})}


def build_result(method: str, model: nn.Module, cfg: PruneConfig, per_layer: dict[str, dict[str, Any]],
                 notes: Iterable[str] = ()) -> CompressionResult:
    """Achieved sparsity, exactly: over the targeted weights, and over all decoder linear weights."""
    overall, _ = linear_sparsity(model)
    zeros = sum(e["zeros"] for e in per_layer.values())
    total = sum(e["weights"] for e in per_layer.values())
    pattern = cfg.pattern
    achieved = {
        "sparsity": overall,
        "target_sparsity": zeros / total if total else 0.0,
        "requested_sparsity": pattern.target_sparsity,
        "pattern": str(pattern) if pattern.is_nm else "unstructured",
        "pruned_weights": zeros,
        "target_weights": total,
        "matrices": len(per_layer),
    }
    return CompressionResult(method=method, achieved=achieved, per_layer=per_layer, notes=list(notes))


# ---------------------------------------------------------------------------------------------
# Methods


@dataclasses.dataclass
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning: smallest |W| per matrix (or per N:M group)."""


@dataclasses.dataclass
class WandaConfig(PruneConfig):
    """Wanda (Sun et al., 2024): score |W_ij|·‖X_j‖₂ compared per output row (or per N:M group)."""


@torch.no_grad()
def apply_magnitude(model: nn.Module, config: MagnitudeConfig, progress: bool = False) -> CompressionResult:
    config.validate()
    targets = resolve_targets(model, config)
    pattern = config.pattern
    per_layer = {}
    for t in targets:
        w = t.read()  # (d_out, d_in)
        t.write(w * magnitude_mask(w, pattern))
        per_layer[t.name] = layer_entry(t)
    return build_result("magnitude", model, config, per_layer)


@torch.no_grad()
def apply_wanda(model: nn.Module, config: WandaConfig, windows: torch.Tensor | None = None,
                progress: bool = False) -> CompressionResult:
    from efficientgpt.compress.calibration import run_sequential

    config.validate()
    check_windows("wanda", windows)
    targets = resolve_targets(model, config, in_blocks=True)
    roles = calibration_roles(model, config, targets)
    pattern = config.pattern
    by_layer: dict[int, list[PruneTarget]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    per_layer = {}

    def compress_block(i, block, stats, inputs):
        for t in by_layer.get(i, []):
            w = t.read()  # (d_out, d_in)
            t.write(w * wanda_mask(w, stats[t.name].col_norm, pattern))
            per_layer[t.name] = layer_entry(t)

    run_sequential(model, windows, compress_block, roles=roles, gram=False, progress=progress)
    return build_result("wanda", model, config, per_layer,
                        notes=[f"calibrated on {windows.shape[0]} windows of {windows.shape[1]} tokens"])


MAGNITUDE = registry.register(registry.MethodSpec(
    name="magnitude", family="prune", config_cls=MagnitudeConfig, apply=apply_magnitude,
    paper="magnitude-pruning",
    summary="zero the smallest |W| of each matrix (unstructured fraction or N:M), no calibration",
))
WANDA = registry.register(registry.MethodSpec(
    name="wanda", family="prune", config_cls=WandaConfig, apply=apply_wanda, paper="wanda",
    summary="prune by |W|·‖X‖ per output row (unstructured or N:M), calibrated, no weight update",
    calibration=True,
))
