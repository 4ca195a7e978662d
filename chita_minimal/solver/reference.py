"""Plain references in numpy: the textbook form of the solvers, for benchmarks and the runtime chapter.

They solve the same problem (P) as the package's solvers, written as directly as possible (no carried
residuals, no active set, no batching), so that a speed ratio against them shows what the package's
engineering buys on the reader's own machine (``bench/speed.py``; the runtime chapter).
"""

from __future__ import annotations

import itertools

import numpy as np


def objective(X: np.ndarray, y: np.ndarray, w: np.ndarray, w_bar: np.ndarray, lam: float) -> float:
    """f(w) = ½‖y − Xw‖² + λ‖w − w̄‖² (problem (P), Eq. 4, with α = 0)."""
    r = y - X @ w
    return 0.5 * float(r @ r) + lam * float((w - w_bar) @ (w - w_bar))


def brute_force(X: np.ndarray, w_bar: np.ndarray, k: int, l2: float) -> float:
    """The optimum of (P) with α = 0 by enumeration: min over all C(p, k) supports S of f at the ridge solve on S,
    (X_SᵀX_S + 2λI) w_S = X_Sᵀy + 2λw̄_S, each system solved directly (in batches). For p of a few dozen at most;
    with l2 = 0 every k columns must be independent."""
    n, p = X.shape
    lam = l2 * n / 2.0
    y = X @ w_bar
    supports = np.array(list(itertools.combinations(range(p), k)))
    best = np.inf
    for S in np.array_split(supports, max(1, len(supports) // 4096)):
        XS = X[:, S].transpose(1, 0, 2)  # (m, n, k)
        A = XS.transpose(0, 2, 1) @ XS + 2 * lam * np.eye(k)
        b = XS.transpose(0, 2, 1) @ y + 2 * lam * w_bar[S]
        wS = np.linalg.solve(A, b[..., None])[..., 0]
        r = y[None, :] - (XS @ wS[..., None])[..., 0]
        outside = float(w_bar @ w_bar) - (w_bar[S] ** 2).sum(1)
        f = 0.5 * (r * r).sum(1) + lam * (((wS - w_bar[S]) ** 2).sum(1) + outside)
        best = min(best, float(f.min()))
    return best


def iht(X: np.ndarray, w_bar: np.ndarray, k: int, l2: float, *, tol: float = 1e-7, max_iter: int = 2000):
    """IHT with a backtracking line search on the step (Alg 3 in its textbook form), from H_k(w̄).

    Each iteration: g = ∇f(w); w ← H_k(w − ηg) with η starting at 1/L (L = ‖X‖² + 2λ by power iteration),
    doubled while f decreases (≤ 8 doublings), or halved until f does not increase. Stops when f decreases
    by less than tol·|f|. λ = l2·n/2 as in the package. Returns (w, f, iterations).
    """
    n, p = X.shape
    lam = l2 * n / 2.0
    y = X @ w_bar
    v = np.random.default_rng(0).standard_normal(p).astype(X.dtype)
    for _ in range(30):  # power iteration for ‖X‖²
        v = X.T @ (X @ v)
        v /= np.linalg.norm(v)
    L = float(np.linalg.norm(X @ v) ** 2) + 2 * lam

    def threshold(u):
        out = np.zeros_like(u)
        top = np.argpartition(-np.abs(u), k - 1)[:k]
        out[top] = u[top]
        return out

    w = threshold(w_bar)
    f = objective(X, y, w, w_bar, lam)
    for it in range(1, max_iter + 1):
        g = -(X.T @ (y - X @ w)) + 2 * lam * (w - w_bar)
        eta, best_w, best_f = 1.0 / L, None, f
        for _ in range(8):  # grow the step while it helps
            cand = threshold(w - eta * g)
            fc = objective(X, y, cand, w_bar, lam)
            if fc >= best_f:
                break
            best_w, best_f, eta = cand, fc, 2 * eta
        while best_w is None and eta > 1e-6 / L:  # or shrink it until f does not increase
            eta /= 2
            cand = threshold(w - eta * g)
            fc = objective(X, y, cand, w_bar, lam)
            if fc <= f:
                best_w, best_f = cand, fc
        if best_w is None or f - best_f < tol * abs(f):
            return (w if best_w is None else best_w), min(f, best_f), it
        w, f = best_w, best_f
    return w, f, max_iter


def block_backsolve(X: np.ndarray, w_bar: np.ndarray, spans, support: np.ndarray, l2: float) -> np.ndarray:
    """Alg 6 on a fixed support, one block at a time: for each contiguous block (start, width) of ``spans``,
    (X_SᵀX_S + 2λI)Δ = X_Sᵀr₀ with r₀ = X_b w̄_b − X_S w̄_S, solved by Cholesky in fp64; w_S = w̄_S + Δ."""
    n = X.shape[0]
    lam2 = l2 * n
    w = np.zeros_like(w_bar)
    for a, width in spans:
        Xb, wb, sb = X[:, a:a + width], w_bar[a:a + width], support[a:a + width]
        if not sb.any():
            continue
        XS = Xb[:, sb]
        r0 = Xb @ wb - XS @ wb[sb]
        A = (XS.T @ XS).astype(np.float64) + lam2 * np.eye(XS.shape[1])
        c = np.linalg.cholesky(A)
        delta = np.linalg.solve(c.T, np.linalg.solve(c, (XS.T @ r0).astype(np.float64)))
        w[a:a + width][sb] = wb[sb] + delta.astype(X.dtype)
    return w
