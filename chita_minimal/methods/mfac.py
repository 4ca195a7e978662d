"""M-FAC (Frantar, Kurtic & Alistarh, NeurIPS 2021): matrix-free inverse-Fisher products for OBS.

The damped empirical Fisher from n gradients g_i (rows of X, G = X),

    F = l2·I + (1/n) Σ_i g_i g_iᵀ,

is inverted by the recursive Woodbury form of the paper's static algorithm (Sec. 3):
with F_0 = l2·I and v_i = F_{i-1}⁻¹ g_i,

    F⁻¹ x = x / l2 − Σ_i v_i (v_iᵀ x) / d_i,       d_i = n + g_iᵀ v_i          (eq. 3)

Each v_i is a combination of the gradients, v_i = Σ_j C_ij g_j with C (n×n) lower
triangular. Setup (once, O(n²p + n³)): the Gram matrix K = G Gᵀ; the scalars
D_ji = v_jᵀ g_i (j ≤ i) by the recursion D_i· = K_i·/l2 − Σ_{j<i} D_ji D_j· / d_j (one
rank-one elimination per i); then C from v_i = g_i/l2 − Σ_{j<i} (D_ji/d_j) v_j, a unit
triangular solve. After that

    F⁻¹ x = x / l2 − Gᵀ Cᵀ diag(1/d) C G x                       O(np) per product
    diag(F⁻¹)_q = 1/l2 − Σ_i (C G)_iq² / d_i                      O(n²p), in column chunks

and F (p×p) is never formed.

Pruning (OBS over all p weights, no blocks): saliency ρ_q = w_q² / (2[F⁻¹]_qq), remove
the lowest, update with one product δw = −F⁻¹u, u_q = w_q/[F⁻¹]_qq on the removed q (the
sum of single-weight OBS updates), zero them. With ``steps > 1`` the target goes
p → k through a geometric sequence k_t = p (k/p)^{t/steps}; saliencies are recomputed at
the updated weights with the gradients kept fixed. Between steps the gradient columns of
already-pruned weights are masked to 0, so F⁻¹ on the kept coordinates is the inverse of
the Fisher restricted to them and the update never moves pruned weights (a choice of ours:
exact OBS on the remaining support).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chita_minimal.methods.base import Method, Stage, Step, register
from chita_minimal.methods.magnitude import Pruned, check_fisher_inputs, finish
from chita_minimal.solver.threshold import hard_threshold
from chita_minimal.solver.problem import Problem, check_tensor
from chita_minimal.utils import check_int, check_number

_DIAG_CHUNK = 8192  # columns of C·G formed at a time by diag()


class InverseFisher:
    """F⁻¹ for F = l2·I + (1/n) XᵀX, matrix-free (M-FAC static algorithm).

    Args:
        X: (n, p) gradients, one per row (float32/float64, any device).
        l2: damping > 0.
    Methods:
        matvec(v): F⁻¹ v for v of shape (p,) or (p, m).
        diag(): the (p,) diagonal of F⁻¹.
    """

    def __init__(self, X: torch.Tensor, l2: float):
        check_tensor("X", X, 2)
        check_number("l2", l2, low=0, low_open=True)
        n = X.shape[0]
        self.G, self.l2 = X, float(l2)
        # D_ji = v_jᵀ g_i for j ≤ i, by the recursion over i (rank-one eliminations)
        D = (X @ X.T) / self.l2  # starts as K / l2, (n, n)
        for j in range(n - 1):
            r = D[j, j + 1:]  # final row j: v_jᵀ g_i, i > j
            D[j + 1:, j + 1:].addr_(r / (n + D[j, j]), r, alpha=-1.0)  # D_i· −= D_ji D_j· / d_j
        self.d = n + torch.diagonal(D)  # d_i = n + g_iᵀ v_i, (n,)
        # v_i = g_i/l2 − Σ_{j<i} (D_ji/d_j) v_j  ⇔  (I + A) C = I/l2, A_ij = D_ji/d_j (j < i)
        A = (torch.triu(D, 1) / self.d.unsqueeze(1)).T  # strictly lower, (n, n)
        eye = torch.eye(n, dtype=X.dtype, device=X.device)
        self.C = torch.linalg.solve_triangular(eye + A, eye / self.l2, upper=False, unitriangular=True)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """F⁻¹ v = v/l2 − Σ_i v_i (v_iᵀ v)/d_i; v is (p,) or (p, m)."""
        c = self.C @ (self.G @ v)  # v_iᵀ v, (n,) or (n, m)
        d = self.d if v.dim() == 1 else self.d.unsqueeze(1)
        return v / self.l2 - self.G.T @ (self.C.T @ (c / d))

    def diag(self) -> torch.Tensor:
        """diag(F⁻¹)_q = 1/l2 − Σ_i (v_i)_q² / d_i, computed in column chunks, (p,)."""
        p = self.G.shape[1]
        out = torch.empty(p, dtype=self.G.dtype, device=self.G.device)
        for s in range(0, p, _DIAG_CHUNK):
            V = self.C @ self.G[:, s:s + _DIAG_CHUNK]  # rows v_i restricted to the chunk, (n, c)
            out[s:s + _DIAG_CHUNK] = 1.0 / self.l2 - (V * V / self.d.unsqueeze(1)).sum(0)
        return out


def _targets(p: int, k: int, steps: int) -> list[int]:
    """Geometric sequence of kept counts p (k/p)^{t/steps}, t = 1..steps, ending exactly at k."""
    ks = [max(k, min(p, round(p * (k / p) ** (t / steps)))) for t in range(1, steps)] + [k]
    return sorted(set(ks), reverse=True)


def mfac(X: torch.Tensor, w_bar: torch.Tensor, k: int, *, l2: float, steps: int = 1) -> Pruned:
    """One-shot M-FAC OBS pruning to k weights (no blocks), in ``steps`` geometric steps.

    Args:
        X: (n, p) gradients (rows), float32/float64, any device.
        w_bar: (p,) dense weights, same dtype and device as X.
        k: number of weights kept, 1 ≤ k ≤ p.
        l2: damping of F = l2·I + (1/n)XᵀX, > 0.
        steps: number of pruning steps (≥ 1); gradients stay fixed.
    Returns:
        ``Pruned(w, support)``: support has exactly k True entries, w is 0 off it.
    """
    check_fisher_inputs(X, w_bar, k, l2)
    check_int("steps", steps)
    p = w_bar.numel()
    w = w_bar.clone()
    support = torch.ones(p, dtype=torch.bool, device=w.device)
    for kt in _targets(p, k, steps):
        if kt == int(support.sum()):
            continue
        Xs = X if bool(support.all()) else X * support  # mask gradients of pruned weights
        Finv = InverseFisher(Xs, l2)
        diag = Finv.diag()  # (p,)
        idx = torch.nonzero(support).squeeze(1)  # current support, ascending
        rho = w[idx] ** 2 / (2.0 * diag[idx])  # OBS saliency
        new = torch.zeros_like(support)
        new[idx[hard_threshold(rho, kt)]] = True
        removed = support & ~new
        u = torch.where(removed, w / diag, torch.zeros_like(w))  # u_q = w_q / [F⁻¹]_qq
        w = torch.where(new, w - Finv.matvec(u), torch.zeros_like(w))  # δw = −F⁻¹u, then zero
        support = new
    return finish(w, support)


@register
@dataclass
class MFAC(Method):
    """M-FAC: OBS with the full (not block-diagonal) inverse Fisher by rank-one updates, in ``steps`` steps."""

    name = "mfac"
    summary = "M-FAC: OBS with the full inverse Fisher by rank-one updates"
    needs_l2 = True
    steps: int = 1

    def working_bytes(self, n, p, k, itemsize):
        return super().working_bytes(n, p, k, itemsize) + (2 * n * n + n * p) * itemsize  # factors of F⁻¹

    def step(self, stage: Stage) -> Step:
        out = mfac(stage.X, stage.w, stage.k, l2=stage.l2, steps=self.steps)
        return Step(out.w, out.support, Problem(stage.X, stage.w, stage.l2, stage.alpha).objective(out.w))
