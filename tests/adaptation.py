"""The adaptation check the PEFT methods' training tests share.

A tiny Llama briefly pretrained on ascending arithmetic sequences (:func:`ascending_model`; a random
base's LM head is too small for a frozen-head method to move the loss: its logits stay within about
±0.6) is adapted to descending sequences by a method alone. :func:`adapt_to_descending` trains it,
checks that no base weight moved, and returns the held-out loss before and after.
"""

from __future__ import annotations

import torch

from efficientgpt.data.tokens import WindowSampler
from efficientgpt.models.tiny import tiny_model
from efficientgpt.peft import core
from efficientgpt.train.losses import causal_lm_loss
from efficientgpt.train.trainer import TrainConfig, Trainer
from train_script import stream


def ascending_model(layers: int = 2):
    torch.manual_seed(0)
    model = tiny_model("llama", layers=layers)
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=2, progress=False, seed=0)
    Trainer(model, cfg, WindowSampler(stream(4000, seed=3), 16, 8, seed=0)).train()
    return model


def descending_loss(model) -> float:
    """Mean next-token loss on 16 held-out descending windows of 16 tokens."""
    probe = {"input_ids": torch.from_numpy((127 - stream(256, seed=1)).reshape(16, 16).copy()).long()}
    with torch.no_grad():
        total, n = causal_lm_loss(model, probe)
    return (total / n).item()


def adapt_to_descending(model, steps: int = 30, lr: float = 2e-2, step_callbacks=()) -> tuple[float, float]:
    """Train ``model`` (a method already applied) on descending sequences; (loss before, loss after)."""
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(core.DELTA_ROOT)}
    before = descending_loss(model)
    cfg = TrainConfig(steps=steps, batch_size=8, seq_len=16, lr=lr, warmup_steps=2, log_every=10, progress=False,
                      seed=0)
    Trainer(model, cfg, WindowSampler(127 - stream(4000, seed=0), 16, 8, seed=1),
            step_callbacks=list(step_callbacks)).train()
    model.eval()
    after = descending_loss(model)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base parameter {n} moved"
    return before, after
