"""The optimisation problem (P) of CHITA (Benbaki et al. 2023, eq. (4)-(5)).

    min_w  f(w) = ½‖y − X w‖² + λ‖w − w̄‖² + αᵀw     s.t.  ‖w‖₀ ≤ k

X (n×p) stacks n gradients (one row per mini-batch) so that (1/n)XᵀX is the
empirical Fisher; y = X w̄; λ = l2·n/2 (the 1/n of the Fisher sits in λ); α is the
optional first-order term. X is never squared into a p×p matrix here, except by the exact
solve on a support, :func:`ridge_on_support` (|S|×|S| or n×n Gram matrices; Alg 5's second step).
"""

from __future__ import annotations

import math

import torch

from chita_minimal.solver.gram import SupportGram
from chita_minimal.utils import check_sparsity


def all_finite(t: torch.Tensor) -> bool:
    """True iff every entry of ``t`` is finite, without an n×p temporary when it is.

    A sum is non-finite whenever an entry is (NaN propagates, Inf − Inf = NaN); only then (or on
    overflow of the sum) the exact elementwise check runs. ``torch.isfinite(t).all()`` alone
    allocates about 1.75× the size of a float32 ``t`` in temporaries.
    """
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def ridge_outside(w_bar: torch.Tensor, idx: torch.Tensor, lam: float) -> float:
    """λ‖w̄ outside idx‖²: the ridge term of the coordinates fixed at zero when only idx stays free."""
    outside = torch.ones(w_bar.numel(), dtype=torch.bool, device=w_bar.device)
    outside[idx] = False
    return lam * float(torch.sum(w_bar[outside] ** 2))


def check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32/float64), got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if not all_finite(t):
        raise ValueError(f"{name} contains NaN or Inf values")


def num_kept(sparsity: float, p: int) -> int:
    """Number of weights kept at a given sparsity: k = round((1 − s)·p)."""
    sparsity = check_sparsity("sparsity", sparsity)
    return max(1, int(round((1.0 - sparsity) * p)))


