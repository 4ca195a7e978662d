"""Small helpers shared by the package: device choice and seeding."""

from __future__ import annotations

import random

import numpy as np
import torch


def device(prefer: str | None = None) -> torch.device:
    """The device to run on: ``prefer`` if given, else CUDA when available, else CPU."""
    if prefer is not None:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
