"""The n×n system of the Woodbury ridge solve, A = X_S X_Sᵀ + 2λI, kept factorised while the support S changes
a few columns at a time (the refits of the active set, Alg 4 with Alg 5's exact solve).

Forming A costs n²|S| flops and factorising it n³/3; a refit after a swap changes A by two rank-one terms. So
A is factorised once for a base support S₀ (A₀ = L Lᵀ) and a later support S = S₀ + (in) − (out) is solved with
the Woodbury identity on top of that factor:

    A = A₀ + U D Uᵀ,   U = [X_in, X_out],  D = diag(+1…, −1…)
    A⁻¹b = A₀⁻¹b − A₀⁻¹U (D + Uᵀ A₀⁻¹ U)⁻¹ Uᵀ A₀⁻¹b            (the m×m "capacitance" system, m = |in| + |out|)

which costs triangular solves with m + 1 right-hand sides instead of a new Cholesky factorisation. When m
passes ``max_rank``, A₀ moves to the current support: its Gram is updated by the changed columns
(K += X_in X_inᵀ − X_out X_outᵀ) when they are few, formed again otherwise, and factorised.
Everything after the product with X runs in fp64.
"""

from __future__ import annotations

import torch


def outer_gram(A: torch.Tensor) -> torch.Tensor:
    """A Aᵀ for an (n, s) matrix A. On a CPU through numpy, whose matmul sees that the right operand is the left
    one transposed and calls the symmetric rank-k product (BLAS ``syrk``: half the flops of the general product
    ``torch.mm`` runs, 2x faster at n = 1000, s = 16k); elsewhere ``A @ A.T``. The two agree to rounding, not to
    the bit."""
    if A.device.type == "cpu" and A.dtype in (torch.float32, torch.float64) and not A.requires_grad:
        a = A.contiguous().numpy()
        return torch.from_numpy(a @ a.T)
    return A @ A.T


class SupportGram:
    """Solves (X_S X_Sᵀ + 2λI) z = b for supports S that change a few columns between calls (module docstring).

    Args:
        X: (n, p) matrix whose columns the supports select.
        lam2: the shift 2λ (> 0: A is then positive definite for every S).
        max_rank: the most changed columns solved through the capacitance system before A₀ is moved.
    """

    def __init__(self, X: torch.Tensor, lam2: float, max_rank: int = 64):
        if not lam2 > 0:
            raise ValueError(f"the shift 2λ must be > 0, got {lam2}")
        self.X, self.lam2, self.max_rank = X, float(lam2), max_rank
        self.base = None  # S₀ (bool mask), its Gram K₀ = X_S₀ X_S₀ᵀ and the Cholesky factor of K₀ + 2λI
        self._K = self._L = None
        self._solved = {}  # column j -> A₀⁻¹X_j (:meth:`_base_solves`), since the last factorisation

    def _columns(self, mask: torch.Tensor) -> torch.Tensor:
        return self.X.index_select(1, torch.nonzero(mask).squeeze(1))

    def _rebase(self, support: torch.Tensor, into=None, out=None, changes: int = 0) -> None:
        """A₀ ← the system of ``support``: K₀ updated by the changed columns (``into``, ``out``: masks of the
        columns that entered and left S₀; ``changes``: how many) when they are at most a quarter of S (two
        products with few columns), else formed again; then factorised. K₀ is updated out of place: a moved copy
        (:meth:`moved`) may share it."""
        K = None
        if self.base is not None and changes <= int(support.sum()) // 4:
            K = self._K.clone()
            for mask, sign in ((into, 1.0), (out, -1.0)):
                if bool(mask.any()):
                    K.add_(outer_gram(self._columns(mask)).double(), alpha=sign)
        if K is None:
            K = outer_gram(self._columns(support)).double()
        A = K.clone()
        A.diagonal().add_(self.lam2)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info):  # rounding made A₀ indefinite (a huge Gram next to a tiny shift): form it in fp64 afresh
            K = outer_gram(self._columns(support).double())
            A = K.clone()
            A.diagonal().add_(self.lam2)
            L = torch.linalg.cholesky(A)
        self.base, self._K, self._L = support.clone(), K, L
        self._solved = {}

    def moved(self, X: torch.Tensor, positions: torch.Tensor) -> "SupportGram":
        """The same factorised system for a matrix X that holds this one's columns at ``positions`` (column j here
        is column positions[j] there; e.g. a larger active set): nothing is formed or factorised again."""
        gram = SupportGram(X, self.lam2, self.max_rank)
        if self.base is not None:
            gram.base = torch.zeros(X.shape[1], dtype=torch.bool, device=self.base.device)
            gram.base[positions[self.base]] = True
            gram._K, gram._L = self._K, self._L
        return gram

    def solve(self, support: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """z with (X_S X_Sᵀ + 2λI) z = b, S = ``support`` (bool mask over the columns of X); fp64."""
        b = b.double().unsqueeze(-1)
        if self.base is None:
            self._rebase(support)
            return torch.cholesky_solve(b, self._L).squeeze(-1)
        into, out = support & ~self.base, self.base & ~support
        changed = torch.nonzero(into | out).squeeze(1)
        if changed.numel() > self.max_rank:
            self._rebase(support, into, out, changed.numel())
            return torch.cholesky_solve(b, self._L).squeeze(-1)
        if changed.numel() == 0:
            return torch.cholesky_solve(b, self._L).squeeze(-1)
        U = self.X.index_select(1, changed).double()  # (n, m): the columns that entered and left
        z0, Y = self._base_solves(b, U, changed)  # A₀⁻¹b, A₀⁻¹U
        D = torch.where(into[changed], 1.0, -1.0).to(U)  # +1 entered, −1 left
        capacitance = torch.diag(D) + U.T @ Y  # D⁻¹ = D for entries ±1
        return (z0 - Y @ torch.linalg.solve(capacitance, U.T @ z0)).squeeze(-1)

    def _base_solves(self, b: torch.Tensor, U: torch.Tensor, changed: torch.Tensor):
        """A₀⁻¹b and A₀⁻¹U for the columns U = X[:, changed], in one triangular solve with L (which is read from
        memory once for all right-hand sides: at n = 1000 the solve is memory-bound). A₀⁻¹X_j is kept for every
        column j solved since the last rebase: successive supports of a walk of swaps share most changed columns,
        so each solve is for b and the columns new since the last call."""
        ids = changed.tolist()
        fresh = [i for i, j in enumerate(ids) if j not in self._solved]
        sol = torch.cholesky_solve(torch.cat([b, U[:, fresh]], 1), self._L)
        for i, column in zip(fresh, sol[:, 1:].T):
            self._solved[ids[i]] = column
        return sol[:, :1], torch.stack([self._solved[j] for j in ids], 1)
