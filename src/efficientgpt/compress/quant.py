"""Weight-only quantization: round-to-nearest (RTN) and GPTQ, stored packed, run on the CPU.

**RTN** rounds every weight to the nearest point of a min-max grid (:mod:`.quant_grid`), per output channel
or per group of ``group_size`` input columns; no data is needed. It is the baseline of the GPTQ paper (§2, §5)
and the weight quantizer of ZeroQuant (Yao et al., "ZeroQuant: Efficient and Affordable Post-Training
Quantization for Large-Scale Transformers", NeurIPS 2022, §4.1, group-wise weight quantization), the survey
entry RTN is filed under: RTN has no paper of its own.

**GPTQ** (Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023) quantizes a layer's weight ``W`` (``d_out x d_in``) one input column at a
time and spreads each column's rounding error over the columns not yet quantized, minimising the layer-wise
reconstruction error ``‖W X - Ŵ X‖²`` (Eq. 1) with the Hessian ``H = 2 X Xᵀ`` of the calibration inputs
(§3, Algorithm 1):

* dead inputs (``H_jj = 0``) get ``H_jj = 1`` and ``W[:, j] = 0`` (reference code); dampening adds
  ``λ = damp · mean(diag H)`` to the diagonal ("Cholesky reformulation", §4 step 3; ``damp`` = 1% default);
* ``U = Cholesky(H⁻¹)ᵀ`` (upper), whose rows hold the needed rows of the shrinking inverse Hessians (§4 step 3);
* for column ``j``: ``q_j = quant(w_j)``, ``e = (w_j - q_j) / U_jj``, ``W[:, j:] -= e U[j, j:]`` (Algorithm 1),
  with the updates of columns beyond the current block of ``block_size`` columns batched into one matrix
  product per block ("lazy batch updates", §4 step 2);
* ``act_order`` visits columns by decreasing ``diag(H)`` and permutes the codes back (the reference code's
  ``--act-order``; the paper's §4 step 1 states arbitrary order suffices, the code's heuristic helps groups).

Layers are calibrated block by block on the outputs of the already-quantized earlier blocks
(:func:`~efficientgpt.compress.calibration.run_sequential`, as the reference code's sequential pass does).

Departures from the reference code (IST-DASLab/gptq), and why:

* Grid: symmetric grids put ``±max|w|`` exactly on the grid (see :mod:`.quant_grid`); the reference clips the
  positive extreme. Scales are rounded to their storage dtype (fp16 by default) before any code is chosen.
  Dead columns are zeroed *before* the per-channel grid is fitted (they never reach the output).
* Groups without ``act_order`` are fitted when GPTQ reaches the group's first column, on the weights as updated
  so far. The reference code fits them on its outer ``W`` copy, which misses the updates made earlier in the
  same lazy block; here the block is rounded to a multiple of ``group_size`` and the group is fitted on the
  block's current values, so results do not depend on ``block_size``.
* Groups *with* ``act_order`` are the reference code's "static groups": all grids are fitted up front on
  contiguous column groups of the original ``W``, so column ``j`` keeps group ``j // group_size`` and the
  packed layout needs no per-column group index (the "dynamic" variant would store ``g_idx``).
* A ``group_size`` that does not divide ``d_in`` leaves a shorter last group (as the reference loop does).

Storage and inference. Each quantized ``nn.Linear`` / GPT-2 ``Conv1D`` becomes a :class:`QuantLinear` holding
``qweight`` (8 bits: ``int8`` values ``q - 128``; 4 and 3 bits: two codes per ``uint8``; 2 bits: four per
byte; always ``(d_out, ·)`` in ``nn.Linear`` orientation), ``scales`` (fp16 by default) and, for asymmetric
grids, integer ``zeros`` (``uint8``) per ``(row, group)``, plus the bias. On the CPU the forward dequantizes on
the fly: unpack → ``(q - zero) · scale`` → ``F.linear``; for per-channel grids the scale multiplies the
matmul output instead of the weight (one fewer full-size pass). Symmetric per-channel int8 layers with
bfloat16 activations run ``torch._weight_int8pack_mm``, torch's int8 weight-only CPU kernel: on a 768x3072
layer it took 0.22 ms per token vs 1.26 ms for dequantize+matmul in bfloat16, but in float32 it is a slow
fallback (2.1 ms for one token, 1 s for 512, vs 0.34 ms and 27 ms), so float32 keeps the dequantizing path.
Codes of 4 bits or fewer with bfloat16 activations run ``torch._weight_int4pack_mm_for_cpu`` on a copy of the
codes in the kernel's own packing, built on first use (the stored ``qweight`` stays the file format, so the
layer then holds its codes twice). On a 3072x768 layer with groups of 32 it took 0.08 ms for one token vs
4.3 ms for dequantize+matmul and 0.15 ms for the dense bfloat16 matmul; it loses to dequantize+matmul above
about 128 token rows (14 ms vs about 10 ms for 512), so longer prefills dequantize. In float32 the kernel
does not run (it wants bfloat16 scales and activations).
torchao 0.18 (installs on torch 2.13 CPU) was measured too: its int8 weight-only CPU linear casts the int8
weight to the activation dtype and calls ``mm``, i.e. dequantizes on the fly like this module, so it is not used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from efficientgpt import registry
from efficientgpt.compress import io
from efficientgpt.compress.quant_grid import SUPPORTED_BITS, QuantGrid, check_bits, num_groups
from efficientgpt.compress.report import CompressionResult, parameter_bytes
from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import ConfigError, UserError
from efficientgpt.models import arch

_HAS_INT4PACK = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
#: Up to this many token rows the int4 CPU kernel beats dequantize + matmul (decoding, short prompts);
#: above it, for long prefills, dequantizing once and one dense matmul is faster (module docstring).
INT4PACK_MAX_ROWS = 128

#: Bits of storage per code: 3-bit codes take a 4-bit slot (two per byte) so every code sits in one byte.
CONTAINER_BITS = {2: 2, 3: 4, 4: 4, 8: 8}
SCALE_DTYPES = ("float16", "float32")


# ---- packing -------------------------------------------------------------------------------------
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``(d_out, d_in)`` with values in ``[0, 2^bits)``.

    8 bits: ``int8`` values ``q - 128`` (``(d_out, d_in)``). Fewer bits: ``8 / c`` codes per ``uint8`` with
    ``c = CONTAINER_BITS[bits]``, code ``k`` of a byte in bits ``[k c, (k + 1) c)`` (the first column in the low
    bits), rows padded with zero codes to a whole byte: ``(d_out, ceil(d_in c / 8))``.
    """
    check_bits(bits)
    if bits == 8:
        return (codes.to(torch.int16) - 128).to(torch.int8)
    c = CONTAINER_BITS[bits]
    per = 8 // c
    d_out, d_in = codes.shape
    pad = (-d_in) % per
    padded = torch.cat([codes, codes.new_zeros(d_out, pad)], dim=1) if pad else codes
    lanes = padded.reshape(d_out, -1, per).to(torch.int32)  # (d_out, bytes, per)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * c
    return (lanes << shifts).sum(-1).to(torch.uint8)  # (d_out, bytes)


