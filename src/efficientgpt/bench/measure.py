"""Measuring what a run costs: wall time per step and peak memory, on CPU and GPU.

On CUDA, peak memory is ``torch.cuda.max_memory_allocated`` (exact, allocator-level). On CPU there is
no allocator counter, so :class:`PeakMemory` samples the process's resident set size in a background
thread (every ``interval`` seconds, plus once at entry and exit) and reports the peak above the RSS at
entry; allocations shorter than the interval can be missed, so the interval is small (1 ms).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``; ``psutil`` elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes``: the peak above the level at entry."""

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.001):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.base_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_rss = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.base_bytes = self._peak_rss = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak_rss = max(self._peak_rss, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base_bytes
        else:
            self._stop.set()
            self._thread.join()
            self._peak_rss = max(self._peak_rss, rss_bytes())
            self.peak_bytes = self._peak_rss - self.base_bytes


def time_steps(fn: Callable[[], None], steps: int, warmup: int = 1, device: str | torch.device = "cpu") -> dict:
    """Run ``fn`` ``warmup`` times, then time ``steps`` calls; median and mean seconds per call."""
    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "times_s": times}
