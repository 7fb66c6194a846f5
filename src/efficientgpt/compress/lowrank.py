"""Low-rank decomposition of linear layers: truncated SVD, ASVD and SVD-LLM.

Every targeted weight ``W`` (``d_out x d_in``, ``nn.Linear`` orientation; GPT-2's ``Conv1D`` stores
``Wᵀ``) is replaced by two smaller linear maps applied in sequence, :class:`LowRankLinear`::

    y = B (A x) + b,    A = Σ_r^{1/2} V_rᵀ T⁻¹  (r x d_in),    B = U_r Σ_r^{1/2}  (d_out x r)

where ``U Σ Vᵀ`` is the SVD of the *transformed* matrix ``W T`` truncated to its ``r`` largest
singular values, ``T`` the method's input transform, and the bias ``b`` is kept on ``B``. ``Σ^{1/2}``
goes to both factors (ASVD's "absorbing singular values" choice, also the official SVD-LLM code's),
which keeps the two factors on the same scale. The layer then holds ``r (d_in + d_out)`` weights
instead of ``d_in · d_out``, so a layer is factored only when ``r (d_in + d_out) < d_in · d_out``;
otherwise it is left dense and ``per_layer`` says why.

Methods (``T`` is the input transform):

* ``svd``: plain truncated SVD, ``T = I``. By the Eckart–Young–Mirsky theorem it minimises
  ``‖W - Ŵ‖_F`` over rank-``r`` matrices; the error is the norm of the dropped singular values. As
  applied to the weight matrices of fully connected layers by Denton et al., "Exploiting Linear
  Structure Within Convolutional Networks for Efficient Evaluation" (NeurIPS 2014, §3.2).
* ``asvd``: Yuan et al., "ASVD: Activation-aware Singular Value Decomposition for Compressing Large
  Language Models" (arXiv 2312.05821, 2023). Input channels are scaled by ``T = S = diag(s)``,
  ``s_j = (mean |x_j|)^α`` over the calibration tokens (α = 0.5, the paper's default), so columns
  that meet large activations weigh more in the SVD of ``W S``; then ``A ← A S⁻¹``.
* ``svd_llm``: Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
  Language Model Compression" (ICLR 2025), §3.1 truncation-aware data whitening: ``T = S``, the
  lower Cholesky factor of the calibration Gram matrix, ``S Sᵀ = X Xᵀ`` (``X`` is ``d_in x n``, one
  column per token). Then ``S⁻¹ X`` has orthonormal rows, so the truncation loss
  ``‖(W - Ŵ) X‖_F = ‖(W S - U_r Σ_r V_rᵀ) S⁻¹ X‖_F`` equals the norm of the dropped singular values
  of ``W S``: truncating the smallest singular values is the loss-optimal choice. ``A ← A S⁻¹`` is a
  triangular solve. When ``X Xᵀ`` is not positive definite (dead input channels, fewer tokens than
  features) the Cholesky factor is taken of ``X Xᵀ + λ I`` with ``λ = max(0, -λ_min) + damping ·
  mean(diag X Xᵀ)`` (the official code shifts by ``-λ_min + 1e-6``; ours is relative to the
  Gram's scale) and ``per_layer`` reports ``λ``; the identity above then holds only approximately.

Calibrated methods (``asvd``, ``svd_llm``) run :func:`~efficientgpt.compress.calibration.run_sequential`:
decoder blocks are calibrated and factored in order, each on the outputs of the already-factored
earlier blocks, one block's activations in memory at a time.

Budget. ``rank`` gives every target the same rank (at most ``min(d_in, d_out)``). ``ratio`` keeps
that fraction of the targeted matrices' weight parameters (0.5 keeps half; SVD-LLM's "compression
ratio" is the fraction *removed*, 1 - ratio). Biases are kept and not counted in the budget.

* ``allocation="uniform"``: every layer keeps the ratio, ``r = ⌊ratio · d_in d_out / (d_in + d_out)⌋``
  (the official SVD-LLM rule). At ``ratio = 1`` every layer stays dense.
* ``allocation="global"``: one budget ``⌊ratio · Σ d_in d_out⌋`` for all targets. Each layer keeps
  at least rank 1; the other singular components of all layers are then taken greedily in order of
  ``(σ_i² / Σ_j σ_j²) / (d_in + d_out)``, the share of the layer's (transformed) energy a component
  carries per parameter it costs, while they fit the budget; a layer whose next component does not
  fit takes no more. A layer whose rank reaches the break-even point becomes dense (its remaining
  components are free). Dropping component ``i`` raises the layer's *relative* squared error by
  exactly ``σ_i² / Σ σ_j²`` (for ``svd_llm`` relative to ``‖W X‖_F²``), so the greedy trims the sum of
  relative errors at the least cost per parameter. For calibrated methods the ranks are chosen from
  statistics of the dense model (one extra calibration pass) and then applied block by block.

Departures from the papers:

* ASVD's sensitivity-based truncation rank searching (per-layer perplexity sensitivity and a binary
  search on a target ratio) is replaced by the ``uniform``/``global`` allocation above; ASVD's KV-cache
  compression is not implemented. ASVD's official code gathers activation statistics from the dense
  model in one pass; here they come from the sequential pass (earlier blocks already factored).
  Zero channels are clamped to ``10⁻⁶ · max_j mean|x_j|`` before the power so ``S⁻¹`` stays finite
  (the official code adds ``10⁻⁶``).
* SVD-LLM's parameter update with sequential low-rank approximation (§3.2: LoRA fine-tuning of
  ``B`` then ``A`` after truncation) is not implemented; only the truncation-aware whitening is.
* The SVDs are computed in float64 and the factors cast back to the layer's dtype.
* Fused projections (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) are factored as one matrix, so
  q, k and v are targeted together or not at all.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from efficientgpt import registry
from efficientgpt.compress import io
from efficientgpt.compress.report import CompressionResult, parameter_bytes
from efficientgpt.config import field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch
from efficientgpt.peft.common import TargetedConfig

ALLOCATIONS = ("uniform", "global")
#: The ratio used when neither ``ratio`` nor ``rank`` is given.
DEFAULT_RATIO = 0.5
#: ASVD: channels whose mean |x| is below this fraction of the largest are clamped to it.
ASVD_EPS = 1e-6


# ---- configs ------------------------------------------------------------------------------------


@dataclasses.dataclass
class SVDConfig(TargetedConfig):
    """Truncated SVD of the targeted linear layers (also the base of the ASVD and SVD-LLM configs)."""

    targets: list[str] = field(["all-linear"], "roles (q,k,v,o,gate,up,down; groups all-linear, attn-linear, "
                                               "mlp-linear), module-name suffixes, or re:REGEX patterns")
    ratio: float | None = field(None, f"fraction of the targeted matrices' parameters kept, in (0, 1] "
                                      f"(default {DEFAULT_RATIO} unless --rank is given)",
                                minimum=0.0, exclusive_minimum=True, maximum=1.0)
    rank: int | None = field(None, "one fixed rank r for every targeted layer, instead of --ratio", minimum=1)
    allocation: str = field("uniform", "how the --ratio budget is split over layers: uniform (every layer keeps "
                                       "the ratio) or global (greedy on normalised singular-value energy per "
                                       "parameter)", choices=ALLOCATIONS)

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))):
            raise ConfigError(f"{name}.ratio must be a number in (0, 1], got {self.ratio!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)):
            raise ConfigError(f"{name}.rank must be a positive integer, got {self.rank!r}")
        if self.ratio is not None and self.rank is not None:
            raise ConfigError(f"{name}: give either ratio ({self.ratio}) or rank ({self.rank}), not both")
        if self.rank is not None and self.allocation != "uniform":
            raise ConfigError(f"{name}.allocation = {self.allocation!r} applies to a ratio budget; "
                              f"with a fixed rank ({self.rank}) leave it 'uniform'")

    @property
    def target_ratio(self) -> float | None:
        """The parameter ratio to meet, or ``None`` when a fixed rank is given."""
        if self.rank is not None:
            return None
        return float(self.ratio) if self.ratio is not None else DEFAULT_RATIO


@dataclasses.dataclass
class ASVDConfig(SVDConfig):
    """ASVD (Yuan et al., 2023): SVD of ``W · diag(mean|x|^α)``."""

    alpha: float = field(0.5, "exponent α of the activation scaling S = diag(mean|x|^α) (0 gives plain SVD)",
                         minimum=0.0)


@dataclasses.dataclass
class SVDLLMConfig(SVDConfig):
    """SVD-LLM (Wang et al., ICLR 2025): SVD of ``W S`` with ``S`` the Cholesky factor of ``X Xᵀ``."""

    damping: float = field(1e-6, "when X Xᵀ is not positive definite, λ = max(0, -λ_min) + damping · "
                                 "mean(diag X Xᵀ) is added to its diagonal", minimum=0.0, exclusive_minimum=True)


# ---- the factored layer -------------------------------------------------------------------------


class LowRankLinear(nn.Module):
    """``y = B (A x) + b``: a rank-``r`` linear map, ``A`` (``r x d_in``) then ``B`` (``d_out x r``)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        # skip_init: the factors are always overwritten (from an SVD or a checkpoint).
        device = device if device is not None else "cpu"
        self.A = nn.utils.skip_init(nn.Linear, in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.utils.skip_init(nn.Linear, rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))  # (..., d_in) -> (..., r) -> (..., d_out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.B.bias is not None}")


