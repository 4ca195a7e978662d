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
