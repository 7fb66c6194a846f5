"""Perplexity against closed forms and a slow per-token reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from efficientgpt.eval.perplexity import perplexity
from efficientgpt.models.tiny import tiny_model


class Uniform(torch.nn.Module):
    """A 'model' whose next-token distribution is uniform over V tokens: perplexity is exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab) + self.w
        return type("Out", (), {"logits": logits})()


def test_uniform_model_has_perplexity_vocab_size():
    res = perplexity(Uniform(50), np.arange(1000) % 50, seq_len=32)
    assert res.perplexity == pytest.approx(50.0)
    assert res.windows == 1000 // 32 and res.tokens == res.windows * 31


def test_matches_slow_per_token_reference():
    model = tiny_model("gpt2", seed=3)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, size=203)
    T = 20
    res = perplexity(model, ids, seq_len=T, batch_size=3)
    total, n = 0.0, 0
    with torch.no_grad():
        for w in range(len(ids) // T):  # non-overlapping windows, tail dropped
            window = torch.tensor(ids[w * T : (w + 1) * T])[None]
            logp = torch.log_softmax(model(window).logits[0].double(), -1)
            for t in range(T - 1):
                total -= logp[t, window[0, t + 1]].item()
                n += 1
    assert res.tokens == n == 10 * 19
    assert res.loss == pytest.approx(total / n, abs=1e-5)
    assert res.perplexity == pytest.approx(math.exp(total / n), rel=1e-5)
    assert perplexity(model, ids, seq_len=T, max_tokens=40).windows == 2