@io.register_rebuilder("lowrank")
def _rebuild(original: nn.Module, spec: dict[str, Any]) -> LowRankLinear:
    d_in, d_out = arch.linear_shape(original)
    if (spec.get("in_features"), spec.get("out_features")) != (d_in, d_out):
        raise UserError(f"low-rank entry {spec} does not match the model's layer of shape {d_in} -> {d_out}")
    ref = original.weight
    return LowRankLinear(d_in, d_out, int(spec["rank"]), bool(spec["bias"]), device=ref.device, dtype=ref.dtype)


# ---- the math -----------------------------------------------------------------------------------


class Transform:
    """The identity input transform ``T = I`` of plain SVD: factor ``W T``, then ``A ← A T⁻¹``."""

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W

    def inverse(self, A: torch.Tensor) -> torch.Tensor:
        return A


class DiagonalScaling(Transform):
    """ASVD: ``T = diag(s)`` scales input channel ``j`` by ``s_j``."""

    def __init__(self, s: torch.Tensor):
        self.s = s.to(torch.float64)  # (d_in,)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W * self.s.to(W.device)  # (d_out, d_in)

    def inverse(self, A: torch.Tensor) -> torch.Tensor:
        return A / self.s.to(A.device)  # (r, d_in)


class Whitening(Transform):
    """SVD-LLM: ``T = S`` lower-triangular with ``S Sᵀ = X Xᵀ`` (+ damping)."""

    def __init__(self, S: torch.Tensor, damping: float = 0.0):
        self.S = S.to(torch.float64)  # (d_in, d_in), lower triangular
        self.damping = damping

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W @ self.S.to(W.device)  # (d_out, d_in)

    def inverse(self, A: torch.Tensor) -> torch.Tensor:
        # A S⁻¹ by a triangular solve X S = A: cheaper and more accurate than forming S⁻¹.
        return torch.linalg.solve_triangular(self.S.to(A.device), A, upper=False, left=False)  # (r, d_in)


