"""Exact swap local search on small supports: step 4 of Alg 4 with every move refit, and pair swaps.

Alg 4's swap (:func:`chita_minimal.solver.active_set._best_swap`) scores a move i → j with the other weights
fixed. On a small support the exact value of a move is cheap: at the ridge refit on a support S,

    f(S) = C − ½ b_Sᵀ A_S⁻¹ b_S,      A = XᵀX + 2λI,   b = Xᵀy + 2λw̄ − α,   C = ½‖y‖² + λ‖w̄‖² + offset,

so every candidate support is one small Cholesky solve on a submatrix of A. This search evaluates, from S, every
exchange of one or two kept coordinates (the ``candidates`` of smallest removal cost) for as many pruned ones
(those of largest gain g_j²/A_jj) by its exact refit, moves to the best support while f drops, and then restarts
from supports perturbed by two random exchanges (seeded), keeping the best point seen — a pair exchange and a
restart leave the supports at which single swaps stop (Hazimeh & Mazumder 2020's swap search, with the exact
refit). All systems come from A restricted to U = S ∪ candidates, formed once per move.

The active set runs it only when that is cheap next to the solve it finishes: :func:`move_cost` (the Gram of U
and the candidate solves) at most two bare passes (2np multiply-adds each) or 10⁷ multiply-adds; on MLPNet
(n = 1000, p = 32360) that rules it out at every sparsity of the benchmark, and on problems of a few dozen
coordinates a whole search with its restarts took about 8 ms (runtime chapter). Every accepted move lowers f, and
the result is never worse than the start.
"""

from __future__ import annotations

import itertools

import torch

from chita_minimal.solver.problem import Problem


def move_cost(problem: Problem, k: int, candidates: int) -> float:
    """Multiply-adds of one move of :func:`exact_swaps` besides its pass over X: the Gram of U and the solves."""
    mi, mj = min(candidates, k), min(candidates, problem.p - k)
    moves = mi * mj + (mi * (mi - 1) // 2) * (mj * (mj - 1) // 2)
    return float((k + mj) ** 2 * problem.n + moves * k ** 3 / 3)


def _values(A: torch.Tensor, b: torch.Tensor, supports: torch.Tensor) -> torch.Tensor:
    """b_Sᵀ A_S⁻¹ b_S for every row S of ``supports`` (m, s) (indices into A); −inf where A_S is not PD."""
    As = A[supports[:, :, None], supports[:, None, :]]
    bs = b[supports]
    L, info = torch.linalg.cholesky_ex(As)
    x = torch.cholesky_solve(bs.unsqueeze(-1), L).squeeze(-1)
    v = (bs * x).sum(1)
    return torch.where(info == 0, v, torch.full_like(v, -float("inf")))


def _best_move(problem: Problem, kept: torch.Tensor, b_all: torch.Tensor, norms: torch.Tensor, candidates: int):
    """At the refit on ``kept`` (sorted indices): (its value b_Sᵀ A_S⁻¹ b_S, the best exchange of one or two kept
    coordinates for as many pruned ones by exact refit as (kept', value') — or None when none raises the value);
    (None, None) when A_S is singular."""
    p, k, lam2 = problem.p, kept.numel(), 2.0 * problem.lam
    XS = problem.X[:, kept]
    L, info = torch.linalg.cholesky_ex(XS.T @ XS + lam2 * torch.eye(k, dtype=XS.dtype, device=XS.device))
    if int(info):  # A_S singular (k > n without a ridge): no exact refit to compare with
        return None, None
    x = torch.cholesky_solve(b_all[kept].unsqueeze(-1), L).squeeze(-1)
    value = float(b_all[kept] @ x)
    cost = x ** 2 / torch.cholesky_inverse(L).diagonal()  # value lost by removing one kept coordinate (refit)
    w = torch.zeros_like(b_all)
    w[kept] = x
    grad = b_all - problem.X.T @ (XS @ x) - lam2 * w  # −∇f at the refit (zero on the support)
    grad[kept] = 0.0
    ins = torch.argsort(grad ** 2 / (norms + lam2), descending=True)[:min(candidates, p - k)]  # largest gains
    U = torch.cat([kept, ins])  # every candidate support lies in U (local indices: kept 0..k−1, then ins)
    XU = problem.X[:, U]
    A = XU.T @ XU + lam2 * torch.eye(U.numel(), dtype=XU.dtype, device=XU.device)
    outs = torch.argsort(cost)[:candidates].tolist()
    news = range(k, U.numel())
    moves = [((i,), (j,)) for i in outs for j in news]
    moves += [(i, j) for i in itertools.combinations(outs, 2) for j in itertools.combinations(news, 2)]
    supports = torch.tensor([[c for c in range(k) if c not in out] + list(new) for out, new in moves],
                            dtype=torch.long, device=kept.device).reshape(len(moves), k)
    values = _values(A, b_all[U], supports) if moves else torch.empty(0)
    if not moves or not float(values.max()) > value + 1e-12 * abs(value):
        return value, None
    best = int(torch.argmax(values))
    return value, (torch.sort(U[supports[best]]).values, float(values[best]))


def exact_swaps(problem: Problem, w: torch.Tensor, k: int, *, candidates: int = 8, restarts: int = 4,
                max_moves: int = 100, seed: int = 0) -> tuple[torch.Tensor, float]:
    """The local search above from w (k kept; a plain :class:`Problem`): returns (w', f(w')) with w' the ridge
    refit on the best support found, f(w') ≤ f(refit of w). ``candidates``: kept and pruned coordinates
    considered per move; ``restarts``: perturbed starts after the first descent (seeded by ``seed``)."""
    p = problem.p
    support = w != 0
    if int(support.sum()) == k and 0 < k < p:
        b = problem.X.T @ problem.y + 2.0 * problem.lam * problem.w_bar
        if problem.alpha is not None:
            b = b - problem.alpha
        norms = (problem.X * problem.X).sum(0)

        def descend(kept):
            kept = torch.sort(kept).values
            for _ in range(max_moves):
                value, move = _best_move(problem, kept, b, norms, candidates)
                if move is None:
                    break
                kept, value = move
            return kept, value

        everything = torch.arange(p, device=w.device)
        best, best_value = descend(everything[support])
        g = torch.Generator().manual_seed(seed)
        t = min(2, k, p - k)
        for _ in range(restarts if best_value is not None else 0):
            free = everything[~torch.isin(everything, best)]
            out = best[torch.randperm(k, generator=g)[:t].to(w.device)]
            add = free[torch.randperm(free.numel(), generator=g)[:t].to(w.device)]
            kept, value = descend(torch.cat([best[~torch.isin(best, out)], add]))
            if value is not None and value > best_value + 1e-12 * abs(best_value):
                best, best_value = kept, value
        support = torch.zeros(p, dtype=torch.bool, device=w.device)
        support[best] = True
    refit = problem.ridge(support)
    return refit, problem.objective(refit)
