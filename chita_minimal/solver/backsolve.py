"""Backsolve, CHITA-BSO (the paper's Alg 5): choose a support, then solve the ridge
problem restricted to it in closed form.

The support is that of one thresholding step from w̄ (:func:`first_step_support`); the
restricted solve is :func:`chita_minimal.solver.problem.ridge_on_support` (|S|×|S| normal
equations, or their n×n Woodbury form when n < |S|; Gram matrices in the input dtype, solved
in fp64).
"""

from __future__ import annotations

import torch

from chita_minimal.solver.threshold import hard_threshold
from chita_minimal.solver.problem import Problem, ridge_on_support


def first_step(problem: Problem) -> torch.Tensor:
    """One IHT step from w̄ before thresholding: w̄ − ∇f(w̄)/L (just w̄ when the gradient vanishes)."""
    g = problem.gradient(problem.w_bar, torch.zeros_like(problem.y))
    if not bool(g.any()):
        return problem.w_bar
    return problem.w_bar - g / problem.lipschitz()


def first_step_support(problem: Problem, k: int | None, pattern=None) -> torch.Tensor:
    """Support of one IHT step from w̄: top-k of |w̄ − ∇f(w̄)/L| (Alg 5, step 1), or its
    N:M projection with a ``pattern`` (k = pattern.k or None).

    With α = 0 the gradient at w̄ vanishes and this is the magnitude-pruning mask.
    """
    u = first_step(problem)
    return hard_threshold(u, k) if pattern is None else pattern.keep_top(u)


def backsolve(problem: Problem, k: int | None, support: torch.Tensor | None = None, *,
              woodbury: bool | None = None, pattern=None):
    """CHITA-BSO (Alg 5): support from one thresholding step, then the restricted ridge solve.

    With an N:M ``pattern`` the step is thresholded to N per group. Returns (w, support).
    """
    if pattern is not None:
        k = pattern.check_k(k)
    if support is None:
        support = first_step_support(problem, k, pattern)
    w = problem.ridge(support) if woodbury is None else ridge_on_support(problem, support, woodbury=woodbury)
    return w, support
