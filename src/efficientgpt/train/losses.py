"""Training objectives. Each returns ``(sum of per-token losses, number of tokens)``.

Returning a sum and a count (not a mean) lets the trainer normalise by the token count of the whole
global batch, across gradient-accumulation micro-batches and processes, so a distributed or
accumulated step computes exactly the gradient of the single-process full-batch mean, also when
labels mask out different numbers of tokens per batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy: position t predicts token t+1; ``labels`` = -100 are not scored."""
    input_ids = batch["input_ids"]  # (B, T)
    labels = batch.get("labels", input_ids)  # (B, T)
    kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    logits = model(input_ids=input_ids, **kwargs).logits  # (B, T, V)
    targets = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (targets != IGNORE_INDEX).sum()


def count_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch.get("labels", batch["input_ids"])
    return (labels[:, 1:] != IGNORE_INDEX).sum()
