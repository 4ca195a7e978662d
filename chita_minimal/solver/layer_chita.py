"""CHITA on the layer-wise problem: the solver of method "chita-layer" (one weight matrix, its Gram matrix).

The layer problem (:mod:`chita_minimal.solver.layer`) is CHITA's block problem (P) in Gram form: r rows (the
blocks), one shared H = XᵀX/N + λI (d × d), the ridge towards the dense W. It is solved in three phases:

1. **Support search by a penalty path** (:func:`chita_minimal.solver.alps.admm_path`), in the scaled coordinates
   (unit diagonal, |B_ij| = |W_ij|·‖X_j‖): ADMM with a penalty that grows more slowly than ALPS's schedule
   (×1.2 / ×1.1 / ×1.05 by how much the support moved, against ALPS's ×1.3 / ×1.2 / ×1.1), with ALPS's stopping
   rule (the support no longer moves, or after 30 iterations moves in fewer than 0.03 % of the kept entries). On
   SmolLM2-135M layers at 70 % plain IHT with the line search of Alg 2, and IHT alternated with exact refits
   (hard-thresholding pursuit), ended 7–32 % above ALPS's objective; this path with the two phases below ends
   0.5–2 % below it at 1.6× ALPS's time (×1.1 / ×1.05 / ×1.03: 1–4 % below, at 1.5× this path's time; without
   the stopping rule and with three rounds of phase 2: 0.02 % lower at 2.1× ALPS's time).
2. **Local search** (Alg 4's swaps in Gram form). On small layers (r·s²·d ≤ ``swap_budget``) exact single-weight
   moves by the OBS formulas (:func:`swap_search`), which also move weights between rows. Always: from the refit weights X with gradient G = (X − B)H̃, the
   IHT step P(X − G) (unit step: the diagonal of H̃ is 1) swaps each pruned weight whose gain g_j² beats the
   smallest kept x_i²; the new support is refit and kept only when the objective f drops (``swap_rounds``
   rounds; on SmolLM2 a second and third round lowered f by less than 0.05 %).
3. **Backsolve** of all rows on the final support (Alg 5 for every block): conjugate gradients on all rows at
   once until the residual fell by ``rtol`` (:func:`~chita_minimal.solver.layer.refit_rows`), or the exact
   batched Cholesky by support size (:func:`~chita_minimal.solver.layer.backsolve_rows`) with ``exact=True``.

Every phase only accepts a lower objective than the phase before, so the result is never worse than the path's
support refit — and starting from ``W0`` (e.g. SparseGPT's weights) it is never worse than ``W0``.
"""

from __future__ import annotations

import torch

from chita_minimal.solver.alps import admm_path
from chita_minimal.solver.layer import backsolve_rows, check_layer, check_target, project, refit_rows, scaled
from chita_minimal.utils import check_int, check_number

PATH_GROWTH = ((0.1, 1.2), (0.005, 1.1), (0.0, 1.05))  # ALPS: 1.3 / 1.2 / 1.1


def _objective(Hs, B0, X):
    """(f, E H̃) for E = X − B₀: f = tr(E H̃ Eᵀ), and the gradient/2 G = E H̃ (one product)."""
    E = X - B0
    G = E @ Hs
    return float((G * E).sum()), G


def _row_systems(Hs: torch.Tensor, mask: torch.Tensor):
    """Per row, its support (padded), validity and (H_SS)⁻¹ (padded with the identity), in float64."""
    r, d = mask.shape
    sizes = mask.sum(1)
    s = int(sizes.max())
    cols = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :s]  # (r, s) kept columns first
    valid = torch.arange(s, device=mask.device)[None, :] < sizes[:, None]
    H64 = Hs.to(torch.float64)
    A = H64[cols[:, :, None], cols[:, None, :]]
    both = valid[:, :, None] & valid[:, None, :]
    A = torch.where(both, A, torch.zeros((), dtype=A.dtype, device=A.device))
    A.diagonal(dim1=1, dim2=2)[~valid] = 1.0
    return cols, valid, torch.linalg.inv(A)


