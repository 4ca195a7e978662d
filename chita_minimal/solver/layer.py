"""The layer-wise reconstruction problem in Gram form: what SparseGPT, Wanda, ALPS and layer-wise CHITA solve.

A linear layer maps inputs x ∈ R^d to W x, W (r × d). On N calibration inputs X (N × d) its pruned weights Ŵ
should reproduce the dense outputs:

    min_Ŵ  f(Ŵ) = tr((W − Ŵ) H (W − Ŵ)ᵀ)     s.t.  ‖Ŵ‖₀ ≤ k  (or N:M in every row),      H = XᵀX / N.

f is ‖(W − Ŵ) Xᵀ‖²_F / N: the mean squared output error. Each of the r output rows is an independent block
whose Gram matrix is the same H (d × d), so this is CHITA's block problem (P) in Gram form, with X_ℓ in place of
the per-sample gradients and the ridge λ‖ŵ − w‖² (CHITA's λ‖w − w̄‖²) as H + λI. Nothing here is n × p: the
solvers read H (d × d) and W (r × d) only.

Shared pieces: the objective, the damping of H, the projection onto the constraint (top-k over the whole layer,
or the n largest of every m consecutive weights of a row), and the exact backsolve of all rows on their supports
(batched Cholesky, rows of similar support size solved together, as in the block backsolve of Alg 6).
"""

from __future__ import annotations

import torch

from chita_minimal.solver.threshold import top_k_mask
from chita_minimal.utils import check_int, check_number


def check_layer(W, H) -> None:
    """TypeError/ValueError in the user's words unless W (r × d) and H (d × d) are a finite layer problem."""
    for name, t in (("W", W), ("H", H)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 2 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 2-d tensor, got shape {tuple(t.shape)}")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H must be {W.shape[1]} × {W.shape[1]} to match W {tuple(W.shape)}, got {tuple(H.shape)}")
    if H.device != W.device:
        raise ValueError(f"W ({W.device}) and H ({H.device}) must be on the same device")
    if not (torch.isfinite(W).all() and torch.isfinite(H).all()):
        raise ValueError("W and H must be finite (no NaN or Inf)")


