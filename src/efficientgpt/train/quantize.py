"""QLoRA's frozen base: the decoder blocks' linear layers stored in 4-bit NormalFloat (NF4).

Dettmers, Pagnoni, Holtzman & Zettlemoyer, "QLoRA: Efficient Finetuning of Quantized LLMs",
NeurIPS 2023. QLoRA backpropagates through a frozen 4-bit base into LoRA adapters (§3, Eq. 5:
``Y = X · doubleDequant(c1, c2, W_NF4) + X L1 L2``). Its three parts, and where they live here:

* **4-bit NormalFloat** (§3): each block of 64 weights is scaled by its absolute maximum into
  [-1, 1] and rounded to the nearest of 16 values placed at quantiles of N(0, 1), with an exact
  zero (Appendix E lists them). ``bitsandbytes.nn.Linear4bit(quant_type="nf4")`` stores the codes
  two per byte and dequantizes to ``compute_dtype`` for each matrix product.
* **Double quantization** (§3): the per-block float32 maxima (32/64 = 0.5 bit per weight) are
  themselves quantized to 8-bit floats in blocks of 256 with one float32 constant per block
  (8/64 + 32/(64·256) ≈ 0.127 bit per weight): ``compress_statistics=True``.
* **Paged optimizers** (§3): the optimizer's states in CUDA unified memory; the Trainer's
  ``optimizer="paged_adamw"`` / ``"paged_adamw8bit"`` (bitsandbytes). :func:`efficientgpt.pipeline.tune`
  picks ``paged_adamw`` for a quantized run on CUDA unless an optimizer is named.

:func:`quantize_model` replaces every linear layer inside the decoder blocks (attention and MLP
projections; not the embeddings, the LM head or the norms, which the paper keeps in 16 bits) by a
``Linear4bit`` holding the same weight in NF4. GPT-2's ``Conv1D`` (weight ``(in, out)``) is turned
into ``Linear`` orientation first. Deltas attached afterwards hook the new modules' outputs, so LoRA
(and every method that adds to a linear layer's output) runs unchanged on top: ``h = NF4(W0) x +
(α/r) B A x``. Methods that train the base weights themselves (full fine-tuning) are refused.

Departures from the paper and its code: the packed codes are stored in the model's float dtype
(``quant_storage``) rather than uint8, which keeps ``weight.dtype`` meaningful to code that reads
it (LoRA creates its factors in that dtype) and lets sharding code treat the tensor as any other;
the bytes are the same. On CPU, bitsandbytes' bfloat16 inference repacking is turned off, so an
evaluation computes what training does. ``compute_dtype="auto"`` is bfloat16 on CUDA (the paper's setting) and the
model's dtype elsewhere (bfloat16 matrix products are slow on most CPUs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from efficientgpt.errors import UserError

QUANTIZE_CHOICES = ("none", "nf4")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Weights per NF4 block (one absmax constant each), and absmax constants per second-level block.
NF4_BLOCKSIZE = 64
DOUBLE_QUANT_BLOCKSIZE = 256


def require_bitsandbytes(what: str):
    """``import bitsandbytes``, or a :class:`UserError` naming ``what`` needs it and how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(f"{what} needs bitsandbytes, which is not installed: pip install bitsandbytes "
                        "(or pip install 'efficientgpt[efficient]')") from None
    return bitsandbytes


def nf4_bits_per_parameter(double_quant: bool = True) -> float:
    """Storage of one NF4 weight in bits: 4 for the code plus the block constants (paper §3)."""
    if double_quant:
        return 4 + 8 / NF4_BLOCKSIZE + 32 / (NF4_BLOCKSIZE * DOUBLE_QUANT_BLOCKSIZE)
    return 4 + 32 / NF4_BLOCKSIZE


def _compute_dtype(name: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else model_dtype
    if name not in COMPUTE_DTYPES:
        raise UserError(f"compute dtype {name!r} is not allowed; choose one of {', '.join(COMPUTE_DTYPES)}")
    return getattr(torch, name)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds 4-bit weights (anywhere below it)."""
    return any(type(p).__name__ == "Params4bit" for p in module.parameters())


def quantize_model(model: nn.Module, compute_dtype: str = "auto", double_quant: bool = True) -> dict[str, Any]:
    """Store the decoder blocks' linear layers of ``model`` in NF4 (in place); returns what was done.

    Call it before attaching a delta. The report holds the quantized module names, their count and
    parameter count, and the bytes their weights took before and after (codes plus block constants).
    """
    from efficientgpt.models import arch
    from efficientgpt.peft import core

    bnb = require_bitsandbytes("--quantize nf4 (QLoRA)")
    if core.deltas(model):
        raise UserError("quantize the base model before attaching a delta: deltas are attached to "
                        f"{', '.join(core.deltas(model))}")
    if is_quantized(model):
        raise UserError("the model is quantized already")
    ref = next(p for p in model.parameters() if p.is_floating_point())
    device, storage = ref.device, ref.dtype
    cdtype = _compute_dtype(compute_dtype, device, storage)
    names, params, before, after = [], 0, 0, 0
    blocks = arch.blocks(model)
    for i, block in enumerate(blocks):
        for name, module in list(block.named_modules()):
            if not (type(module) is nn.Linear or arch.is_conv1d(module)):
                continue
            d_in, d_out = arch.linear_shape(module)
            weight = arch.linear_weight(module).detach()  # (d_out, d_in); a transposed view for Conv1D
            new = bnb.nn.Linear4bit(d_in, d_out, bias=module.bias is not None, compute_dtype=cdtype,
                                    compress_statistics=double_quant, quant_type="nf4", quant_storage=storage,
                                    device="meta")
            # bitsandbytes' CPU inference path repacks the codes (uint8, bfloat16 block maxima) in place the
            # first time an eval-mode forward runs without grad; keep one format, so that evaluation
            # computes exactly what training does.
            new.support_avx512bf16_for_cpu = False
            new.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False,
                                           compress_statistics=double_quant, quant_type="nf4",
                                           quant_storage=storage, module=new)
            if module.bias is not None:
                new.bias = module.bias  # stays a float parameter (the paper quantizes weights only)
            new = new.to(device)  # moving an unquantized Params4bit quantizes it
            new.train(module.training)
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, new)
            names.append(f"{arch.family_of(model).blocks}.{i}.{name}")
            params += weight.numel()
            before += weight.numel() * weight.element_size()
            after += _bytes_4bit(new.weight)
    if not names:
        raise UserError("the model's decoder blocks hold no linear layers to quantize")
    model._efficientgpt_quantized = {"type": "nf4", "double_quant": double_quant, "compute_dtype": str(cdtype)}
    return {"type": "nf4", "double_quant": double_quant, "compute_dtype": str(cdtype).removeprefix("torch."),
            "modules": len(names), "names": names, "parameters": params, "bytes_before": before,
            "bytes_after": after, "bits_per_parameter": 8 * after / max(1, params)}


def _bytes_4bit(weight) -> int:
    """Bytes of a ``Params4bit``: the packed codes and its quantization state's tensors."""
    total = weight.numel() * weight.element_size()
    qs = weight.quant_state
    for t in (qs.absmax, qs.code):
        total += t.numel() * t.element_size()
    if getattr(qs, "nested", False) and qs.state2 is not None:
        for t in (qs.state2.absmax, qs.state2.code):
            total += t.numel() * t.element_size()
    return total
