"""The memory measurement sees a known allocation, whichever counter it reads."""

from __future__ import annotations

import pytest
import torch

from efficientgpt.bench import measure
from efficientgpt.bench.measure import PeakMemory, time_steps

NBYTES = 256 * 2**20


def _allocate_and_free():
    x = torch.ones(NBYTES // 4, dtype=torch.float32)  # (N,) float32, touched, so resident
    x += 1
    del x


@pytest.mark.parametrize("source", ["malloc", "rss"])
def test_peak_memory_sees_a_known_tensor_within_10_percent(source, monkeypatch):
    if source == "malloc" and measure.heap_bytes() is None:
        pytest.skip("glibc mallinfo2 is not available here")
    if source == "rss":
        monkeypatch.setattr(measure, "heap_bytes", lambda: None)
    with PeakMemory("cpu") as m:
        _allocate_and_free()
    assert m.source == source
    assert 0.9 * NBYTES <= m.peak_bytes <= 1.1 * NBYTES, m.peak_bytes


def test_malloc_peak_is_not_hidden_by_memory_freed_before():
    """Freed memory the allocator could reuse does not lower the reading (RSS would not grow the second time)."""
    if measure.heap_bytes() is None:
        pytest.skip("glibc mallinfo2 is not available here")
    readings = []
    for _ in range(2):
        with PeakMemory("cpu") as m:
            _allocate_and_free()
        readings.append(m.peak_bytes)
    for r in readings:
        assert 0.9 * NBYTES <= r <= 1.1 * NBYTES, readings


def test_time_steps_counts_calls():
    calls = []
    r = time_steps(lambda: calls.append(1), steps=3, warmup=2)
    assert len(calls) == 5 and len(r["times_s"]) == 3 and r["median_s"] >= 0