def unpack(packed: torch.Tensor, bits: int, d_in: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes ``(d_out, d_in)``."""
    if bits == 8:
        return (packed.to(torch.int16) + 128).to(torch.uint8)
    c = CONTAINER_BITS[bits]
    per = 8 // c
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * c
    lanes = (packed.unsqueeze(-1) >> shifts) & (2 ** c - 1)  # (d_out, bytes, per)
    return lanes.reshape(packed.shape[0], -1)[:, :d_in]


def packed_width(d_in: int, bits: int) -> int:
    per = 8 // CONTAINER_BITS[bits]
    return -(-d_in // per)


# ---- the packed module ---------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A linear map ``y = x Ŵᵀ + b`` whose weight ``Ŵ = scale · (q - zero)`` is stored as packed integer codes.

    ``transposed`` records that the module replaced a GPT-2 ``Conv1D``; the codes are always stored in
    ``nn.Linear`` orientation ``(d_out, d_in)``, which computes the same map.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 symmetric: bool = True, bias: bool = True, transposed: bool = False,
                 scale_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        check_bits(bits)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric, self.transposed = bits, symmetric, transposed
        self.group_size = group_size or None
        n_groups = num_groups(in_features, self.group_size)
        self.grid = QuantGrid(bits, symmetric, self.group_size, scale_dtype=scale_dtype)
        if bits == 8:
            qweight = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        else:
            qweight = torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=scale_dtype, device=device))
        zeros = None if symmetric else torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device)
        self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: QuantGrid,
                   bias: torch.Tensor | None, transposed: bool = False) -> QuantLinear:
        """Build from uint8 ``codes`` ``(d_out, d_in)`` and ``(d_out, n_groups)`` ``scale``/``zero`` of ``grid``."""
        d_out, d_in = codes.shape
        m = cls(d_in, d_out, grid.bits, grid.group_size, grid.symmetric, bias is not None, transposed,
                scale_dtype=grid.scale_dtype, bias_dtype=bias.dtype if bias is not None else torch.float32,
                device=codes.device)
        m.qweight.copy_(pack(codes, grid.bits))
        m.scales.copy_(scale.to(grid.scale_dtype))
        if m.zeros is not None:
            m.zeros.copy_(zero.to(torch.uint8))
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    def codes(self) -> torch.Tensor:
        """uint8 codes ``(d_out, d_in)``."""
        return unpack(self.qweight, self.bits, self.in_features)

    def zero_points(self) -> torch.Tensor:
        """float32 ``(d_out, n_groups)`` zero points (the constant ``2^(bits-1)`` of a symmetric grid)."""
        if self.zeros is None:
            return torch.full(self.scales.shape, float(2 ** (self.bits - 1)), device=self.scales.device)
        return self.zeros.float()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Ŵ = scale · (q - zero)``, ``(d_out, d_in)``."""
        return self.grid.dequantize(self.codes(), self.scales.float(), self.zero_points()).to(dtype)

    def kernel(self, dtype: torch.dtype, rows: int = 1, grad: bool = False) -> str:
        """Which path :meth:`forward` takes for ``rows`` token rows of ``dtype`` (see the module docstring).

        ``grad``: the input needs a gradient. torch's packed kernels have no derivative, so a layer that
        gradients flow through (a method trained on top of the quantized model) dequantizes instead.
        """
        packed = not grad and dtype == torch.bfloat16 and self.qweight.device.type == "cpu"
        if packed and self.group_size is None and self.bits == 8 and self.symmetric \
                and hasattr(torch, "_weight_int8pack_mm"):
            return "int8pack"
        if packed and rows <= INT4PACK_MAX_ROWS and self._int4pack_group() is not None:
            return "int4pack"
        if self.group_size is None and dtype in (torch.float32, torch.float64, torch.bfloat16):
            return "rowscale"  # float16 would risk overflow in the unscaled integer matmul
        return "dequant"

    def _int4pack_group(self) -> int | None:
        """The group size the int4 CPU kernel runs this layer with, or None where it cannot.

        The kernel computes ``(q - 8) · s + m`` per group of 32, 64, 128 or 256 input columns. Codes of
        4 bits or fewer fit its nibbles; a per-channel grid is the grouped one with its scale repeated,
        so it runs with the largest kernel group that divides ``d_in``.
        """
        if self.bits > 4 or self.qweight.device.type != "cpu" or not _HAS_INT4PACK or self.out_features % 16:
            return None  # the kernel's packing takes output rows in blocks of 16
        sizes = (256, 128, 64, 32) if self.group_size is None else (self.group_size,)
        return next((g for g in sizes if g in (32, 64, 128, 256) and self.in_features % g == 0), None)

    def _int4pack(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(packed codes, ``(d_in/g, d_out, 2)`` bf16 scales and offsets, g) for the int4 CPU kernel.

        ``Ŵ = s·(q - z) = s·(q' - 8) + m`` with shifted codes ``q' = q + t`` and offset ``m = (8 - z - t)·s``.
        The kernel keeps ``m`` in bfloat16, and a rounded offset is an error shared by the whole group, so
        each group is shifted by the integer ``t`` nearest ``8 - z`` that keeps ``q'`` in ``[0, 15]``: for
        codes of 3 bits or fewer and for symmetric 4-bit grids ``t = 8 - z`` always fits and ``m = 0``
        exactly; only asymmetric 4-bit groups that use all 16 codes keep a (rounded) offset.
        Built on first use and rebuilt when the codes or scales change; not saved (``qweight`` is the
        stored form).
        """
        key = (self.qweight._version, self.scales._version, self.scales.dtype,
               None if self.zeros is None else self.zeros._version)
        cached = getattr(self, "_int4pack_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        g = self._int4pack_group()
        repeat = 1 if self.group_size else self.in_features // g
        scale = self.scales.float().repeat_interleave(repeat, dim=1)  # (d_out, G), G = d_in/g
        zero = self.zero_points().repeat_interleave(repeat, dim=1)  # (d_out, G)
        codes = self.codes().to(torch.int32).view(self.out_features, -1, g)  # (d_out, G, g)
        lo, hi = codes.amin(-1), codes.amax(-1)  # (d_out, G)
        shift = torch.minimum(torch.maximum(8 - zero.round().to(torch.int32), -lo), 15 - hi)  # (d_out, G)
        shifted = (codes + shift[..., None]).view(self.out_features, self.in_features)  # in [0, 15]
        offset = (8 - zero - shift) * scale  # (d_out, G)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(shifted, 1)
        scales_and_offsets = torch.stack([scale, offset], dim=-1)  # (d_out, G, 2)
        value = (packed, scales_and_offsets.transpose(0, 1).contiguous().to(torch.bfloat16), g)
        self._int4pack_cache = (key, value)
        return value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        kernel = self.kernel(x.dtype, rows, grad=torch.is_grad_enabled() and x.requires_grad)
        if kernel == "int8pack":
            x2 = x.reshape(-1, self.in_features).contiguous()  # (rows, d_in)
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scales[:, 0].to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
        elif kernel == "int4pack":
            packed, scales_and_offsets, g = self._int4pack()
            x2 = x.reshape(-1, self.in_features).contiguous()  # (rows, d_in)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, g, scales_and_offsets)
            y = y.reshape(*x.shape[:-1], self.out_features)
        elif kernel == "rowscale":
            if self.bits == 8 and self.zeros is None:
                centred = self.qweight.to(x.dtype)  # int8 values are q - 128 = q - zero
            else:
                centred = (self.codes().to(torch.int16) - self.zero_points().to(torch.int16)).to(x.dtype)
            y = F.linear(x, centred) * self.scales[:, 0].to(x.dtype)  # (..., d_out)
        else:
            y = F.linear(x, self.dequantized_weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def storage_bytes(self) -> int:
        """Bytes of codes, scales, zeros and bias."""
        tensors = [self.qweight, self.scales, self.zeros, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}"
                + (", transposed=True" if self.transposed else ""))


@io.register_rebuilder("quant")
def rebuild(original: nn.Module, spec: dict[str, Any]) -> QuantLinear:
    """An empty :class:`QuantLinear` shaped as ``spec`` (a :class:`CompressionResult` module entry)."""
    d_in, d_out = arch.linear_shape(original)
    if (d_in, d_out) != (spec["in_features"], spec["out_features"]):
        raise UserError(f"quantized module is {spec['in_features']} -> {spec['out_features']} but the model's "
                        f"module there is {d_in} -> {d_out}")
    bias = getattr(original, "bias", None)
    return QuantLinear(d_in, d_out, spec["bits"], spec["group_size"] or None, spec["symmetric"], spec["bias"],
                       spec.get("transposed", False), scale_dtype=getattr(torch, spec.get("scale_dtype", "float16")),
                       bias_dtype=bias.dtype if bias is not None else torch.float32)


# ---- configs -------------------------------------------------------------------------------------
@dataclasses.dataclass
class RTNConfig(ConfigBase):
    """Round-to-nearest weight quantization."""

    bits: int = field(8, "bits per weight", choices=SUPPORTED_BITS)
    group_size: int | None = field(0, "input columns sharing one scale (0: one scale per output channel; "
                                   "a shorter last group is allowed)", minimum=0)
    symmetric: bool = field(True, "symmetric grid (zero point 2^(bits-1)) instead of asymmetric min-max")
    scale_dtype: str = field("float16", "dtype the scales are stored in", choices=SCALE_DTYPES)
    targets: list[str] = field(["all-linear"], "roles or module names to quantize (never embeddings/LM head)")


@dataclasses.dataclass
class GPTQConfig(RTNConfig):
    """GPTQ hyperparameters (Frantar et al., 2023); defaults are the reference code's."""

    bits: int = field(4, "bits per weight", choices=SUPPORTED_BITS)
    symmetric: bool = field(False, "symmetric grid (zero point 2^(bits-1)) instead of asymmetric min-max")
    act_order: bool = field(False, "quantize columns by decreasing Hessian diagonal (groups then fit up front)")
    damp: float = field(0.01, "dampening λ as a fraction of the mean Hessian diagonal", minimum=0.0,
                        maximum=1.0, exclusive_minimum=True)
    block_size: int = field(128, "columns per lazy batch update", minimum=1)


# ---- shared plumbing -----------------------------------------------------------------------------
@dataclasses.dataclass
class _Layer:
    name: str
    module: nn.Module
    layer: int | None


def _plan(model: nn.Module, config: RTNConfig) -> list[_Layer]:
    """The modules to quantize, checked before any weight is touched."""
    config.validate()
    targets = arch.resolve(model, config.targets)
    heads = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    by_module: dict[int, list[arch.Target]] = {}
    for t in targets:
        by_module.setdefault(id(t.module), []).append(t)
    plan = []
    for group in by_module.values():
        t = group[0]
        if isinstance(t.module, QuantLinear):
            raise UserError(f"{t.name} is already quantized")
        if not (isinstance(t.module, nn.Linear) or arch.is_conv1d(t.module)):
            raise UserError(f"{t.name} is a {type(t.module).__name__}, not a linear layer; quantization needs "
                            "nn.Linear or Conv1D targets")
        if id(t.module) in heads:
            raise UserError(f"{t.name} is the embedding/LM head, which quantization leaves untouched; "
                            "target the decoder's linear layers (roles q,k,v,o,gate,up,down)")
        d_in, d_out = arch.linear_shape(t.module)
        if any(x.out_index is not None for x in group):
            covered = set()
            for x in group:
                covered.update(range(d_out) if x.out_index is None else x.out_index.tolist())
            if len(covered) < d_out:
                roles = ",".join(sorted({x.role for x in group if x.role}))
                raise UserError(f"targets {roles} cover only part of the fused projection {t.name}; a quantized "
                                "module is quantized whole: target q,k,v together (e.g. --targets qkv,o,up,down)")
        if config.group_size and config.group_size > d_in:
            raise ConfigError(f"group_size = {config.group_size} exceeds the {d_in} input features of {t.name}; "
                              f"use at most {d_in}, or 0 for one scale per output channel")
        plan.append(_Layer(t.name, t.module, t.layer))
    return plan


def _grid(config: RTNConfig) -> QuantGrid:
    return QuantGrid(config.bits, config.symmetric, config.group_size or None,
                     scale_dtype=getattr(torch, config.scale_dtype))


def _replace(model: nn.Module, item: _Layer, codes, scale, zero, grid: QuantGrid) -> QuantLinear:
    bias = getattr(item.module, "bias", None)
    q = QuantLinear.from_codes(codes, scale, zero, grid, bias, transposed=arch.is_conv1d(item.module))
    io.set_module(model, item.name, q)
    return q


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _kernel_note(model: nn.Module, layers: list[QuantLinear]) -> str:
    """How the quantized layers run decoding (one token row) with the model's activation dtype."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    dtype_name = str(dtype).replace("torch.", "")
    paths = [q.kernel(dtype) for q in layers]
    kinds = set(paths)
    notes = []
    if "int8pack" in kinds:
        notes.append(f"int8 weight-only via torch._weight_int8pack_mm ({dtype_name} activations)")
    if "int4pack" in kinds:
        notes.append(f"packed int4 via torch._weight_int4pack_mm_for_cpu ({dtype_name} activations, up to "
                     f"{INT4PACK_MAX_ROWS} token rows; longer prefills dequantize on the fly)")
    for kind in ("rowscale", "dequant"):
        if kind in kinds:
            how = "per-row scale on the matmul output" if kind == "rowscale" else "scale on the weight"
            notes.append(f"dequantized on the fly in QuantLinear.forward ({dtype_name} activations: unpack -> "
                         f"q - zero -> F.linear, {how}); torchao is not used")
    if len(kinds) > 1:
        notes.append("layers per path: " + ", ".join(f"{k} {paths.count(k)}" for k in sorted(kinds)))
    return "; ".join(notes)


def _result(method: str, model: nn.Module, config: RTNConfig, replaced: dict[str, tuple[int, QuantLinear]],
            model_bytes_before: int, per_layer: dict[str, dict[str, Any]], extra: dict[str, Any]) -> CompressionResult:
    before = sum(b for b, _ in replaced.values())
    after = sum(q.storage_bytes() for _, q in replaced.values())
    weights = sum(q.in_features * q.out_features for _, q in replaced.values())
    code_bytes = sum(q.qweight.numel() * q.qweight.element_size() for _, q in replaced.values())
    meta_bytes = sum(q.storage_bytes() - q.qweight.numel() * q.qweight.element_size()
                     - (q.bias.numel() * q.bias.element_size() if q.bias is not None else 0)
                     for _, q in replaced.values())
    model_after = parameter_bytes(model)["bytes"]
    achieved = {
        "bits": config.bits,
        "group_size": config.group_size or 0,
        "symmetric": config.symmetric,
        **extra,
        "quantized_layers": len(replaced),
        "quantized_weights": weights,
        "bits_per_weight": 8 * (code_bytes + meta_bytes) / weights,
        "layer_bytes_before": before,
        "layer_bytes_after": after,
        "layer_ratio": before / after,
        "model_bytes_before": model_bytes_before,
        "model_bytes_after": model_after,
        "model_ratio": model_bytes_before / model_after,
    }
    modules = {name: {"kind": "quant", "bits": q.bits, "group_size": q.group_size or 0, "symmetric": q.symmetric,
                      "in_features": q.in_features, "out_features": q.out_features, "bias": q.bias is not None,
                      "transposed": q.transposed, "scale_dtype": config.scale_dtype}
               for name, (_, q) in replaced.items()}
    for name, (b, q) in replaced.items():
        per_layer.setdefault(name, {}).update({"shape": [q.out_features, q.in_features], "bytes_before": b,
                                               "bytes_after": q.storage_bytes()})
    notes = [_kernel_note(model, [q for _, q in replaced.values()])]
    if config.bits == 3:
        notes.append("3-bit codes are stored in 4-bit slots (two per byte)")
    return CompressionResult(method=method, achieved=achieved, modules=modules, per_layer=per_layer, notes=notes)


# ---- RTN -----------------------------------------------------------------------------------------
@torch.no_grad()
def apply_rtn(model: nn.Module, config: RTNConfig, progress: bool = False) -> CompressionResult:
    """Round every targeted weight to the nearest grid point and store it packed."""
    plan = _plan(model, config)
    grid = _grid(config)
    model_bytes = parameter_bytes(model)["bytes"]
    replaced: dict[str, tuple[int, QuantLinear]] = {}
    for item in plan:
        W = arch.linear_weight(item.module).detach().float()  # (d_out, d_in)
        codes, scale, zero = grid.encode(W)
        replaced[item.name] = (_bytes(item.module), _replace(model, item, codes, scale, zero, grid))
    return _result("rtn", model, config, replaced, model_bytes, {}, {})


# ---- GPTQ ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class GPTQOutput:
    codes: torch.Tensor
    """uint8 ``(d_out, d_in)`` in the original column order."""
    scale: torch.Tensor
    """``(d_out, n_groups)``"""
    zero: torch.Tensor
    """``(d_out, n_groups)``"""
    loss: float
    """GPTQ's own error estimate ``Σ_j ‖w_j - q_j‖² / (2 U_jj²)`` (the reference code's ``Losses``)."""


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, grid: QuantGrid, block_size: int = 128, damp: float = 0.01,
                  act_order: bool = False) -> GPTQOutput:
    """GPTQ (Algorithm 1) on one weight ``W`` ``(d_out, d_in)`` with Hessian ``H = 2 X Xᵀ / n`` ``(d_in, d_in)``."""
    W = W.detach().clone().float()  # (d_out, d_in)
    H = H.detach().clone().float()  # (d_in, d_in)
    d_out, d_in = W.shape
    g = grid.group_size if grid.group_size and grid.group_size < d_in else None
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    n_groups = num_groups(d_in, g)
    scale = torch.empty(d_out, n_groups, device=W.device)
    zero = torch.empty(d_out, n_groups, device=W.device)
    dynamic = g is not None and not act_order
    if not dynamic:  # per channel, or the reference code's static groups
        s, z = grid.fit(W)  # (d_out, n_groups)
        scale.copy_(s)
        zero.copy_(z)

    perm = torch.arange(d_in, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm // g).tolist() if g else [0] * d_in  # group of each column, in processing order

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L, info = torch.linalg.cholesky_ex(H)
    if info.item():
        raise UserError(f"the dampened Hessian is not positive definite (damp = {damp}); raise --damp "
                        "or use more calibration samples")
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # (d_in, d_in), H⁻¹ = Uᵀ U

    codes = torch.zeros(d_out, d_in, dtype=torch.uint8, device=W.device)
    loss = 0.0
    # Blocks are whole groups so that each group's grid is fitted on fully updated weights.
    B = max(g, block_size // g * g) if dynamic else block_size
    for i1 in range(0, d_in, B):
        i2 = min(i1 + B, d_in)
        W1 = W[:, i1:i2]  # (d_out, b) view: in-block updates land in W
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic and j % g == 0:
                s, z = grid.fit(W1[:, i : i + g])  # (d_out, 1)
                scale[:, j // g], zero[:, j // g] = s[:, 0], z[:, 0]
            k = group_of[j]
            s, z = scale[:, k : k + 1], zero[:, k : k + 1]  # (d_out, 1)
            w = W1[:, i : i + 1]  # (d_out, 1)
            q = grid.quantize(w, s, z)
            err = (w - grid.dequantize(q, s, z)) / U1[i, i]  # (d_out, 1)
            codes[:, j] = q[:, 0]
            loss += float((err * err).sum()) / 2
            W1[:, i:] -= err * U1[i : i + 1, i:]
            Err1[:, i] = err[:, 0]
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of the later columns
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return GPTQOutput(codes, scale, zero, loss)


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """``‖W X - Ŵ X‖²_F = tr(ΔW (X Xᵀ) ΔWᵀ)`` from the Gram matrix ``X Xᵀ``."""
    D = (W - W_hat).float()  # (d_out, d_in)
    return float(((D @ gram.float()) * D).sum())


@torch.no_grad()
def apply_gptq(model: nn.Module, config: GPTQConfig, windows: torch.Tensor | None = None,
               progress: bool = False) -> CompressionResult:
    """Quantize the targeted layers with GPTQ, block by block on calibration ``windows`` ``(N, T)``."""
    from efficientgpt.compress.calibration import run_sequential

    plan = _plan(model, config)
    if windows is None or len(windows) == 0:
        raise UserError("gptq needs calibration windows (apply(model, config, windows=...)); "
                        "the compress command draws them from --calib-data")
    outside = [x.name for x in plan if x.layer is None]
    if outside:
        raise UserError(f"gptq calibrates decoder blocks one at a time; {outside[0]} is outside the blocks")
    grid = _grid(config)
    wanted = {x.name: x for x in plan}
    model_bytes = parameter_bytes(model)["bytes"]
    replaced: dict[str, tuple[int, QuantLinear]] = {}
    per_layer: dict[str, dict[str, Any]] = {}

    def compress_block(i, block, stats, inputs):
        for name, st in stats.items():
            item = wanted.get(name)
            if item is None:
                continue
            W = arch.linear_weight(item.module).detach().float()  # (d_out, d_in)
            out = gptq_quantize(W, st.hessian(), grid, config.block_size, config.damp, config.act_order)
            W_hat = grid.dequantize(out.codes, out.scale, out.zero)
            err = reconstruction_error(W, W_hat, st.gram)
            err_rtn = reconstruction_error(W, grid.fake_quant(W), st.gram)
            ref = reconstruction_error(W, torch.zeros_like(W), st.gram)
            per_layer[name] = {"gptq_loss": out.loss, "rel_error": err / ref if ref else 0.0,
                               "rtn_rel_error": err_rtn / ref if ref else 0.0}
            replaced[name] = (_bytes(item.module), _replace(model, item, out.codes, out.scale, out.zero, grid))

    run_sequential(model, windows, compress_block, roles=config.targets, gram=True, progress=progress)
    missing = sorted(set(wanted) - set(replaced))
    if missing:
        raise UserError(f"gptq received no calibration statistics for {missing[0]}")
    extra = {"act_order": config.act_order, "damp": config.damp, "calibration_windows": len(windows)}
    result = _result("gptq", model, config, replaced, model_bytes, per_layer, extra)
    if config.act_order and config.group_size:
        result.notes.append("act_order with groups uses static groups (grids fitted before reordering)")
    return result


RTN_SPEC = registry.register(registry.MethodSpec(
    name="rtn", family="quant", config_cls=RTNConfig, apply=apply_rtn, paper="zeroquant",
    summary="round-to-nearest weight-only quantization, per channel or per group, packed int8/int4",
))

GPTQ_SPEC = registry.register(registry.MethodSpec(
    name="gptq", family="quant", config_cls=GPTQConfig, apply=apply_gptq, paper="gptq", calibration=True,
    summary="GPTQ: second-order column-by-column weight quantization with error feedback (Frantar et al., ICLR 2023)",
))
