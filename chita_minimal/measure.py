"""Wall time and peak memory of one call, on CPU or GPU (for the runtime chapter and the benchmarks).

CPU: the peak of the process's resident memory (RSS) during the call, sampled every
``interval`` seconds by a background thread, minus the RSS just before the call. Memory
that torch already holds in its caching allocator is not counted twice; a spike shorter than
the sampling interval may be missed, so figures are lower bounds at the millisecond scale.
CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the allocation before it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Measurement:
    """seconds: wall time; peak_mib: extra memory at the peak of the call (MiB); result: what it returned."""

    seconds: float
    peak_mib: float
    result: Any = None


def _rss_mib() -> float:
    """Resident memory of this process in MiB (Linux /proc; NaN where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        return float("nan")


def measure(fn, *args, device=None, interval: float = 0.002, **kwargs) -> Measurement:
    """Run ``fn(*args, **kwargs)`` once; return its wall time, peak extra memory and result.

    ``device``: where the work runs (a CUDA device switches to the CUDA allocator's counters
    and synchronises before reading the clock); default CPU.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        return Measurement(seconds, (torch.cuda.max_memory_allocated(dev) - base) / 2**20, result)

    base = _rss_mib()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss_mib())
    return Measurement(seconds, max(0.0, peak[0] - base), result)


def profile(fn, *args, functions: dict[str, list[str]], **kwargs) -> tuple[Any, float, dict[str, float]]:
    """Run ``fn`` under cProfile; return (result, seconds, {part: cumulative seconds}).

    ``functions`` maps a label to names of functions of this package (e.g. ``{"Xᵀr": ["rmatvec"]}``);
    a part's time is the cumulative time of those functions, so parts that call each other overlap.
    Profiling adds some overhead per Python call; use :func:`measure` for the wall time itself.
    """
    import cProfile
    import pstats

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        result = fn(*args, **kwargs)
    finally:
        prof.disable()
    seconds = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, prim calls, tottime, cumtime, callers)
    parts = {}
    for label, names in functions.items():
        parts[label] = sum(v[3] for (f, _, name), v in stats.items()
                           if name in names and "chita_minimal" in f.replace("\\", "/"))
    return result, seconds, parts