def layer_error(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    """f(Ŵ) = tr((W − Ŵ) H (W − Ŵ)ᵀ) = ‖(W − Ŵ)Xᵀ‖²_F / N for H = XᵀX/N (computed in float64)."""
    D = (W - What).to(torch.float64)
    return float(((D @ H.to(torch.float64)) * D).sum())


def damp(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """H + λI with λ = percdamp · mean(diag H) (SparseGPT's damping; CHITA's ridge towards the dense W).
    Inputs that were always zero (H_jj = 0) get H_jj = 1 so that H + λI stays positive definite."""
    check_number("percdamp", percdamp, low=0)
    H = H.clone()
    diag = H.diagonal()
    lam = float(percdamp) * float(diag.mean())
    diag[diag == 0] = 1.0
    diag.add_(lam)
    return H


def keep_mask(score: torch.Tensor, k: int | None = None, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """The constraint set's projection as a mask (True = kept) by ``score`` (r × d): the k largest scores of the
    whole layer, or with ``pattern=(n, m)`` the n largest of every m consecutive entries of each row.
    Ties keep the lower index."""
    r, d = score.shape
    if pattern is not None:
        n, m = pattern
        g = score.reshape(r, d // m, m)
        top = torch.sort(g, dim=2, descending=True, stable=True).indices[..., :n]
        return torch.zeros_like(g, dtype=torch.bool).scatter_(2, top, True).reshape(r, d)
    return top_k_mask(score.flatten(), k).view(r, d)  # a selection, not a sort


def backsolve_rows(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, *, max_bytes: int = 2**28) -> torch.Tensor:
    """The exact minimiser of f on a fixed support, every row at once: Ŵ_{r,S} = H_SS⁻¹ (W H)_{r,S}, 0 elsewhere.

    Row r keeps the columns S_r = mask[r]; its optimal weights solve H_SS ŵ_S = (H w_r)_S (Alg 5 of the paper
    for one block). Rows are sorted by support size and solved in batches of similar size: each batch gathers its
    H_SS (padded with the identity up to the batch's largest support) and runs one batched Cholesky in float64,
    holding at most ``max_bytes`` of gathered systems at a time. H should be damped (positive definite).
    """
    r, d = W.shape
    out = torch.zeros(r, d, dtype=W.dtype, device=W.device)
    H64 = H.to(torch.float64)
    B = (W.to(torch.float64) @ H64)  # (r, d) right-hand sides (W H)_r
    sizes = mask.sum(1)
    order = torch.argsort(sizes, descending=True)
    sizes_sorted = sizes[order].tolist()
    # the support of each row first, in column order: a stable sort of ~mask puts kept columns first
    cols = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # (r, d)
    start = 0
    while start < r:
        s = int(sizes_sorted[start])
        if s == 0:
            break
        batch = max(1, min(r - start, max_bytes // (8 * s * s)))
        rows = order[start:start + batch]
        idx = cols[rows, :s]  # (b, s) kept columns (the first s of each row's ordering)
        valid = torch.arange(s, device=W.device)[None, :] < sizes[rows][:, None]  # (b, s)
        A = H64[idx[:, :, None], idx[:, None, :]]  # (b, s, s)
        both = valid[:, :, None] & valid[:, None, :]
        A = torch.where(both, A, torch.zeros((), dtype=A.dtype, device=A.device))
        A.diagonal(dim1=1, dim2=2)[~valid] = 1.0
        rhs = torch.where(valid, B[rows[:, None], idx], torch.zeros((), dtype=B.dtype, device=B.device))
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):
            raise ValueError("the layer's Gram matrix is not positive definite on a support: damp it (percdamp > 0)")
        sol = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)  # (b, s)
        vals = torch.where(valid, sol, torch.zeros((), dtype=sol.dtype, device=sol.device)).to(W.dtype)
        out[rows[:, None], idx] = torch.where(valid, vals, out[rows[:, None], idx])
        start += batch
    return out


def refit_rows(H: torch.Tensor, W: torch.Tensor, X: torch.Tensor, mask: torch.Tensor, *, max_iter: int = 50,
               rtol: float = 1e-4) -> torch.Tensor:
    """The backsolve by conjugate gradients, all rows at once: min f(X) with X = 0 off ``mask``, started at X.

    Each step is one (r × d)(d × d) product for every row together (no gathered H_SS): the fast path of the
    backsolve, exact up to ``rtol`` (stop when every row's residual of the normal equations (X H)_S = (W H)_S
    has fallen by that factor, or after ``max_iter`` steps; the residual is read back every 5 steps). With H
    scaled to unit diagonal (ALPS's scaling) it converges in a few steps; :func:`backsolve_rows` is exact.
    """
    check_int("max_iter", max_iter, low=0)
    m = mask.to(X.dtype)
    tiny = torch.finfo(X.dtype).tiny
    X = X * m
    R = (W - X) @ H * m  # (r, d) residual of each row's normal equations on its support
    P = R.clone()
    rr = (R * R).sum(1)
    stop = (rtol ** 2) * rr.max()
    for it in range(max_iter):
        if it % 5 == 0 and float(rr.max()) <= float(stop):
            break
        AP = (P @ H) * m
        alpha = rr / (P * AP).sum(1).clamp_min(tiny)
        X = X + alpha[:, None] * P
        R = R - alpha[:, None] * AP
        rr_new = (R * R).sum(1)
        P = R + (rr_new / rr.clamp_min(tiny))[:, None] * P
        rr = rr_new
    return X * m


def scaled(W: torch.Tensor, H: torch.Tensor, percdamp: float):
    """The layer problem in ALPS's scaled coordinates: (H̃, B, d) with H̃ = D⁻¹(H + λI)D⁻¹ (unit diagonal),
    B = W D, D = diag(d), d = diag(H + λI)^½; f(Ŵ) = tr((B − B̂) H̃ (B − B̂)ᵀ) for B̂ = Ŵ D, and |B_ij| = |W_ij|·‖X_j‖
    (damped) is Wanda's score. float32 unless W is float64."""
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    H = damp(H.to(torch.float64), percdamp)
    d = H.diagonal().sqrt()
    Hs = H / d[:, None] / d[None, :]
    return Hs.to(dt), (W.to(torch.float64) * d).to(dt), d.to(dt)


def project(U: torch.Tensor, k: int | None, pattern=None) -> torch.Tensor:
    """U with all but its largest entries |U| set to zero: the top k of the layer, or n of every m of a row."""
    return U * keep_mask(U.abs(), k, pattern)


def kept_count(shape, k: int | None, pattern) -> int:
    """Weights the constraint keeps: k, or r·d·n/m under an n:m pattern."""
    return k if pattern is None else shape[0] * shape[1] * pattern[0] // pattern[1]


def check_target(W: torch.Tensor, k, pattern) -> tuple[int | None, tuple[int, int] | None]:
    """(k, pattern) checked against W (r × d): exactly one is given; k in [0, r·d]; m divides d."""
    from chita_minimal.solver.patterns import parse_pattern

    if (k is None) == (pattern is None):
        raise ValueError("give exactly one of k (weights kept in the layer) or pattern (n:m)")
    if pattern is not None:
        n, m = parse_pattern(pattern)
        if W.shape[1] % m:
            raise ValueError(f"pattern {n}:{m} needs the row length {W.shape[1]} to be divisible by m = {m}")
        return None, (n, m)
    check_int("k", k, low=0)
    if k > W.numel():
        raise ValueError(f"k = {k} exceeds the layer's {W.numel()} weights")
    return k, None


def row_counts(r: int, k: int) -> torch.Tensor:
    """k kept weights spread over r rows as evenly as possible (the first k mod r rows keep one more)."""
    counts = torch.full((r,), k // r, dtype=torch.long)
    counts[:k % r] += 1
    return counts


def keep_per_row(score: torch.Tensor, k: int | None, pattern=None) -> torch.Tensor:
    """Mask of the largest scores compared within each row: k spread evenly over the rows (:func:`row_counts`),
    or n of every m under a pattern. Ties keep the lower index."""
    if pattern is not None:
        return keep_mask(score, None, pattern)
    r, d = score.shape
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(d, device=score.device).expand(r, d))
    return ranks < row_counts(r, k).to(score.device)[:, None]


def wanda(W: torch.Tensor, norms: torch.Tensor, k: int | None = None, *, pattern=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda (Sun, Liu, Bair, Kolter 2023, Eq. 1): score S_ij = |W_ij| · ‖X_j‖₂, compared within each output
    row (k spread evenly over the rows, or n of every m); the kept weights are not changed.

    norms: ‖X_j‖² / N per input j (d,) — the diagonal of H; the scale does not change the choice."""
    k, pattern = check_target(W, k, pattern)
    if norms.shape != (W.shape[1],):
        raise ValueError(f"norms must have shape ({W.shape[1]},) to match W {tuple(W.shape)}, got {tuple(norms.shape)}")
    mask = keep_per_row(W.abs() * norms.to(W.dtype).clamp_min(0).sqrt()[None, :], k, pattern)
    return W * mask, mask


def magnitude(W: torch.Tensor, k: int | None = None, *, pattern=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude pruning of one layer: keep the k largest |W_ij| of the layer (or n of every m in a row)."""
    k, pattern = check_target(W, k, pattern)
    mask = keep_mask(W.abs(), k, pattern)
    return W * mask, mask
