"""CHITA++ sparsity schedules (the paper's Alg 1): the target sparsity of each stage.

Formulas of the reference code, with base level b, final sparsity s, T stages and
t = 0 … T−1; every schedule ends exactly at s.
"""

from __future__ import annotations

import math

SCHEDULES = ("exp", "poly", "linear", "const", "mfac")


def schedule(name: str, final: float, stages: int, base: float = 0.1) -> list[float]:
    """Sparsity targets s_0 … s_{T−1} for CHITA++.

    - exp:    s_t = b + (s−b)·2^{T−1}/(2^{T−1}−1)·(1 − 2^{−t})
    - poly:   s_t = s + (b−s)·(1 − t/(T−1))³
    - linear: s_t = b + t·(s−b)/(T−1)
    - const:  s_t = s
    - mfac:   s_t = 1 − (1−b)·((1−s)/(1−b))^{(t+1)/T}

    With one stage every schedule is [s]. Non-decreasing for b ≤ s.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULES)}")
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be an int >= 1, got {stages!r}")
    for arg, v in (("final", final), ("base", base)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0 or math.isnan(v):
            raise ValueError(f"{arg} must be a sparsity in [0, 1), got {v!r}")
    if base > final:
        raise ValueError(f"base ({base}) must not exceed final ({final})")
    s, b, T = float(final), float(base), stages
    if T == 1 or name == "const":
        return [s] * T
    if name == "exp":
        c = 2 ** (T - 1) / (2 ** (T - 1) - 1)
        out = [b + (s - b) * c * (1 - 2.0 ** (-t)) for t in range(T)]
    elif name == "poly":
        out = [s + (b - s) * (1 - t / (T - 1)) ** 3 for t in range(T)]
    elif name == "linear":
        out = [b + t * (s - b) / (T - 1) for t in range(T)]
    else:  # mfac
        out = [1 - (1 - b) * ((1 - s) / (1 - b)) ** ((t + 1) / T) for t in range(T)]
    out[-1] = s  # exactly the target, whatever the rounding
    return out
