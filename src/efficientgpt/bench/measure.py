"""Measuring what a run costs: wall time per step and peak memory, on CPU and GPU.

On CUDA, peak memory is ``torch.cuda.max_memory_allocated`` (exact, allocator-level). On CPU PyTorch
keeps no such counter; CPU tensors are allocated by the C library's ``malloc``, so :class:`PeakMemory`
samples the bytes ``malloc`` has handed out and not taken back (glibc ``mallinfo2``) in a background
thread, every ``interval`` seconds plus once at entry and exit, and reports the peak above the level at
entry. That count is the CPU analogue of ``max_memory_allocated``: it does not depend on what earlier
work left cached in the allocator, so runs measured one after another in one process compare fairly.
Where ``mallinfo2`` is missing (not glibc, or glibc < 2.33) the resident set size is sampled instead,
after handing freed memory back to the system (``malloc_trim``); that reading is noisier and can be
lowered by memory earlier work freed but the allocator kept. Allocations that live shorter than the
interval can be missed, so the interval is small (1 ms).
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_free_memory() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim(0)``; nothing elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33)."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_bytes() -> int | None:
    """Bytes the C allocator has handed out and not yet taken back, over all arenas, mmapped blocks
    included (glibc ``mallinfo2``: ``uordblks + hblkhd``); ``None`` where glibc's ``mallinfo2`` is missing.

    Unlike the resident set, this does not depend on what earlier work left in the allocator's free
    lists: it counts live allocations (every CPU tensor's storage among them) and nothing else.
    """
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``; ``psutil`` elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes``: the peak above the level at entry.

    ``m.source`` says what was measured: ``cuda`` (``max_memory_allocated``), ``malloc`` (bytes in use
    by the C allocator, sampled) or ``rss`` (resident set size, sampled).
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.001):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.base_bytes = 0
        self.source = "cuda" if self.device.type == "cuda" else ("malloc" if heap_bytes() is not None else "rss")
        self._read = heap_bytes if self.source == "malloc" else rss_bytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
        else:
            import gc

            gc.collect()
            if self.source == "rss":
                release_free_memory()
            self.base_bytes = self._peak = self._read()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._read())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base_bytes
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._read())
            self.peak_bytes = self._peak - self.base_bytes


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
