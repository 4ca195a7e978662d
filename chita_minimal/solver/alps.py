"""ALPS (Meng, Behdin, Wang, Mazumder, "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for Large
Language Models", NeurIPS 2024): the CHITA authors' layer-wise solver, written from the paper's Algorithm 1.

On the layer problem of :mod:`chita_minimal.solver.layer`, in the scaled coordinates H̃ = D⁻¹(H + λI)D⁻¹,
B = W D (unit diagonal), ADMM splits the weights into a dense copy B and a feasible copy D:

    B^{t+1} = (H̃ B₀ − Vᵗ + ρ_t Dᵗ)(H̃ + ρ_t I)⁻¹                (one eigendecomposition of H̃ serves every ρ)
    D^{t+1} = P(B^{t+1} + Vᵗ / ρ_t)                             (top-k of the layer, or N:M in every row)
    V^{t+1} = Vᵗ + ρ_t (B^{t+1} − D^{t+1})

Every ``update_every`` iterations the penalty ρ grows by how much the support moved since the last check
(×1.3 when more than 10 % of the kept entries changed, ×1.2 above 0.5 %, ×1.1 otherwise), which pulls B and D
together; the path stops when the support no longer changes (or, after ``10·update_every`` iterations, changes
in fewer than 0.03 % of the kept entries). The weights on the final support are then refit by conjugate
gradients (10 steps from D; the diagonal scaling is the preconditioner).

:func:`admm_path` is the support search alone; layer-wise CHITA (:mod:`.layer_chita`) starts from it too.
"""

from __future__ import annotations

import torch

from chita_minimal.solver.layer import check_layer, check_target, kept_count, project, refit_rows, scaled
from chita_minimal.utils import check_int, check_number

ALPS_GROWTH = ((0.1, 1.3), (0.005, 1.2), (0.0, 1.1))  # (share of kept entries that moved, factor on ρ)


def admm_path(Hs: torch.Tensor, B0: torch.Tensor, k: int | None, pattern, *, rho: float = 0.1, max_iter: int = 300,
              update_every: int = 3, growth=ALPS_GROWTH, early_stop: bool = True) -> tuple[torch.Tensor, int]:
    """The ADMM penalty path on the scaled problem (H̃, B₀): returns (D, iterations), D feasible.

    ``growth``: ((share, factor), ...) from the largest share down: ρ is multiplied by the factor of the first
    share that the support change exceeds (ALPS's schedule by default)."""
    evals, Q = torch.linalg.eigh(Hs.to(torch.float64))
    evals, Q = evals.to(Hs.dtype), Q.to(Hs.dtype)

    def inverse(rho):  # (H̃ + ρI)⁻¹
        return (Q / (evals + rho)) @ Q.T

    count = kept_count(B0.shape, k, pattern)
    G = B0 @ Hs  # (r, d) H̃ B₀ of every row
    D = project(B0, k, pattern)
    V = torch.zeros_like(B0)
    inv = inverse(rho)
    last = D != 0
    it = 0
    for it in range(1, max_iter + 1):
        B = (G - V + rho * D) @ inv
        D = project(B + V / rho, k, pattern)
        V = V + rho * (B - D)
        if it % update_every == 0:
            support = D != 0
            change = int((support ^ last).sum())
            last = support
            if (change == 0 and it > update_every) or (early_stop and it >= 10 * update_every
                                                         and change < 3e-4 * count):
                break
            share = change / max(count, 1)
            rho = min(rho * next(f for s, f in growth if share > s or s == 0.0), 1e6)
            inv = inverse(rho)
    return D, it


def alps(W: torch.Tensor, H: torch.Tensor, k: int | None = None, *, pattern=None, rho: float = 0.1,
         max_iter: int = 300, update_every: int = 3, cg_iters: int = 10,
         percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """ALPS on one layer: W (r × d), H = XᵀX/N (d × d); keep k weights of the layer, or ``pattern`` (n, m)/"n:m".

    Returns (Ŵ, mask, info): mask True = kept, info = {"iterations": ADMM iterations run}."""
    check_layer(W, H)
    k, pattern = check_target(W, k, pattern)
    check_number("rho", rho, low=0, low_open=True)
    check_int("max_iter", max_iter)
    check_int("update_every", update_every)
    check_int("cg_iters", cg_iters, low=0)
    Hs, B0, d = scaled(W, H, percdamp)
    D, it = admm_path(Hs, B0, k, pattern, rho=rho, max_iter=max_iter, update_every=update_every)
    mask = D != 0
    X = refit_rows(Hs, B0, D, mask, max_iter=cg_iters, rtol=0.0)
    return (X / d).to(W.dtype), mask, {"iterations": it}
