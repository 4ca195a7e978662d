"""Magnitude pruning (MP): keep the k weights of largest |w̄_q|.

This module also holds what the four baselines share: the result type
:class:`Pruned` and the input checks. Every baseline returns a ``Pruned(w, support)``:

    w        (p,)  pruned weights; w[~support] is exactly 0.0
    support  (p,)  bool, exactly k True entries: the kept weights

``support`` is explicit because a kept weight may be 0 (w̄ with fewer than k
nonzeros, or an OBS update that happens to land on 0); ``int(w.ne(0).sum())`` is
then < k, but ``support`` still says which k coordinates were kept.
``w, support = magnitude(w_bar, k)`` unpacks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from chita_minimal.methods.base import Method, Stage, Step, register
from chita_minimal.solver.threshold import hard_threshold
from chita_minimal.solver.problem import check_k, check_tensor
from chita_minimal.utils import check_number

class Pruned(NamedTuple):
    """Result of a baseline: pruned weights ``w`` (p,) and the kept ``support`` (p,) bool."""

    w: torch.Tensor
    support: torch.Tensor


# -- input checks shared by the baselines ---------------------------------------------------
def check_fisher_inputs(X, w_bar, k, l2) -> None:
    """Checks for the Fisher-based baselines: X (n, p) and w_bar (p,) float, same dtype/device; l2 > 0."""
    check_data(X, w_bar, k)
    check_number("l2", l2, low=0, low_open=True)


def check_data(X, w_bar, k) -> None:
    """X (n, p) and w_bar (p,) float, same dtype and device; 1 ≤ k ≤ p."""
    check_tensor("X", X, 2)
    check_tensor("w_bar", w_bar, 1)
    if w_bar.shape[0] != X.shape[1]:
        raise ValueError(f"w_bar has {w_bar.shape[0]} entries but X has p = {X.shape[1]} columns")
    if w_bar.dtype != X.dtype or w_bar.device != X.device:
        raise TypeError(f"w_bar ({w_bar.dtype}, {w_bar.device}) must match X ({X.dtype}, {X.device})")
    check_k(k, X.shape[1])


def finish(w: torch.Tensor, support: torch.Tensor) -> Pruned:
    """Zero the pruned coordinates exactly and pack the result."""
    return Pruned(torch.where(support, w, torch.zeros_like(w)), support)


# -- the method -----------------------------------------------------------------------------
def magnitude(w_bar: torch.Tensor, k: int) -> Pruned:
    """Global magnitude pruning: support = H_k(w̄), the k largest |w̄_q| (ties: lower index wins).

    Args:
        w_bar: (p,) dense weights, float32/float64, any device.
        k: number of weights kept, 1 ≤ k ≤ p.
    Returns:
        ``Pruned(w, support)`` with w = w̄ on the support and exactly 0 elsewhere.
    """
    check_tensor("w_bar", w_bar, 1)
    check_k(k, w_bar.numel())
    return finish(w_bar, hard_threshold(w_bar, k))


@register
@dataclass
class Magnitude(Method):
    """Magnitude pruning: keep the k largest |w̄_q| (the top-N of every group with an N:M pattern); no gradients."""

    name = "mp"
    summary = "magnitude pruning: keep the k weights of largest magnitude (no gradients)"
    needs_gradients = False
    takes_pattern = True

    def step(self, stage: Stage) -> Step:
        out = magnitude(stage.w, stage.k) if stage.pattern is None else Pruned(*stage.pattern.project(stage.w))
        return Step(out.w, out.support, None)