def check_k(k, p: int) -> int:
    """``k``, the number of weights kept, as an int in [1, p]; TypeError/ValueError in those words otherwise."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k (the number of weights kept) must be an int, got {type(k).__name__}")
    if not 1 <= k <= p:
        raise ValueError(f"k (the number of weights kept) must be between 1 and the number of weights p = {p}, "
                         f"got k = {k}")
    return k


def check_inputs(X, w_bar, l2, alpha) -> tuple[int, int]:
    """Validate the data of (P); returns (n, p)."""
    check_tensor("X", X, 2)
    check_tensor("w_bar", w_bar, 1)
    n, p = X.shape
    if w_bar.shape[0] != p:
        raise ValueError(f"w_bar has {w_bar.shape[0]} entries but X has p = {p} columns")
    if w_bar.dtype != X.dtype or w_bar.device != X.device:
        raise TypeError(f"w_bar ({w_bar.dtype}, {w_bar.device}) must match X ({X.dtype}, {X.device})")
    if isinstance(l2, bool) or not isinstance(l2, (int, float)):
        raise TypeError(f"l2 must be a number, got {type(l2).__name__}")
    if not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")
    if alpha is not None:
        check_tensor("alpha", alpha, 1)
        if alpha.shape[0] != p:
            raise ValueError(f"alpha has {alpha.shape[0]} entries but X has p = {p} columns")
        if alpha.dtype != X.dtype or alpha.device != X.device:
            raise TypeError(f"alpha ({alpha.dtype}, {alpha.device}) must match X ({X.dtype}, {X.device})")
    return n, p


class Problem:
    """Problem (P) with its objective, gradient and residual.

    Args:
        X: (n, p) gradient matrix, float32 or float64, on any device.
        w_bar: (p,) dense weights w̄ around which the quadratic model is built.
        l2: ridge weight; λ = l2·n/2 (default 0).
        alpha: optional (p,) first-order term (e.g. the mean gradient); None means 0.
        y: (n,) target; default X w̄. Passed explicitly by :meth:`restrict`.
        offset: constant added to the objective (the ridge term of coordinates
            removed by :meth:`restrict`), so restricted objectives equal full ones.
    """

    def __init__(self, X, w_bar, l2: float = 0.0, alpha=None, *, y=None, offset: float = 0.0):
        n, p = check_inputs(X, w_bar, l2, alpha)
        self.X, self.w_bar, self.alpha = X, w_bar, alpha
        self.n, self.p = n, p
        self.l2 = float(l2)
        self.lam = self.l2 * n / 2.0
        self.y = X @ w_bar if y is None else y  # (n,)
        self.offset = float(offset)
        self._lipschitz = None

    #: X is this problem's own dense (n, p) tensor: products are matmuls with it and :meth:`restrict` gathers its
    #: columns. The active set's devices that read X directly (its Frobenius norm, appended columns, batched trial
    #: steps, the exact swap search) need this; problems that compute X v another way (block-diagonal, row-sharded
    #: across processes) set it False and get the same algorithm without them.
    dense_x = True

    # -- the linear operator X (subclasses such as a block-diagonal X override these) ------
    @property
    def dtype(self) -> torch.dtype:
        return self.w_bar.dtype

    @property
    def device(self) -> torch.device:
        return self.w_bar.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """X v, shape (n,)."""
        return self.X @ v

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor:
        """Xᵀ r, shape (p,)."""
        return self.X.T @ r

    def matvecs(self, W: torch.Tensor) -> torch.Tensor:
        """X wᵢ for every row wᵢ of an (m, p) W, as rows, shape (m, n): m products from one read of X. Written
        W Xᵀ, which BLAS runs over the rows of a row-major X (on a CPU 2.5x faster for m = 7 than m products, and
        4x faster than X Wᵀ)."""
        return W @ self.X.T

    def matvec_cols(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """X[:, idx] @ vals without touching the other columns, shape (n,)."""
        return self.X[:, idx] @ vals

    def columns(self, idx: torch.Tensor) -> torch.Tensor:
        """Columns idx of X as rows, shape (len(idx), n)."""
        return self.X[:, idx].T

    def column_blocks(self, idx: torch.Tensor) -> torch.Tensor:
        """Which row block of the residual each column acts on (all 0: X is one block)."""
        return torch.zeros(idx.numel(), dtype=torch.long, device=idx.device)

    def rdot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Dot product of two residual-space vectors (n entries; all-reduced when X is row-sharded)."""
        return float(torch.dot(a, b))

    def residual_blocks(self, r: torch.Tensor) -> torch.Tensor:
        """The residual as (blocks, n) rows: one block here."""
        return r.view(1, -1)

    def ridge(self, support: torch.Tensor) -> torch.Tensor:
        """argmin of (P) with w = 0 outside ``support`` (Alg 5's restricted solve). The last solve is kept: asked
        again for the same support (a refit, then the final polish), it is not solved twice."""
        last = getattr(self, "_last_ridge", None)
        if last is None or not torch.equal(last[0], support):
            w = self._ridge_by_gram_updates(support) if self.gram_updates else None
            last = self._last_ridge = (support.clone(), ridge_on_support(self, support) if w is None else w)
        return last[1].clone()

    # Set by the active set's fast mode on its restricted problems: successive exact solves on supports that
    # differ in a few coordinates reuse the factorised n×n system of the Woodbury form (SupportGram).
    gram_updates = False
    _DENSE_UPDATE_COLUMNS = 64  # past this many changed columns, the right-hand side is formed again (one product)

    def _ridge_by_gram_updates(self, support: torch.Tensor) -> torch.Tensor | None:
        """The Woodbury solve of :func:`ridge_on_support` with the n×n system kept factorised between calls and
        corrected for the columns that entered and left S (:class:`chita_minimal.solver.gram.SupportGram`).
        r₀ and X_Sᵀz come from one product with X each, no gather of X_S. None where the Woodbury form does not
        apply (|S| ≤ n, or λ = 0)."""
        s, lam2 = int(support.sum()), 2.0 * self.lam
        if s <= self.n or lam2 == 0:
            return None
        if getattr(self, "_support_gram", None) is None:
            self._support_gram = SupportGram(self.X, lam2)
        z = self._support_gram.solve(support, self._woodbury_rhs(support, lam2)).to(self.X.dtype)
        delta = self.rmatvec(z)
        if self.alpha is not None:
            delta -= self.alpha / lam2
        return torch.where(support, self.w_bar + delta, torch.zeros_like(self.w_bar))

    def _woodbury_rhs(self, support: torch.Tensor, lam2: float) -> torch.Tensor:
        """r₀ + X_S α_S / 2λ = y − X_S c_S with c = w̄ − α/2λ, in fp64 (the right-hand side of the n×n system). From
        the last one by the columns that entered and left S when they are few (refits one swap apart), else by one
        product with X."""
        c = self.w_bar if self.alpha is None else self.w_bar - self.alpha / lam2
        last = getattr(self, "_last_rhs", None)
        changed = None if last is None else torch.nonzero(last[0] != support).squeeze(1)
        if changed is not None and changed.numel() <= self._DENSE_UPDATE_COLUMNS:
            signed = torch.where(support[changed], c[changed], -c[changed])  # entered: −X_j c_j; left: +X_j c_j
            rhs = last[1] - self.matvec_cols(changed, signed).double() if changed.numel() else last[1]
        else:
            rhs = (self.y - self.matvec(torch.where(support, c, torch.zeros_like(c)))).double()
        self._last_rhs = (support.clone(), rhs)
        return rhs

    # -- the quadratic -----------------------------------------------------------------
    def residual(self, w: torch.Tensor) -> torch.Tensor:
        """r = y − X w, shape (n,)."""
        return self.y - self.matvec(w)

    def objective(self, w: torch.Tensor, r: torch.Tensor | None = None) -> float:
        """f(w) = ½‖r‖² + λ‖w − w̄‖² + αᵀw (+ offset); pass r to skip the matvec."""
        if r is None:
            r = self.residual(w)
        f = 0.5 * torch.dot(r, r) + self.lam * torch.sum((w - self.w_bar) ** 2)
        if self.alpha is not None:
            f = f + torch.dot(self.alpha, w)
        return float(f) + self.offset

    def gradient(self, w: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        """∇f(w) = −Xᵀr + 2λ(w − w̄) + α, shape (p,)."""
        if r is None:
            r = self.residual(w)
        g = -self.rmatvec(r)
        if self.lam:
            g += (2.0 * self.lam) * (w - self.w_bar)
        if self.alpha is not None:
            g += self.alpha
        return g

    def lipschitz(self, iters: int = 30, seed: int = 0, *, start: torch.Tensor | None = None,
                  rtol: float = 0.0) -> float:
        """L = σ_max(X)² + 2λ by power iteration on XᵀX (never formed); cached.

        Returns 1.05·L, the safety margin of the reference code, so 1/L is a safe step.
        ``start``: the first vector (default: a seeded random one), e.g. the top singular vector of
        a problem on fewer columns (the active set's previous round, :attr:`power_vector`), from
        which few iterations are needed; ``rtol``: stop early once the estimate changes by less
        than this fraction between two iterations (0: always ``iters`` iterations).
        """
        if self._lipschitz is None:
            if start is None:
                gen = torch.Generator(device="cpu").manual_seed(seed)
                v = torch.randn(self.p, generator=gen, dtype=torch.float64).to(self.w_bar)
            else:
                v = start.to(self.w_bar).clone()
            v /= v.norm()
            sigma2 = 0.0
            for _ in range(iters):
                u = self.rmatvec(self.matvec(v))
                previous, sigma2 = sigma2, float(u.norm())
                if sigma2 == 0.0:
                    break
                v = u / sigma2
                if rtol and abs(sigma2 - previous) <= rtol * sigma2:
                    break
            self.power_vector = v  # the top right singular vector of X, as far as it converged
            self._lipschitz = 1.05 * (sigma2 + 2.0 * self.lam)
        return self._lipschitz

    def frobenius_bound(self) -> float:
        """‖X‖_F² + 2λ ≥ σ_max(X)² + 2λ = L: an upper bound on L from one read of a dense X (1/bound is a safe
        step; no power iteration)."""
        return float(torch.linalg.vector_norm(self.X)) ** 2 + 2.0 * self.lam

    # -- sub-problems ------------------------------------------------------------------
    def restrict(self, idx: torch.Tensor, X_idx: torch.Tensor | None = None) -> "Problem":
        """The same problem with every coordinate outside ``idx`` fixed at zero.

        Keeps the full y and adds λ‖w̄ outside idx‖² as a constant, so that
        ``restricted.objective(w[idx]) == full.objective(w)`` for any w vanishing
        outside idx. Used by the active set (Alg 4) and by fixed masks (CHITA++).
        ``X_idx``: the columns idx of X when the caller has them already (no gather).
        """
        offset = self.offset + ridge_outside(self.w_bar, idx, self.lam)
        alpha = None if self.alpha is None else self.alpha[idx]
        X_idx = self.X.index_select(1, idx) if X_idx is None else X_idx
        return Problem(X_idx, self.w_bar[idx], self.l2, alpha, y=self.y, offset=offset)

    def __repr__(self) -> str:
        return (f"Problem(n={self.n}, p={self.p}, l2={self.l2:g}, alpha={'yes' if self.alpha is not None else 'no'}, "
                f"dtype={self.X.dtype}, device={self.X.device})")


def spd_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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

    On a support S the objective is a ridge regression in w_S. Writing w_S = w̄_S + Δ and
    r₀ = y − X_S w̄_S, its minimiser solves

        (X_SᵀX_S + 2λI) Δ = X_Sᵀ r₀ − α_S                               (|S|×|S| system)

    and, when n < |S|, the Woodbury identity turns this into an n×n system:

        Δ = X_Sᵀ (X_S X_Sᵀ + 2λI_n)⁻¹ (r₀ + X_S α_S / 2λ) − α_S / 2λ.

    Gram matrices are formed in the input dtype (the costly matmul) and solved in fp64
    (the cheap part), which keeps fp32 inputs accurate.

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
        z = spd_solve(K, rhs).to(XS.dtype)  # (n,)
        delta = XS.T @ z
        if alpha_S is not None:
            delta -= alpha_S / lam2
    else:
        G = XS.T @ XS  # (s, s)
        G.diagonal().add_(lam2)
        b = XS.T @ r0
        if alpha_S is not None:
            b -= alpha_S
        delta = spd_solve(G, b).to(XS.dtype)
    w[idx] = w_bar_S + delta
    return w