def asvd_scales(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's channel scales ``s_j = (mean |x_j|)^α`` (zero channels clamped, see the module docstring)."""
    m = abs_mean.to(torch.float64)  # (d_in,)
    floor = ASVD_EPS * float(m.max()) if float(m.max()) > 0 else 1.0
    return m.clamp_min(floor) ** alpha


def whitening_matrix(gram: torch.Tensor, damping: float = 1e-6) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor ``S`` of ``X Xᵀ`` (``gram``), and the ``λ`` added to make it positive definite."""
    G = gram.to(torch.float64)  # (d_in, d_in)
    G = (G + G.T) / 2  # float32 accumulation may leave it asymmetric in the last bit
    S, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return S, 0.0
    mean_diag = float(G.diagonal().mean())
    lam = max(0.0, -float(torch.linalg.eigvalsh(G)[0])) + damping * (mean_diag if mean_diag > 0 else 1.0)
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    for _ in range(20):  # eigvalsh is itself approximate: grow λ until the factorisation succeeds
        S, info = torch.linalg.cholesky_ex(G + lam * eye)
        if int(info) == 0:
            return S, lam
        lam *= 10
    raise UserError("the calibration Gram matrix could not be made positive definite (non-finite activations?)")


def factorize(W: torch.Tensor, rank: int, transform: Transform | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, σ)`` with ``B A`` the rank-``rank`` approximation of ``W`` (``d_out x d_in``) under ``transform``.

    ``A`` is ``(rank, d_in)``, ``B`` is ``(d_out, rank)``, both float64; ``σ`` are all singular values
    of the transformed matrix ``W T``, largest first.
    """
    transform = transform or Transform()
    M = transform.forward(W.to(torch.float64))  # (d_out, d_in)
    U, sigma, Vh = torch.linalg.svd(M, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    root = sigma[:rank].sqrt()  # (r,)
    A = transform.inverse(root[:, None] * Vh[:rank])  # (r, d_in)
    B = U[:, :rank] * root[None, :]  # (d_out, r)
    return A, B, sigma


def uniform_rank(ratio: float, d_in: int, d_out: int) -> int:
    """The largest rank whose factors hold at most ``ratio`` of the dense layer's weights."""
    return math.floor(ratio * d_in * d_out / (d_in + d_out))


def break_even_rank(d_in: int, d_out: int) -> int:
    """The largest ``r`` with ``r (d_in + d_out) < d_in d_out``: above it the layer stays dense."""
    return (d_in * d_out - 1) // (d_in + d_out)


def allocate_global(spectra: list[torch.Tensor], shapes: list[tuple[int, int]], budget: int) -> list[int | None]:
    """Ranks that fit ``budget`` weights, by the global greedy of the module docstring.

    ``spectra[l]`` are layer ``l``'s singular values (largest first), ``shapes[l] = (d_in, d_out)``.
    Returns each layer's rank, or ``None`` for a layer left dense.
    """
    costs = [d_in + d_out for d_in, d_out in shapes]
    dense = [d_in * d_out for d_in, d_out in shapes]
    r_max = [break_even_rank(d_in, d_out) for d_in, d_out in shapes]
    used = sum(costs)  # rank 1 everywhere
    if used > budget:
        raise UserError(f"a budget of {budget:,} parameters cannot keep rank 1 in each of the {len(shapes)} targeted "
                        f"layers ({used:,} needed)")
    scores, layer_of, index_of = [], [], []
    for l, sigma in enumerate(spectra):
        energy = sigma.to(torch.float64) ** 2  # (k,)
        total = float(energy.sum())
        share = energy / total if total > 0 else torch.zeros_like(energy)
        scores.append(share[1:] / costs[l])  # component 0 (rank 1) is always kept
        layer_of.append(torch.full((len(energy) - 1,), l, dtype=torch.long))
        index_of.append(torch.arange(1, len(energy)))
    score = torch.cat(scores)
    layer = torch.cat(layer_of)
    index = torch.cat(index_of)
    # Highest score first; ties by layer then index, so each layer's components come in order.
    order = sorted(range(len(score)), key=lambda j: (-float(score[j]), int(layer[j]), int(index[j])))
    ranks = [1] * len(shapes)
    closed = [False] * len(shapes)
    for j in order:
        l = int(layer[j])
        if closed[l]:
            continue
        k = ranks[l]
        if k < r_max[l]:
            step = costs[l]
        elif k == r_max[l]:
            step = dense[l] - r_max[l] * costs[l]  # to dense: the rest of the layer comes free
        else:
            step = 0
        if used + step > budget:
            closed[l] = True
            continue
        used += step
        ranks[l] = k + 1
    return [r if r <= r_max[l] else None for l, r in enumerate(ranks)]


# ---- planning (all checks happen here, before any weight is touched) ----------------------------


@dataclasses.dataclass
class _Layer:
    name: str
    module: nn.Module
    layer: int
    d_in: int
    d_out: int
    bias: bool
    rank: int | None = None
    """Planned rank; ``None`` leaves the layer dense."""
    reason: str = ""
    """Why the layer stays dense."""

    @property
    def dense(self) -> int:
        return self.d_in * self.d_out

    @property
    def cost(self) -> int:
        return self.d_in + self.d_out


def _plan(model: nn.Module, config: SVDConfig, method: str) -> list[_Layer]:
    targets = arch.resolve(model, config.targets, config.layers, config.exclude)
    fam = arch.family_of(model)
    groups: dict[int, list[arch.Target]] = {}
    for t in targets:
        groups.setdefault(id(t.module), []).append(t)
    plan = []
    for group in groups.values():
        t = group[0]
        if t.layer is None:
            raise UserError(f"{method}: {t.name} is not inside a decoder block; only the blocks' linear layers are "
                            "factored (embeddings and the LM head are left as they are)")
        parent = t.name.rpartition(".")[0]
        inside = bool(parent) and isinstance(model.get_submodule(parent), LowRankLinear)
        if inside or isinstance(t.module, LowRankLinear) or not (isinstance(t.module, nn.Linear)
                                                                 or arch.is_conv1d(t.module)):
            what = "a factor of a LowRankLinear" if inside else f"a {type(t.module).__name__}"
            raise UserError(f"{method}: {t.name} is {what}, not a dense linear layer of the original model (already "
                            "factored?); factor the original model")
        roles = {x.role for x in group if x.out_index is not None}
        if roles and roles != {"q", "k", "v"}:
            raise UserError(f"{method}: on {fam.name} q, k and v are one fused matrix ({t.name}); it is factored as a "
                            f"whole, so target all of q,k,v (or none), not only {','.join(sorted(roles))}")
        d_in, d_out = arch.linear_shape(t.module)
        plan.append(_Layer(t.name, t.module, t.layer, d_in, d_out, t.module.bias is not None))
    if config.rank is not None:
        too_big = [L for L in plan if config.rank > min(L.d_in, L.d_out)]
        if too_big:
            L = too_big[0]
            raise ConfigError(f"{type(config).__name__}.rank = {config.rank} exceeds min(d_in, d_out) = "
                              f"{min(L.d_in, L.d_out)} of {L.name} ({L.d_out} x {L.d_in}); allowed: 1.."
                              f"{min(min(x.d_in, x.d_out) for x in plan)} for these targets")
        for L in plan:
            _set_rank(L, config.rank)
        return plan
    ratio = config.target_ratio
    if config.allocation == "uniform":
        for L in plan:
            r = uniform_rank(ratio, L.d_in, L.d_out)
            if r < 1:
                need = max(x.cost / x.dense for x in plan)
                raise ConfigError(f"{type(config).__name__}.ratio = {ratio} leaves rank 0 for {L.name} ({L.d_out} x "
                                  f"{L.d_in}: one rank costs {L.cost} of {L.dense} weights); uniform allocation needs "
                                  f"ratio >= {need:.4g} for these targets (or use allocation=global or rank)")
            if ratio >= 1.0:
                L.rank, L.reason = None, "ratio 1 keeps every layer dense"
            else:
                _set_rank(L, r)
    else:
        budget = math.floor(ratio * sum(L.dense for L in plan))
        need = sum(L.cost for L in plan)
        if need > budget:
            raise ConfigError(f"{type(config).__name__}.ratio = {ratio} gives a budget of {budget:,} weights, less than "
                              f"the {need:,} that rank 1 in each of the {len(plan)} targeted layers needs; "
                              f"ratio must be >= {need / sum(L.dense for L in plan):.4g} for these targets")
    return plan


def _set_rank(L: _Layer, r: int) -> None:
    if r * L.cost >= L.dense:
        L.rank = None
        L.reason = (f"rank {r} would hold {r * L.cost} weights, not fewer than the dense {L.dense} "
                    f"(factoring pays only below rank {break_even_rank(L.d_in, L.d_out) + 1})")
    else:
        L.rank, L.reason = r, ""


# ---- applying -----------------------------------------------------------------------------------


def _replace(model: nn.Module, L: _Layer, transform: Transform, info: dict[str, Any]) -> dict[str, Any]:
    """Factor ``L`` at its planned rank and swap in the :class:`LowRankLinear` (or record it dense)."""
    W = arch.linear_weight(L.module).detach()  # (d_out, d_in)
    entry = {"in_features": L.d_in, "out_features": L.d_out, "parameters_before": L.dense, **info}
    if L.rank is None:
        entry.update(factored=False, rank=None, parameters_after=L.dense, reason=L.reason)
        return entry
    A, B, sigma = factorize(W, L.rank, transform)
    energy = sigma**2
    total = float(energy.sum())
    new = LowRankLinear(L.d_in, L.d_out, L.rank, bias=L.bias, device=W.device, dtype=W.dtype)
    new.A.weight.copy_(A.to(W.dtype))
    new.B.weight.copy_(B.to(W.dtype))
    if L.bias:
        new.B.bias.copy_(L.module.bias.detach())
    grad = L.module.weight.requires_grad
    for p in new.parameters():
        p.requires_grad_(grad)
    io.set_module(model, L.name, new)
    entry.update(factored=True, rank=L.rank, parameters_after=L.rank * L.cost,
                 energy_kept=float(energy[: L.rank].sum()) / total if total > 0 else 1.0,
                 dropped_sigma_norm=float(energy[L.rank:].sum().sqrt()))
    return entry


def _transform(method: str, config: SVDConfig, stats) -> tuple[Transform, dict[str, Any]]:
    if method == "asvd":
        return DiagonalScaling(asvd_scales(stats.abs_mean, config.alpha)), {}
    if method == "svd_llm":
        S, lam = whitening_matrix(stats.gram, config.damping)
        return Whitening(S, lam), {"damping": lam}
    return Transform(), {}


@torch.no_grad()
def _compress(method: str, model: nn.Module, config: SVDConfig, windows: torch.Tensor | None,
              progress: bool) -> CompressionResult:
    config.validate()
    calibrated = method != "svd"
    if calibrated and windows is None:
        raise UserError(f"{method} needs calibration windows (apply(model, config, windows=...)); the compress "
                        "command draws them from --calib-data")
    plan = _plan(model, config, method)
    size_before = parameter_bytes(model)
    by_name = {L.name: L for L in plan}
    per_layer: dict[str, dict[str, Any]] = {}
    notes: list[str] = []

    if config.rank is None and config.allocation == "global":
        spectra: dict[str, torch.Tensor] = {}
        if calibrated:
            def measure(i, block, stats, inputs):
                for name, st in stats.items():
                    if name in by_name:
                        t, _ = _transform(method, config, st)
                        spectra[name] = torch.linalg.svdvals(t.forward(arch.linear_weight(by_name[name].module)
                                                                        .to(torch.float64)))
            _run_sequential(model, windows, measure, method, plan, progress)
            _check_reached(method, plan, spectra)
            notes.append("global allocation: ranks chosen from the dense model's calibration statistics, "
                         "then applied block by block on the sequentially compressed model")
        else:
            for L in plan:
                spectra[L.name] = torch.linalg.svdvals(arch.linear_weight(L.module).to(torch.float64))
        budget = math.floor(config.target_ratio * sum(L.dense for L in plan))
        ranks = allocate_global([spectra[L.name] for L in plan], [(L.d_in, L.d_out) for L in plan], budget)
        for L, r in zip(plan, ranks):
            if r is None:
                L.rank, L.reason = None, "global allocation kept every singular value: dense is cheaper"
            else:
                L.rank, L.reason = r, ""

    if calibrated:
        def compress_block(i, block, stats, inputs):
            for name, st in stats.items():
                L = by_name.get(name)
                if L is not None:
                    t, info = _transform(method, config, st) if L.rank is not None else (Transform(), {})
                    per_layer[name] = _replace(model, L, t, info)
        _run_sequential(model, windows, compress_block, method, plan, progress)
        _check_reached(method, plan, per_layer)
        damped = [n for n, e in per_layer.items() if e.get("damping")]
        if damped:
            notes.append(f"{len(damped)} layer(s) had a singular calibration Gram matrix and were whitened with "
                         "damping (per_layer 'damping'); their truncation loss only approximates the dropped σ")
    else:
        from tqdm.auto import tqdm

        for L in tqdm(plan, desc=method, unit="layer", disable=not progress, leave=False):
            per_layer[L.name] = _replace(model, L, Transform(), {})

    modules = {L.name: {"kind": "lowrank", "rank": L.rank, "in_features": L.d_in, "out_features": L.d_out,
                        "bias": L.bias} for L in plan if L.rank is not None}
    # Measured on the modules now in the model, not from the planned ranks.
    after = 0
    for L in plan:
        m = model.get_submodule(L.name)
        after += m.A.weight.numel() + m.B.weight.numel() if isinstance(m, LowRankLinear) else m.weight.numel()
    before = sum(L.dense for L in plan)
    size_after = parameter_bytes(model)
    factored = [L for L in plan if L.rank is not None]
    achieved = {
        "ratio": after / before,
        "matrix_parameters_before": before,
        "matrix_parameters_after": after,
        "parameters_before": size_before["parameters"],
        "parameters_after": size_after["parameters"],
        "bytes_before": size_before["bytes"],
        "bytes_after": size_after["bytes"],
        "factored_layers": len(factored),
        "dense_layers": len(plan) - len(factored),
    }
    if factored:
        achieved["mean_rank"] = sum(L.rank for L in factored) / len(factored)
    notes.append("each factored layer runs as two matmuls, x -> A x (r) -> B (A x) + b; ratio counts the targeted "
                 "weight matrices only (biases, embeddings and the LM head are unchanged)")
    return CompressionResult(method=method, achieved=achieved, modules=modules, per_layer=per_layer, notes=notes)


def _run_sequential(model, windows, fn, method: str, plan: list[_Layer], progress: bool) -> None:
    from efficientgpt.compress.calibration import run_sequential

    # run_sequential resolves its roles per block and refuses a block where they match nothing, so
    # "all-linear" keeps every block non-empty; the planned paths add any target outside the roles.
    roles = ("all-linear", *sorted({L.name for L in plan}))
    run_sequential(model, windows, fn, roles=roles, gram=(method == "svd_llm"), progress=progress)


def _check_reached(method: str, plan: list[_Layer], done) -> None:
    missed = [L.name for L in plan if L.name not in done]
    if missed:  # a target the per-block calibration hooks never saw
        raise UserError(f"{method}: no calibration statistics reached {', '.join(missed[:4])}")


def apply_svd(model: nn.Module, config: SVDConfig, progress: bool = False) -> CompressionResult:
    return _compress("svd", model, config, None, progress)


def apply_asvd(model: nn.Module, config: ASVDConfig, windows: torch.Tensor | None = None,
               progress: bool = False) -> CompressionResult:
    return _compress("asvd", model, config, windows, progress)


def apply_svd_llm(model: nn.Module, config: SVDLLMConfig, windows: torch.Tensor | None = None,
                  progress: bool = False) -> CompressionResult:
    return _compress("svd_llm", model, config, windows, progress)


SVD_SPEC = registry.register(registry.MethodSpec(
    name="svd", family="lowrank", config_cls=SVDConfig, apply=apply_svd, paper="denton-low-rank",
    summary="truncated SVD of each linear layer into two smaller ones, W ≈ B A (Denton et al., NeurIPS 2014)",
))
ASVD_SPEC = registry.register(registry.MethodSpec(
    name="asvd", family="lowrank", config_cls=ASVDConfig, apply=apply_asvd, paper="asvd", calibration=True,
    summary="activation-aware SVD: SVD of W·diag(mean|x|^α), then undo the scaling (Yuan et al., 2023)",
))
SVD_LLM_SPEC = registry.register(registry.MethodSpec(
    name="svd_llm", family="lowrank", config_cls=SVDLLMConfig, apply=apply_svd_llm, paper="svd-llm",
    calibration=True,
    summary="truncation-aware whitened SVD: SVD of W·chol(XXᵀ), loss = dropped σ (Wang et al., ICLR 2025)",
))
