"""The memory measurement sees a known allocation."""

from __future__ import annotations

import torch

from efficientgpt.bench.measure import PeakMemory, time_steps


def test_peak_memory_sees_a_known_tensor_within_10_percent():
    nbytes = 256 * 2**20
    with PeakMemory("cpu") as m:
        x = torch.ones(nbytes // 4, dtype=torch.float32)  # touched, so resident
        x += 1
        del x
    assert 0.9 * nbytes <= m.peak_bytes <= 1.1 * nbytes, m.peak_bytes


def test_time_steps_counts_calls():
    calls = []
    r = time_steps(lambda: calls.append(1), steps=3, warmup=2)
    assert len(calls) == 5 and len(r["times_s"]) == 3 and r["median_s"] >= 0
