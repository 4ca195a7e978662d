"""A memory plan before any n·p allocation: how large X and the solver's working set will be, and
whether that fits the device (or a ``max_memory`` the user gives).

X of ResNet50 (p = 25.5M) with n = 1000 rows is 102 GB in fp32: ``prune`` asks :func:`plan` first
and fails at once, with the figures and the ways out, instead of running out of memory half-way
(or, for the block backsolve, streams the gradients and never builds X).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value, arg: str = "max_memory") -> int:
    """Bytes from an int or a string such as "8GB", "512 MiB", "1.5e9"."""
    if isinstance(value, bool):
        raise TypeError(f"{arg} must be a number of bytes or a string like '8GB', got bool")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"{arg} must be > 0, got {value}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            try:
                return parse_bytes(float(m.group(1)) * _UNITS[m.group(2).lower()], arg)
            except ValueError:
                pass
        raise ValueError(f"{arg} must look like '8GB', '512MiB' or a number of bytes, got {value!r}")
    raise TypeError(f"{arg} must be a number of bytes or a string like '8GB', got {type(value).__name__}")


def human(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number ≥ 1: '1.50 GiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def available_bytes(device) -> int:
    """Free memory of ``device``: CUDA's free memory, or the CPU's MemAvailable (Linux; else the total)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**63


class MemoryPlanError(ValueError):
    """The requested X and working set do not fit; raised before anything is allocated."""


@dataclass
class MemoryPlan:
    """Bytes of X (n×p), of the method's working set beyond X, and what is available where they go."""

    x_bytes: int
    solver_bytes: int
    available: int
    device: torch.device
    limit: str  # where ``available`` comes from: "max_memory" or "free memory"

    @property
    def total(self) -> int:
        return self.x_bytes + self.solver_bytes

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def __str__(self) -> str:
        return (f"X {human(self.x_bytes)} + working set {human(self.solver_bytes)} = {human(self.total)}; "
                f"{human(self.available)} available ({self.limit} on {self.device})")


def plan(n: int, p: int, itemsize: int, solver_bytes: int, device, max_memory=None) -> MemoryPlan:
    """The plan for an n×p X of ``itemsize``-byte numbers and a working set of ``solver_bytes`` on ``device``."""
    device = torch.device(device)
    if max_memory is not None:
        return MemoryPlan(n * p * itemsize, solver_bytes, parse_bytes(max_memory), device, "max_memory")
    return MemoryPlan(n * p * itemsize, solver_bytes, available_bytes(device), device, "free memory")
