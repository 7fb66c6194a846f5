"""SparseGPT: one-shot pruning with second-order weight reconstruction (unstructured or N:M, optional joint quantization).

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023.

Each linear layer ``W`` (``d_row x d_col``, ``nn.Linear`` orientation; GPT-2's ``Conv1D`` is transposed
on read and write) is pruned to minimise the layer-wise reconstruction error ``‖W X − Ŵ X‖²`` on the
calibration inputs ``X`` (§2, Eq. 1). The Hessian of that error is ``H = 2 X Xᵀ / n``
(``InputStats.hessian()``), dampened by ``λ = damp · mean(diag H)`` (the official code's ``percdamp``,
1 % by default). Algorithm 1 (§3) visits the columns left to right. For column ``j`` let
``F_j = {j, ..., d_col − 1}``; setting ``w_j`` to ``q_j`` in every row (0 when pruned) is followed by
the optimal-brain-surgeon update of the columns still to come (§3, "Equivalent Iterative
Perspective")::

    δ_{F_j} = −(w_j − q_j) / [H_{F_j}⁻¹]_jj · [H_{F_j}⁻¹]_{j,:}

The rows ``[H_{F_j}⁻¹]_{j,:} / √[H_{F_j}⁻¹]_jj`` are exactly the rows of the upper Cholesky factor ``U``
of ``H⁻¹``, computed once ("Hessian Synchronization"). Updates are applied lazily: column by column
inside a block of ``block_size`` columns, and to the columns after the block once per block (the lazy
batch updates of GPTQ, Frantar et al., ICLR 2023, that Algorithm 1 uses; the result equals updating
every column at once).

Mask selection (§3, "Adaptive Mask Selection"): at the start of every block of ``block_size``
columns (``B_s = 128`` in the paper) the weights of that block with the lowest OBS saliency
``w² / [U]_jj² = w² / [H_{F_j}⁻¹]_jj`` are pruned, on the weights already updated by the earlier
blocks. For N:M ("Semi-Structured Sparsity"), the ``M − N`` lowest-saliency weights of each row are
pruned in every group of M consecutive columns, chosen when the column loop reaches the group.

Joint quantization ("Joint Sparsification & Quantization"): with ``bits > 0`` every weight
that stays is rounded on a min-max grid (:class:`~efficientgpt.compress.quant_grid.QuantGrid`: per
output row fitted on the whole matrix before pruning, or per ``group_size`` columns fitted on the
updated weights when the loop reaches the group, as in GPTQ) and the quantization error is propagated
like the pruning error. The weights are stored dequantized in the model's float dtype (simulated
quantization; no packed format). A kept weight may round to 0, so with ``bits > 0`` the achieved sparsity
can exceed the requested one (an N:M group then holds at most N nonzeros); it is reported as measured.

Departures from the official code (IST-DASLab/sparsegpt, ``SparseGPT.fasterprune``):

* Exact counts: the official code prunes every weight at or below the ``int(s·n)``-th saliency of a
  block, which removes at least one weight more than asked; here exactly
  ``round(s·d_row·i₂) − round(s·d_row·i₁)`` weights of block ``[i₁, i₂)`` are pruned (``topk``), so each
  matrix ends with exactly ``round(s·d_row·d_col)`` zeros.
* Dead inputs (``H_jj = 0``: feature ``j`` is zero on every calibration token) get ``H_jj = 1`` as in
  the official code, but their weights are not zeroed outright on top of the requested count: they are
  pruned first (lowest saliency) *within* it, so the achieved sparsity stays exact. Their removal costs
  nothing on the calibration data either way.
* The block size must be a multiple of M (N:M) and of ``group_size`` (joint quantization), so that no
  group straddles two blocks; the official code silently truncates such groups.
* ``bits`` uses an asymmetric grid by default as the official code (``sym=False``), per output row
  unless ``group_size`` is set.

A fused q/k/v projection is one matrix (one Hessian, one input): it is pruned as one matrix.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from efficientgpt import registry
from efficientgpt.compress.prune import (
    Pattern,
    PruneConfig,
    PruneTarget,
    build_result,
    calibration_roles,
    check_windows,
    layer_entry,
    prune_count,
    resolve_targets,
)
from efficientgpt.compress.quant_grid import SUPPORTED_BITS, QuantGrid
from efficientgpt.compress.report import CompressionResult
from efficientgpt.config import field
from efficientgpt.errors import ConfigError, UserError


@dataclasses.dataclass
class SparseGPTConfig(PruneConfig):
    """SparseGPT hyperparameters (Frantar & Alistarh, 2023)."""

    block_size: int = field(128, "columns per lazy batch update (SparseGPT also picks its unstructured mask per "
                                 "block, B_s)", minimum=1)
    damp: float = field(0.01, "dampening λ as a fraction of the mean Hessian diagonal", minimum=0.0)
    bits: int = field(0, "bits per weight (SparseGPT: 0 = no joint quantization; else 2, 3, 4 or 8)")
    symmetric: bool = field(False, "symmetric grid (zero point 2^(bits-1)) instead of asymmetric min-max")
    group_size: int = field(0, "input columns sharing one scale (0: one scale per output channel)", minimum=0)

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.bits not in (0, *SUPPORTED_BITS):
            raise ConfigError(f"{name}.bits = {self.bits!r} is not allowed; choose 0 (off) or one of "
                              f"{', '.join(map(str, SUPPORTED_BITS))}")
        pattern = self.pattern
        if pattern.is_nm and self.block_size % pattern.m:
            raise ConfigError(f"{name}.block_size = {self.block_size} is not a multiple of M = {pattern.m} "
                              f"(sparsity {pattern}); an N:M group must not straddle two blocks")
        if self.group_size:
            if not self.bits:
                raise ConfigError(f"{name}.group_size = {self.group_size} needs joint quantization (bits > 0)")
            if self.block_size % self.group_size:
                raise ConfigError(f"{name}.group_size = {self.group_size} does not divide block_size = "
                                  f"{self.block_size}; a quantization group must not straddle two blocks")

    def grid(self) -> QuantGrid | None:
        return QuantGrid(self.bits, symmetric=self.symmetric) if self.bits else None


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``H⁻¹ = Uᵀ U``), ``(d_col, d_col)``, float32.

    Dead inputs (``H_jj = 0``) get ``H_jj = 1`` so that ``H`` stays invertible.
    """
    H = H.float().clone()  # (d_col, d_col)
    diag = H.diagonal()
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise UserError(f"the calibration Hessian is not positive definite even after dampening "
                        f"(damp = {damp}); raise --damp or calibrate on more tokens")
    Hinv = torch.cholesky_inverse(L)  # (d_col, d_col)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if info.item() != 0:
        raise UserError(f"the inverse calibration Hessian is numerically singular (damp = {damp}); "
                        "raise --damp")
    return U


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, block_size: int = 128,
                    damp: float = 0.01, grid: QuantGrid | None = None,
                    group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 on one matrix: returns the pruned (and optionally quantized) ``Ŵ`` and the error per row.

    ``W`` is ``(d_row, d_col)`` and ``H`` is ``(d_col, d_col)``. The error per row is
    ``Σ_j (w_j − q_j)² / (2 [H_{F_j}⁻¹]_jj)``, the OBS estimate of the increase of the reconstruction loss.
    """
    W = W.float().clone()  # (d_row, d_col)
    d_row, d_col = W.shape
    H = H.to(W.device)
    # Inputs that are zero on every calibration token: their weights cost nothing to remove.
    dead = H.diagonal() == 0  # (d_col,)
    U = inverse_hessian_factor(H, damp)  # (d_col, d_col)
    losses = torch.zeros(d_row, device=W.device)
    scale = zero = None
    if grid is not None and not group_size:
        scale, zero = grid.fit(W)  # (d_row, 1): one grid per output row, from the unpruned weights
    if pattern.is_nm:
        n_drop = pattern.m - pattern.n
    else:
        def cumulative(col: int) -> int:
            return prune_count(pattern.fraction, d_row * col)

    for i1 in range(0, d_col, block_size):
        i2 = min(i1 + block_size, d_col)
        W1 = W[:, i1:i2].clone()  # (d_row, B)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]  # (B, B)
        d = U1.diagonal()  # (B,): √[H_{F_j}⁻¹]_jj
        pruned = torch.zeros_like(W1, dtype=torch.bool)  # (d_row, B)
        if not pattern.is_nm:
            k = cumulative(i2) - cumulative(i1)
            if k:
                saliency = (W1.square() / d.square()[None, :]).masked_fill(dead[None, i1:i2], -1.0)  # (d_row, B)
                pruned.view(-1)[torch.topk(saliency.reshape(-1), k, largest=False).indices] = True
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0 and n_drop:
                cols = slice(i, i + pattern.m)
                saliency = (W1[:, cols].square() / d[cols].square()[None, :]).masked_fill(
                    dead[None, i1 + i : i1 + i + pattern.m], -1.0)  # (d_row, M)
                pruned[:, i : i + pattern.m].scatter_(1, torch.topk(saliency, n_drop, dim=1, largest=False).indices,
                                                      True)
            if grid is not None and group_size and (i1 + i) % group_size == 0:
                scale, zero = grid.fit(W1[:, i : i + group_size])  # (d_row, 1), on the updated weights
            w = W1[:, i]  # (d_row,)
            q = w.masked_fill(pruned[:, i], 0.0)
            if grid is not None:
                # A pruned weight is 0 on the grid too (0 is exactly representable), so it stays pruned.
                q = grid.fake_quant(q[:, None], scale, zero)[:, 0]
            Q1[:, i] = q
            losses += (w - q).square() / d[i].square() / 2
            err = (w - q) / d[i]  # (d_row,)
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)  # rank-1 OBS update of the block's remaining columns
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy update of the columns after the block
    return W, losses


def _check_groups(targets: list[PruneTarget], group_size: int) -> None:
    if not group_size:
        return
    bad = [f"{t.name} ({t.shape[1]})" for t in targets if t.shape[1] % group_size]
    if bad:
        raise ConfigError(f"SparseGPTConfig.group_size = {group_size} does not divide the input features of "
                          f"{', '.join(bad[:4])}; use a divisor of them or 0 for one grid per output row")


@torch.no_grad()
def apply(model: nn.Module, config: SparseGPTConfig, windows: torch.Tensor | None = None,
          progress: bool = False) -> CompressionResult:
    from efficientgpt.compress.calibration import run_sequential

    config.validate()
    check_windows("sparsegpt", windows)
    targets = resolve_targets(model, config, in_blocks=True)
    _check_groups(targets, config.group_size)
    roles = calibration_roles(model, config, targets)
    pattern = config.pattern
    grid = config.grid()
    by_layer: dict[int, list[PruneTarget]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    per_layer = {}

    def compress_block(i, block, stats, inputs):
        for t in by_layer.get(i, []):
            W_hat, losses = sparsegpt_prune(t.read(), stats[t.name].hessian(), pattern, config.block_size,
                                            config.damp, grid, config.group_size)
            t.write(W_hat)
            per_layer[t.name] = layer_entry(t, {"obs_error": float(losses.sum().item())})

    run_sequential(model, windows, compress_block, roles=roles, gram=True, progress=progress)
    notes = [f"calibrated on {windows.shape[0]} windows of {windows.shape[1]} tokens"]
    if grid is not None:
        notes.append(f"kept weights quantized on a {config.bits}-bit "
                     f"{'symmetric' if config.symmetric else 'asymmetric'} grid "
                     f"({'per group of ' + str(config.group_size) if config.group_size else 'per output row'}), "
                     "stored dequantized in the model's float dtype")
    result = build_result("sparsegpt", model, config, per_layer, notes)
    if grid is not None:
        result.achieved["bits"] = config.bits
    return result


SPEC = registry.register(registry.MethodSpec(
    name="sparsegpt", family="prune", config_cls=SparseGPTConfig, apply=apply, paper="sparsegpt",
    summary="prune with OBS weight updates from the calibration Hessian (unstructured or N:M, optional bits)",
    calibration=True,
))
