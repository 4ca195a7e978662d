"""Wall time and peak memory of one call, on CPU or GPU (for the runtime chapter and the benchmarks).

CPU: the peak of the process's resident memory (RSS) during the call minus the RSS just before
it. On Linux the kernel's own high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
gives the exact peak; where that is unavailable, a background thread samples the RSS every
``interval`` seconds — it cannot run while a torch op holds the GIL, so a short spike may be
missed and the figure is a lower bound. Memory that torch already holds in its caching allocator
is not counted twice.
CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the allocation before it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from chita_minimal.utils import model_mode


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


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ≥ 4.0); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """The kernel's peak resident memory (VmHWM) of this process since the last reset, in MiB (NaN if unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError):
        pass
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
    exact = _reset_peak_rss()
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
    if exact:
        peak[0] = max(peak[0], _peak_rss_mib())  # the kernel saw every page, the sampler may not have
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


@dataclass
class Latency:
    """Inference latency of a model: median and the spread of ``repeats`` timed runs, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    batch_size: int
    repeats: int


def latency(model, input_shape, *, batch_size: int = 1, repeats: int = 30, warmup: int = 5, device=None,
            seed: int = 0) -> Latency:
    """Wall time of one forward pass of ``model`` on a random batch (``batch_size``, *input_shape),
    under ``torch.inference_mode`` in eval mode: median (and 10th/90th percentiles) of ``repeats``
    runs after ``warmup`` untimed ones. CUDA is synchronised around each run. The model's
    train/eval mode is restored."""
    for name, v, lo in (("batch_size", batch_size, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(seed)).to(dev)
    times = []
    with model_mode(model, training=False), torch.inference_mode():
        for i in range(warmup + repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            model(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - t0))
    t = torch.tensor(times)
    return Latency(float(t.median()), float(t.quantile(0.1)), float(t.quantile(0.9)), batch_size, repeats)


def bare_pass(X: torch.Tensor, repeats: int = 7) -> float:
    """Seconds of one bare pass ``X @ w`` + ``X.T @ r`` (the least work of one first-order iteration on X):
    the median of ``repeats`` after a warm-up, synchronised on a GPU. The unit of the speed ratios in
    ``bench/speed.py`` and the runtime chapter: a solve that takes t seconds costs t / bare_pass(X) passes."""
    w = torch.randn(X.shape[1], device=X.device, dtype=X.dtype)
    r = torch.randn(X.shape[0], device=X.device, dtype=X.dtype)
    sync = torch.cuda.synchronize if X.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        X @ w, X.T @ r
        sync()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return times[len(times) // 2]
