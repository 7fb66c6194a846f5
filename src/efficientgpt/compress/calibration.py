"""Calibration data and the sequential block-by-block scheme of SparseGPT and GPTQ.

One pipeline serves every calibrated method (Wanda, SparseGPT, ASVD, SVD-LLM, GPTQ, structured
pruning):

1. :func:`calibration_windows`: ``N`` random windows of ``T`` tokens from a data split (embedded prose
   by default), drawn with a fixed seed.
2. :func:`run_sequential`: the inputs of decoder block 0 are captured by a hook (the model's forward
   stops there), then blocks are visited in order. For block ``i`` the method gets an
   :class:`InputStats` per linear layer, accumulated over all calibration windows by hooks while the
   block runs on its inputs; the method rewrites the block; the *rewritten* block then produces the
   inputs of block ``i + 1``. Later blocks therefore calibrate on the outputs of already-compressed
   earlier blocks (Frantar & Alistarh, 2023, §3.3; Frantar et al., 2023, §3) and memory holds one
   block's activations at a time.

All linear layers of a block are calibrated in one pass over the block's inputs and compressed
together (the official SparseGPT/GPTQ default; their ``true-sequential`` option, which re-runs the
block between sublayers, is not implemented).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from efficientgpt.config import ConfigBase, field
from efficientgpt.errors import UserError
from efficientgpt.models import arch


@dataclasses.dataclass
class CalibrationConfig(ConfigBase):
    """Which data calibrates a compression method, and how much of it."""

    calib_data: str = field("embedded:prose", "calibration data spec (any --data form)")
    calib_split: str = field("train", "split the windows are drawn from", choices=("train", "validation", "test"))
    calib_samples: int = field(32, "number of calibration windows N", minimum=1)
    calib_seq_len: int | None = field(None, "tokens per window T (default: the model's context, at most 512)")
    calib_seed: int = field(0, "seed of the window positions")
    calib_batch: int = field(8, "windows per forward pass during calibration", minimum=1)


def calibration_windows(tokenizer, model, cfg: CalibrationConfig) -> torch.Tensor:
    """``(N, T)`` token windows at random positions of the calibration split (seeded)."""
    from efficientgpt.data import sources, tokens
    from efficientgpt.eval.perplexity import default_seq_len

    cfg.validate()
    seq_len = cfg.calib_seq_len or min(512, default_seq_len(model))
    ids = tokens.encode(tokenizer, sources.load_text(cfg.calib_data, cfg.calib_split))
    if len(ids) < seq_len + 1:
        raise UserError(f"calibration data {cfg.calib_data!r} ({cfg.calib_split}) has {len(ids)} tokens, shorter "
                        f"than one window of {seq_len}; give more data or a smaller --calib-seq-len")
    rng = np.random.default_rng(cfg.calib_seed)
    starts = rng.integers(0, len(ids) - seq_len + 1, size=cfg.calib_samples)
    return torch.from_numpy(np.stack([ids[s : s + seq_len] for s in starts]).astype(np.int64))


class InputStats:
    """Statistics of a linear layer's inputs ``x`` (rows of ``(B·T, d_in)``) over the calibration set.

    ``gram`` is ``Σ x xᵀ`` (``d_in × d_in``, the Hessian ``H = 2 X Xᵀ`` up to the factor 2/n used
    by SparseGPT/GPTQ), ``sq_sum`` is ``Σ x²`` per input feature (Wanda's ``‖X_j‖²``), ``abs_sum`` is
    ``Σ |x|`` (ASVD's activation magnitude), ``n`` the number of rows.
    """

    def __init__(self, d_in: int, gram: bool = True, device: torch.device | str = "cpu"):
        self.n = 0
        self.sq_sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.gram = torch.zeros(d_in, d_in, dtype=torch.float32, device=device) if gram else None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (rows, d_in)
        self.n += x.shape[0]
        self.sq_sum += (x * x).sum(0).double()
        self.abs_sum += x.abs().sum(0).double()
        if self.gram is not None:
            self.gram += x.T @ x

    @property
    def col_norm(self) -> torch.Tensor:
        """``‖X_j‖₂`` per input feature (Wanda, Eq. 1)."""
        return self.sq_sum.sqrt().float()

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(1, self.n)).float()

    def hessian(self) -> torch.Tensor:
        """``H = (2/n) Σ x xᵀ``, the layer-wise reconstruction Hessian of SparseGPT/GPTQ."""
        if self.gram is None:
            raise ValueError("these statistics were collected without the Gram matrix")
        return self.gram * (2.0 / max(1, self.n))


class _Stop(Exception):
    pass


@dataclasses.dataclass
class BlockInputs:
    """The calibration inputs of one decoder block: hidden states per batch and the block's kwargs."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> BlockInputs:
    """Run the model up to decoder block 0 and keep what the block receives."""
    block0 = arch.blocks(model)[0]
    hidden, kwargs_list = [], []

    def grab(mod, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(h.detach())
        kwargs_list.append({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache",
                                                                          "layer_past", "past_key_value")})
        raise _Stop

    handle = block0.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for i in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return BlockInputs(hidden, kwargs_list)


def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    return [_block_out(block(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs)]


BlockFn = Callable[[int, nn.Module, dict[str, "InputStats"], BlockInputs], None]


@torch.no_grad()
def run_sequential(model: nn.Module, windows: torch.Tensor, compress_block: BlockFn, roles=("all-linear",),
                   gram: bool = True, batch_size: int = 8, progress: bool = False) -> None:
    """Visit decoder blocks in order: calibrate, let ``compress_block`` rewrite, propagate.

    ``compress_block(i, block, stats, inputs)`` receives the :class:`InputStats` of each linear target
    of block ``i`` keyed by its module path inside the model (``arch.resolve`` names) and may rewrite
    the block in place (also its shapes); its outputs then feed block ``i + 1``.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, windows, batch_size)
    blocks = arch.blocks(model)
    try:
        for i in tqdm(range(len(blocks)), desc="compress", unit="block", disable=not progress, leave=False):
            block = blocks[i]
            targets = {t.name: t.module for t in arch.resolve(model, list(roles), layers=[i])}
            stats: dict[str, InputStats] = {}
            handles = []
            for name, module in targets.items():
                if id(module) in {id(m) for m in list(targets.values())[: list(targets).index(name)]}:
                    continue  # a fused module resolved once per role: one set of statistics
                d_in = arch.linear_shape(module)[0]
                stats[name] = st = InputStats(d_in, gram=gram, device=inputs.hidden[0].device)
                handles.append(module.register_forward_pre_hook(lambda m, a, st=st: st.add(a[0])))
            try:
                run_block(block, inputs)
            finally:
                for h in handles:
                    h.remove()
            compress_block(i, block, stats, inputs)
            inputs = BlockInputs(run_block(blocks[i], inputs), inputs.kwargs)
    finally:
        model.train(was_training)
