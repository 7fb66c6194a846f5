"""Uniform min-max quantization grid for weight matrices (per output channel, optionally per group of inputs).

The grid follows the min-max ``Quantizer`` of the GPTQ reference code (Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023), used there for round-to-nearest
and inside GPTQ's column loop. Codes are unsigned integers ``q`` in ``[0, 2^b - 1]`` and a weight is represented
as ``w_hat = scale * (q - zero)``.

Exact definitions (per output row, and per group of ``group_size`` consecutive input columns when set):

* **asymmetric** (as in the reference code): the range is widened to contain 0, ``lo = min(min w, 0)``,
  ``hi = max(max w, 0)``; ``scale = (hi - lo) / (2^b - 1)``; ``zero = round(-lo / scale)`` (an integer in
  ``[0, 2^b - 1]``, so 0 is exactly representable).
* **symmetric**: ``scale = max|w| / (2^(b-1) - 1)``, ``zero = 2^(b-1)``. Departure from the reference code,
  which uses ``scale = 2 max|w| / (2^b - 1)`` and so clips the positive extreme (``+max|w|`` lands half a step
  above the top code ``2^b - 1``): here ``±max|w|`` are exactly on the grid, at the cost of leaving code 0
  (``-2^(b-1)``) unused, the usual "restricted range" convention of int8 kernels (int8 values in [-127, 127]).
* A row/group whose weights are all zero gets the range ``[-1, 1]`` (reference code) so ``scale > 0``.

``quantize`` is ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``; every weight inside the fitted range is
then within ``scale / 2`` of its reconstruction. ``scale_dtype`` (e.g. ``torch.float16``) rounds the fitted
scale to the dtype it will be stored in *before* any code is computed, so the codes are optimal for the grid
that is actually saved.

Groups: input column ``j`` belongs to group ``j // group_size``. When ``group_size`` does not divide ``d_in``
the last group is shorter (``d_in mod group_size`` columns), as in the reference code, whose loop fits the grid
on ``W[:, i : i + groupsize]``; a ``group_size`` of at least ``d_in`` is one group per row (per channel).

Shapes: ``w`` is ``(d_out, d_in)``; ``scale`` and ``zero`` are ``(d_out, n_groups)`` float32 tensors with
``n_groups = ceil(d_in / group_size)`` (1 when ``group_size`` is None); ``zero`` holds integer values (float so
that ``q - zero`` never wraps around as unsigned arithmetic would). Codes are ``torch.uint8``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from efficientgpt.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    """Raise a :class:`ConfigError` unless ``bits`` is one of :data:`SUPPORTED_BITS`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits = {bits!r} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")


def num_groups(d_in: int, group_size: int | None) -> int:
    """Groups per row: ``ceil(d_in / group_size)``, 1 without groups."""
    return -(-d_in // group_size) if group_size else 1


class QuantGrid:
    """Min-max uniform grid with ``bits`` bits, symmetric or asymmetric, per channel or per group."""

    def __init__(self, bits: int, symmetric: bool = True, group_size: int | None = None,
                 scale_dtype: torch.dtype = torch.float32):
        check_bits(bits)
        if group_size is not None and (isinstance(group_size, bool) or group_size < 0):
            raise ConfigError(f"group_size = {group_size!r} must be a positive integer, or 0/None for per-channel")
        self.bits = bits
        self.symmetric = symmetric
        self.group_size = group_size or None
        self.scale_dtype = scale_dtype
        self.maxq = 2 ** bits - 1

    def __repr__(self) -> str:
        return (f"QuantGrid(bits={self.bits}, symmetric={self.symmetric}, group_size={self.group_size}, "
                f"scale_dtype={self.scale_dtype})")

    def _groups(self, w: Tensor) -> Tensor:
        if w.dim() != 2:
            raise ValueError(f"expected a (d_out, d_in) matrix, got shape {tuple(w.shape)}")
        d_out, d_in = w.shape
        g = min(self.group_size or d_in, d_in)
        n = num_groups(d_in, g)
        w = w.float()
        if n * g != d_in:  # ragged last group: repeating its last column leaves its min and max unchanged
            w = torch.cat([w, w[:, -1:].expand(d_out, n * g - d_in)], dim=1)
        return w.reshape(d_out, n, g)  # (d_out, n_groups, g)

    def fit(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Min-max ``(scale, zero)`` of shape ``(d_out, n_groups)`` for ``w`` of shape ``(d_out, d_in)``."""
        wg = self._groups(w)  # (d_out, n_groups, g)
        if self.symmetric:
            amax = wg.abs().amax(dim=-1)  # (d_out, n_groups)
            amax = torch.where(amax == 0, torch.ones_like(amax), amax)
            scale = self._round_scale(amax / (2 ** (self.bits - 1) - 1))
            zero = torch.full_like(scale, float(2 ** (self.bits - 1)))
            return scale, zero
        lo = wg.amin(dim=-1).clamp(max=0)  # (d_out, n_groups)
        hi = wg.amax(dim=-1).clamp(min=0)
        empty = (lo == 0) & (hi == 0)
        lo = torch.where(empty, -torch.ones_like(lo), lo)
        hi = torch.where(empty, torch.ones_like(hi), hi)
        scale = self._round_scale((hi - lo) / self.maxq)
        zero = torch.round(-lo / scale).clamp(0, self.maxq)
        return scale, zero

    def _round_scale(self, scale: Tensor) -> Tensor:
        if self.scale_dtype == torch.float32:
            return scale
        tiny = torch.finfo(self.scale_dtype).tiny
        return scale.clamp(min=tiny).to(self.scale_dtype).float()

    def expand(self, t: Tensor, d_in: int) -> Tensor:
        """Per-group ``(d_out, n_groups)`` values broadcast to the ``(d_out, d_in)`` columns of their groups."""
        if t.shape[1] == 1:
            return t.float().expand(t.shape[0], d_in)
        if t.shape[1] != num_groups(d_in, self.group_size):
            raise ValueError(f"{t.shape[1]} groups do not fit {d_in} columns in groups of {self.group_size}")
        return t.float().repeat_interleave(self.group_size, dim=1)[:, :d_in]  # (d_out, d_in)

    def quantize(self, w: Tensor, scale: Tensor | None = None, zero: Tensor | None = None) -> Tensor:
        """uint8 codes ``(d_out, d_in)``; fits ``scale``/``zero`` on ``w`` when they are not given."""
        if scale is None or zero is None:
            scale, zero = self.fit(w)
        d_in = w.shape[1]
        q = torch.round(w.float() / self.expand(scale, d_in)) + self.expand(zero, d_in)
        return q.clamp_(0, self.maxq).to(torch.uint8)

    def dequantize(self, codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """float32 ``scale * (codes - zero)``, with ``(d_out, n_groups)`` scale/zero broadcast over groups."""
        d_in = codes.shape[1]
        return (codes.float() - self.expand(zero, d_in)) * self.expand(scale, d_in)

    def encode(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(codes, scale, zero)`` for ``w``."""
        scale, zero = self.fit(w)
        return self.quantize(w, scale, zero), scale, zero

    def fake_quant(self, w: Tensor, scale: Tensor | None = None, zero: Tensor | None = None) -> Tensor:
        """``dequantize(quantize(w))`` in ``w``'s dtype (fits ``scale``/``zero`` on ``w`` when not given)."""
        if scale is None or zero is None:
            scale, zero = self.fit(w)
        return self.dequantize(self.quantize(w, scale, zero), scale, zero).to(w.dtype)
