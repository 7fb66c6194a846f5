"""What a compression method returns: what it achieved, and how to rebuild what it rewrote."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from efficientgpt.models import arch


@dataclasses.dataclass
class CompressionResult:
    method: str
    achieved: dict[str, Any]
    """What was achieved, measured on the weights (e.g. ``sparsity``, ``ratio``, ``bits``), exactly."""
    modules: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Rewritten modules for :mod:`efficientgpt.compress.io` (path -> ``{"kind": ..., ...}``)."""
    per_layer: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Per-module details (e.g. each matrix's sparsity or rank)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Facts a reader needs (e.g. which inference kernel runs the quantized weights)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Parameters (tied weights once), nonzero parameters, and bytes of parameters and buffers."""
    params = {id(p): p for p in model.parameters()}.values()
    buffers = [b for _, b in model.named_buffers()]
    return {
        "parameters": sum(p.numel() for p in params),
        "nonzero_parameters": int(sum(torch.count_nonzero(p).item() for p in params)),
        "bytes": sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size() for b in buffers),
    }


def linear_sparsity(model: nn.Module, roles=("all-linear",)) -> tuple[float, dict[str, float]]:
    """Exact fraction of zeros over the weights of the decoder's linear layers, overall and per module."""
    zeros = total = 0
    per = {}
    seen = set()
    for t in arch.resolve(model, list(roles)):
        if id(t.module) in seen:
            continue
        seen.add(id(t.module))
        w = t.module.weight
        z = int((w == 0).sum().item())
        per[t.name] = z / w.numel()
        zeros += z
        total += w.numel()
    return (zeros / total if total else 0.0), per