def _row_refit(H: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """One row's exact refit on the columns ``keep``: x_S = H_SS⁻¹ (H b)_S, 0 elsewhere."""
    S = keep.nonzero().squeeze(1)
    x = torch.zeros_like(b)
    if S.numel():
        x[S] = torch.linalg.solve(H[S][:, S], (b @ H)[S])
    return x


def swap_search(Hs: torch.Tensor, B0: torch.Tensor, X: torch.Tensor, max_moves: int = 50) -> torch.Tensor:
    """Alg 4's swap local search with exact OBS formulas, for layers small enough to invert every row's H_SS.

    At an exact refit X (gradient G = (X − B₀)H̃ zero on each row's support S), removing i ∈ S from its row costs
    x_i² / [(H_SS)⁻¹]_ii and adding j ∉ S gains g_j² / (H_jj − H_jS (H_SS)⁻¹ H_Sj), both with the row refit.
    Rows are independent, so moving one weight from row a to row b ≠ a changes f by exactly cost_a − gain_b;
    a swap inside one row is evaluated by its refit. The best improving move is made (the layer keeps its
    count), then the row systems are rebuilt; up to ``max_moves`` moves."""
    X = X.to(torch.float64)
    B = B0.to(torch.float64)
    H = Hs.to(torch.float64)
    r, d = X.shape
    for _ in range(max_moves):
        mask = X != 0
        if not bool(mask.any()) or bool(mask.all()):
            break
        cols, valid, Hinv = _row_systems(H, mask)
        G = (X - B) @ H  # (r, d), zero on the support at an exact refit
        xs = torch.gather(X, 1, cols)  # (r, s)
        diag = Hinv.diagonal(dim1=1, dim2=2)
        cost = torch.where(valid, xs ** 2 / diag, torch.full_like(xs, float("inf")))  # (r, s)
        HdS = H[:, cols].permute(1, 0, 2) * valid[:, None, :]  # (r, d, s) H_jS of every row
        schur = H.diagonal()[None, :] - ((HdS @ Hinv) * HdS).sum(-1)  # (r, d)
        gain = torch.where(mask, torch.zeros_like(G), G ** 2 / schur.clamp_min(1e-12))  # (r, d)
        c_best, c_pos = cost.min(1)
        g_best, g_col = gain.max(1)
        best_delta, move = 0.0, None
        # a weight moved between two different rows: exact
        order_c = torch.argsort(c_best)
        order_g = torch.argsort(g_best, descending=True)
        for a in order_c[:2].tolist():
            for b in order_g[:2].tolist():
                if a != b and float(c_best[a] - g_best[b]) < best_delta - 1e-12:
                    best_delta, move = float(c_best[a] - g_best[b]), (a, int(cols[a, c_pos[a]]), b, int(g_col[b]))
        # a swap inside one row: evaluated exactly by the row's refit — every pair (i, j) of the row when the layer
        # has few of them, else the row's best removal with its best addition, for the rows of largest gain
        few = int(mask.sum()) * int((~mask).sum()) <= 4096
        for a in (range(r) if few else order_g[:2].tolist()):
            kept, free = mask[a].nonzero().squeeze(1).tolist(), (~mask[a]).nonzero().squeeze(1).tolist()
            pairs = [(i, j) for i in kept for j in free] if few else (
                [(int(cols[a, c_pos[a]]), int(g_col[a]))] if kept and free else [])
            f_now = float(((B[a] - X[a]) @ H) @ (B[a] - X[a]))
            for i, j in pairs:
                row = mask[a].clone()
                row[i], row[j] = False, True
                xa = _row_refit(H, B[a], row)
                delta = float(((B[a] - xa) @ H) @ (B[a] - xa)) - f_now
                if delta < best_delta - 1e-12:
                    best_delta, move = delta, (a, i, a, j)
        if move is None:
            break
        a, i, b, j = move
        mask[a, i], mask[b, j] = False, True
        for row in {a, b}:
            X[row] = _row_refit(H, B[row], mask[row])
    return X.to(B0.dtype)


def chita_layer(W: torch.Tensor, H: torch.Tensor, k: int | None = None, *, pattern=None, W0: torch.Tensor | None = None,
                swap_rounds: int = 1, swap_budget: float = 1e5, restarts: int = 8, rho: float = 0.1, max_iter: int = 300, percdamp: float = 0.01,
                rtol: float = 1e-4, cg_iters: int = 20, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Layer-wise CHITA on one layer: W (r × d), H = XᵀX/N (d × d); keep k weights, or ``pattern`` (n, m)/"n:m".

    W0: feasible weights to start from as well (the result's objective is ≤ theirs); swap_rounds: rounds of the
    IHT-step local search; swap_budget: the exact swap search (:func:`swap_search`) runs when r·s²·d ≤ this
    (s: the largest row support; small layers only — a row's H_SS is inverted per move), with ``restarts``
    restarts from supports perturbed by two random trades (seeded); rho, max_iter: of the penalty path; percdamp: the ridge λ = percdamp·mean(diag H);
    rtol, cg_iters: of the conjugate-gradient backsolve; exact: backsolve by batched Cholesky instead.

    Returns (Ŵ, mask, info) with info = {"iterations", "swaps" (accepted rounds), "objective" (f in scaled
    coordinates, damped H)}.
    """
    check_layer(W, H)
    k, pattern = check_target(W, k, pattern)
    check_int("swap_rounds", swap_rounds, low=0)
    check_int("max_iter", max_iter)
    check_number("rho", rho, low=0, low_open=True)
    check_number("rtol", rtol, low=0)
    Hs, B0, d = scaled(W, H, percdamp)

    def refit(X):
        mask = X != 0
        if exact:
            return backsolve_rows(B0, Hs, mask).to(B0.dtype)
        return refit_rows(Hs, B0, X, mask, rtol=rtol, max_iter=cg_iters)

    D, it = admm_path(Hs, B0, k, pattern, rho=rho, max_iter=max_iter, growth=PATH_GROWTH)
    X = refit(D)
    f, G = _objective(Hs, B0, X)
    if W0 is not None:
        if W0.shape != W.shape:
            raise ValueError(f"W0 must have the shape of W {tuple(W.shape)}, got {tuple(W0.shape)}")
        X0 = refit(project(W0.to(B0.dtype) * d, k, pattern))
        f0, G0 = _objective(Hs, B0, X0)
        if f0 < f:
            X, f, G = X0, f0, G0
    if pattern is None and X.shape[0] * float((X != 0).sum(1).max()) ** 2 * X.shape[1] <= swap_budget:
        X = swap_search(Hs, B0, backsolve_rows(B0, Hs, X != 0).to(B0.dtype))
        f, G = _objective(Hs, B0, X)
        g = torch.Generator().manual_seed(0)
        for _ in range(restarts):  # restarts from perturbed supports: two kept weights traded for two pruned ones
            mask = (X != 0).flatten().cpu()
            kept, free = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
            t = min(2, len(kept), len(free))
            mask[kept[torch.randperm(len(kept), generator=g)[:t]]] = False
            mask[free[torch.randperm(len(free), generator=g)[:t]]] = True
            Xr = swap_search(Hs, B0, backsolve_rows(B0, Hs, mask.view_as(X).to(X.device)).to(B0.dtype))
            fr, Gr = _objective(Hs, B0, Xr)
            if fr < f:
                X, f, G = Xr, fr, Gr
    swaps = 0
    for _ in range(swap_rounds):
        Xc = refit(project(X - G, k, pattern))
        fc, Gc = _objective(Hs, B0, Xc)
        if fc >= f:
            break
        X, f, G = Xc, fc, Gc
        swaps += 1
    mask = X != 0
    return (X / d).to(W.dtype), mask, {"iterations": it, "swaps": swaps, "objective": f}
