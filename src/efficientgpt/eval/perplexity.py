"""Perplexity with the protocol of SparseGPT, Wanda and lm-evaluation-harness's rolling windows.

The split's text is joined (documents separated as the source defines; WikiText-2 rows by
``"\\n\\n"``), tokenized once, and cut into non-overlapping windows of the model's sequence length
``T`` (the tail shorter than a window is dropped). Each window is scored independently: the mean
negative log-likelihood over its ``T - 1`` predicted tokens. Perplexity is ``exp`` of the mean NLL over
all predicted tokens of all windows, i.e. of the mean window loss since every window has the same
length.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from efficientgpt.data.tokens import eval_windows


@dataclasses.dataclass
class PerplexityResult:
    loss: float
    """Mean NLL per predicted token (nats)."""
    tokens: int
    """Predicted tokens scored."""
    windows: int
    seq_len: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "perplexity": self.perplexity}


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """Summed NLL of each window's ``T - 1`` next-token predictions, shape ``(N,)`` (float64)."""
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc="eval", unit="batch", disable=not progress,
                  leave=False, dynamic_ncols=True):
        ids = windows[i : i + batch_size].to(device)  # (B, T)
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")  # (B, T-1)
        out.append(nll.double().sum(dim=1).cpu())
    return torch.cat(out)


def perplexity(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8, max_tokens: int | None = None,
               progress: bool = False) -> PerplexityResult:
    windows = eval_windows(tokens, seq_len, max_tokens)
    was_training = model.training
    model.eval()
    try:
        nll = window_nll(model, windows, batch_size, progress)
    finally:
        model.train(was_training)
    n_pred = windows.shape[0] * (seq_len - 1)
    return PerplexityResult(loss=float(nll.sum() / n_pred), tokens=n_pred, windows=windows.shape[0], seq_len=seq_len)


def default_seq_len(model, cap: int = 2048) -> int:
    """The model's context length (``max_position_embeddings`` or ``n_positions``), capped."""
    cfg = model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or cap
    return int(min(n, cap))
