"""Backsolve, CHITA-BSO (the paper's Alg 5): choose a support, then solve the ridge
problem restricted to it in closed form.

On a support S the objective (P) is a ridge regression in w_S. Writing w_S = w̄_S + Δ
and r₀ = y − X_S w̄_S, its minimiser solves

    (X_SᵀX_S + 2λI) Δ = X_Sᵀ r₀ − α_S                               (|S|×|S| system)

and, when n < |S|, the Woodbury identity turns this into an n×n system:

    Δ = X_Sᵀ (X_S X_Sᵀ + 2λI_n)⁻¹ (r₀ + X_S α_S / 2λ) − α_S / 2λ.

Gram matrices are formed in the input dtype (the costly matmul) and solved in fp64
(the cheap part), which keeps fp32 inputs accurate.
"""

from __future__ import annotations

import torch

from .iht import hard_threshold
from .problem import Problem


def _spd_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve A x = b for a symmetric positive (semi)definite A, in fp64.

    Cholesky when A is positive definite; least squares (minimum norm) otherwise,
    e.g. for λ = 0 with collinear columns.
    """
    A64, b64 = A.double(), b.double()
    L, info = torch.linalg.cholesky_ex(A64)
    if int(info) == 0:
        return torch.cholesky_solve(b64.unsqueeze(-1), L).squeeze(-1)
    return torch.linalg.lstsq(A64.cpu(), b64.cpu().unsqueeze(-1), driver="gelsd").solution.squeeze(-1).to(A.device)


def ridge_on_support(problem: Problem, support: torch.Tensor, *, woodbury: bool | None = None) -> torch.Tensor:
    """argmin of (P) over w with w = 0 outside ``support`` (bool mask, shape (p,)).

    ``woodbury=None`` picks the n×n path when n < |S| (and λ > 0 or α = 0), else the
    |S|×|S| path. Returns the full (p,) weight vector.
    """
    idx = torch.nonzero(support).squeeze(1)
    w = torch.zeros_like(problem.w_bar)
    if idx.numel() == 0:
        return w
    XS = problem.X[:, idx]  # (n, s)
    w_bar_S = problem.w_bar[idx]
    alpha_S = None if problem.alpha is None else problem.alpha[idx]
    lam2 = 2.0 * problem.lam
    r0 = problem.y - XS @ w_bar_S  # (n,)
    n, s = XS.shape
    if woodbury is None:
        woodbury = n < s and (lam2 > 0 or alpha_S is None)
    if woodbury:
        if alpha_S is not None and lam2 == 0:
            raise ValueError("the Woodbury path needs l2 > 0 when alpha is given")
        K = XS @ XS.T  # (n, n)
        K.diagonal().add_(lam2)
        rhs = r0 if alpha_S is None else r0 + XS @ alpha_S / lam2
        z = _spd_solve(K, rhs).to(XS.dtype)  # (n,)
        delta = XS.T @ z
        if alpha_S is not None:
            delta -= alpha_S / lam2
    else:
        G = XS.T @ XS  # (s, s)
        G.diagonal().add_(lam2)
        b = XS.T @ r0
        if alpha_S is not None:
            b -= alpha_S
        delta = _spd_solve(G, b).to(XS.dtype)
    w[idx] = w_bar_S + delta
    return w


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
