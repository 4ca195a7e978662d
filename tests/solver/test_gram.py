"""The factorised n×n system of the Woodbury refits (:mod:`chita_minimal.solver.gram`) and the residual update of
a thresholded step by the coordinates that changed (``exact_changes``): both equal what they replace."""

import pytest
import torch

from chita_minimal.solver.gram import SupportGram, outer_gram
from chita_minimal.solver.iht import _threshold_step, iht, line_search_step
from chita_minimal.solver.problem import Problem
from conftest import random_problem


def _direct(X, support, lam2, b):
    XS = X[:, support].double()
    A = XS @ XS.T + lam2 * torch.eye(X.shape[0], dtype=torch.float64)
    return torch.linalg.solve(A, b.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outer_gram_is_the_product_with_the_transpose(dtype):
    A = torch.randn(30, 200, generator=torch.Generator().manual_seed(0), dtype=dtype)
    expected = (A.double() @ A.double().T).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(outer_gram(A), expected, rtol=tol, atol=tol)
    B = A[:, ::3]  # a strided view is made contiguous first
    torch.testing.assert_close(outer_gram(B), (B.double() @ B.double().T).to(dtype), rtol=tol, atol=tol)


def test_support_gram_solves_every_support_of_a_walk_exactly():
    """Swaps of one to three columns (the capacitance system on the base factor), more changes than max_rank
    (the base moves: Gram updated), a far jump (Gram formed again): every solve equals the direct one."""
    n, p = 20, 80
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    gram = SupportGram(X, 0.3, max_rank=6)
    support = torch.zeros(p, dtype=torch.bool)
    support[:50] = True
    bases = []
    for step in range(14):
        if step == 10:
            support = torch.zeros(p, dtype=torch.bool)
            support[30:] = True
        elif step:
            inside, outside = torch.nonzero(support).squeeze(1), torch.nonzero(~support).squeeze(1)
            m = 1 + step % 3
            support = support.clone()
            support[inside[torch.randperm(inside.numel(), generator=g)[:m]]] = False
            support[outside[torch.randperm(outside.numel(), generator=g)[:m]]] = True
        z = gram.solve(support, b)
        torch.testing.assert_close(z, _direct(X, support, 0.3, b), rtol=1e-10, atol=1e-10)
        bases.append(gram.base.clone())
    moved = sum(not torch.equal(a, c) for a, c in zip(bases, bases[1:]))
    assert 2 <= moved <= 6  # the base moved when the changes outgrew max_rank, not at every step


def test_support_gram_needs_a_positive_shift():
    with pytest.raises(ValueError, match="2λ must be > 0"):
        SupportGram(torch.randn(3, 5), 0.0)


def test_a_threshold_step_by_its_changed_columns_equals_the_full_update():
    """With ``exact_changes`` the residual of a thresholded step comes from the columns that entered or left the
    support; it equals y − Xw⁺ and the step is the same."""
    X, w_bar = random_problem(n=30, p=300, seed=2)
    problem = Problem(X, w_bar, 0.01)
    k = 120
    w, _, _, _ = iht(problem, k, max_iter=3)
    r = problem.residual(w)
    g = problem.gradient(w, r)
    d = torch.where(w != 0, -g, torch.zeros_like(g))
    Xd = problem.matvec(d)
    for tau in (1e-4, 1e-3, 1e-2):
        a = _threshold_step(problem, w, r, g, Xd, d, tau, k)
        b = _threshold_step(problem, w, r, g, Xd, d, tau, k, exact_changes=True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        torch.testing.assert_close(b[2], problem.residual(b[0]), rtol=1e-10, atol=1e-10)


def test_a_swap_costs_its_columns_not_a_full_product():
    """Counted: a line-search step that swaps a few coordinates of a large support multiplies by X once (X·d),
    the residual of its trials from the swapped columns; without ``exact_changes`` rounding noise on the kept
    coordinates makes every trial a full product."""
    X, w_bar = random_problem(n=30, p=2000, seed=5)
    problem = Problem(X, w_bar, 0.01)
    k = 1500
    w = problem.ridge(torch.arange(2000) < k)  # exact on its support: the next step can only swap
    r = problem.residual(w)
    calls = {}
    for exact in (False, True):
        counted = []
        original = problem.matvec

        def matvec(v, original=original):
            counted.append(1)
            return original(v)

        problem.matvec = matvec
        out = line_search_step(problem, w, r, problem.objective(w, r), k, 1e-7, exact_changes=exact)
        del problem.matvec
        calls[exact] = len(counted)
        torch.testing.assert_close(out[2], problem.residual(out[0]), rtol=1e-9, atol=1e-9)
    # X·d, and here one doubling trial that swaps more than 2 % of the coordinates (then a full product is cheaper)
    assert calls[True] <= 2 and calls[False] >= calls[True] + 3, calls


def test_a_moved_support_gram_goes_on_from_the_same_factor():
    """Carried to a larger active set (its columns at new positions), the system solves the same supports without
    being formed or factorised again."""
    n, p = 15, 60
    g = torch.Generator().manual_seed(7)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    small_idx = torch.arange(0, 60, 2)  # the old active set: every other column
    big_idx = torch.arange(0, 60)[torch.arange(60) % 4 != 3]  # a larger one holding it
    gram = SupportGram(X[:, small_idx], 0.2)
    support_small = torch.arange(30) < 20
    gram.solve(support_small, b)
    moved = gram.moved(X[:, big_idx], torch.searchsorted(big_idx, small_idx))
    assert moved._L is gram._L
    support = torch.zeros(big_idx.numel(), dtype=torch.bool)
    support[torch.searchsorted(big_idx, small_idx[support_small])] = True
    torch.testing.assert_close(moved.solve(support, b), _direct(X[:, big_idx], support, 0.2, b), rtol=1e-10,
                               atol=1e-10)
    support[-1] = True  # and a new column of the larger set
    torch.testing.assert_close(moved.solve(support, b), _direct(X[:, big_idx], support, 0.2, b), rtol=1e-10,
                               atol=1e-10)
    assert moved._L is gram._L


def test_products_with_many_rows_equal_one_product_each():
    X, w_bar = random_problem(n=20, p=90, seed=3)
    problem = Problem(X, w_bar, 0.1)
    W = torch.randn(7, 90, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(problem.matvecs(W), torch.stack([problem.matvec(w) for w in W]), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("l2", [1e-3, 0.1])  # (l2 = 0 with n < k: the refit interpolates, f = 0, nothing to try)
def test_the_line_search_on_batched_trials_takes_the_same_step(seed, l2):
    """From the states of an IHT run (every other one refit exactly), the line search with its support-changing
    candidates computed in batches (``batch_trials``) takes the same step as the one that computes them one at a
    time: same support, weights and objective to rounding."""
    X, w_bar = random_problem(n=25, p=400, seed=seed)
    problem = Problem(X, w_bar, l2)
    k = [40, 150, 300, 390][seed]
    w, _, _, _ = iht(problem, k, max_iter=1)
    batches = []
    original = problem.matvecs
    problem.matvecs = lambda W: batches.append(W.shape[0]) or original(W)
    for step in range(6):
        if step % 2:  # every other state exact on its support, where only support changes can lower f
            w = problem.ridge(w != 0)
        r = problem.residual(w)
        f = problem.objective(w, r)
        one = line_search_step(problem, w, r, f, k, 1e-7, exact_changes=True)
        two = line_search_step(problem, w, r, f, k, 1e-7, exact_changes=True, batch_trials=True)
        assert torch.equal(one[1], two[1])
        torch.testing.assert_close(two[0], one[0], rtol=1e-10, atol=1e-12)
        assert two[3] == pytest.approx(one[3], rel=1e-10)
        w = one[0]
    print(f"batched products: {batches}")
    assert batches  # the batched branch ran (candidates that swap more than 2 % of the coordinates)


def test_support_gram_solves_each_changed_column_once_per_factorisation(monkeypatch):
    """A walk of swaps that comes back to an earlier support: each solve's triangular solve is for b and the
    columns changed for the first time since the factorisation (A₀⁻¹X_j is kept), and every solve stays exact."""
    n, p = 20, 60
    g = torch.Generator().manual_seed(5)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    widths, real = [], torch.cholesky_solve
    monkeypatch.setattr(torch, "cholesky_solve", lambda B, L: widths.append(B.shape[1]) or real(B, L))
    gram = SupportGram(X, 0.3, max_rank=20)
    base = torch.zeros(p, dtype=torch.bool)
    base[:30] = True
    walk = [base]
    for out, into in ((0, 40), (1, 41)):  # two swaps, then back to the support after the first
        walk.append(walk[-1].clone())
        walk[-1][out], walk[-1][into] = False, True
    walk.append(walk[1])
    for support in walk:
        torch.testing.assert_close(gram.solve(support, b), _direct(X, support, 0.3, b), rtol=1e-10, atol=1e-10)
    assert widths == [1, 1 + 2, 1 + 2, 1]  # b alone; b, X_0, X_40; b, X_1, X_41; b (X_0, X_40 kept)
