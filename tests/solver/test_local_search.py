"""The exact swap local search (step 5 of the active set): brute-force optimality on small n < p problems,
never worse than where it starts, its value formula, and its cost gate on large problems."""

import pytest
import torch

import chita_minimal.solver.active_set as active_set_module
from chita_minimal.solver.local_search import _values, exact_swaps, move_cost
from chita_minimal.solver.problem import Problem, ridge_on_support
from chita_minimal.solver.reference import brute_force
from chita_minimal.solver.solve import solve
from conftest import random_problem


# (correlation, n/p, l2) → brute-force hits of 20 measured with the active set: before step 5 / with it
FAMILIES = {(0.3, 0.5, 1e-4): (4, 16), (0.6, 0.25, 1e-3): (2, 20), (0.6, 1.5, 0.0): (8, 18)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_active_set_reaches_the_brute_force_optimum_on_small_underdetermined_problems(family):
    """20 instances per family (p = 14–16, k = 3–6, fixed seeds). Measured for all 14 families of the runtime
    chapter: without the exact search (``exact_search=False``) the active set hit 2–13 of 20, with it 16–20."""
    correlation, ratio, l2 = family
    hits = 0
    for seed in range(20):
        p, k = 14 + seed % 3, 3 + seed % 4
        X, w_bar = random_problem(n=max(2, int(ratio * p)), p=p, seed=1000 + seed, correlation=correlation)
        best = brute_force(X.numpy(), w_bar.numpy(), k, l2)
        res = solve(X, w_bar, k, l2=l2, method="active")
        assert res.nnz <= k
        hits += res.objective <= best * (1 + 1e-9) + 1e-12
    assert hits >= FAMILIES[family][1] - 1


@pytest.mark.parametrize("seed", range(6))
def test_exact_swaps_is_never_worse_than_its_start_and_keeps_k(seed):
    X, w_bar = random_problem(n=12, p=30, seed=seed, correlation=0.5)
    alpha = 0.1 * torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    problem = Problem(X, w_bar, 1e-3, alpha if seed % 2 else None)
    start = torch.zeros(30, dtype=torch.bool)
    start[torch.randperm(30, generator=torch.Generator().manual_seed(seed))[:7]] = True
    w0 = ridge_on_support(problem, start)
    w, f = exact_swaps(problem, w0, 7)
    assert int((w != 0).sum()) == 7
    assert f == pytest.approx(problem.objective(w))
    assert f <= problem.objective(w0) + 1e-12
    assert f == pytest.approx(problem.objective(ridge_on_support(problem, w != 0)))  # w is the refit


def test_the_value_of_a_support_gives_the_objective_of_its_refit():
    """f(S) = ½‖y‖² + λ‖w̄‖² − ½ b_Sᵀ A_S⁻¹ b_S with A = XᵀX + 2λI, b = Xᵀy + 2λw̄ − α."""
    X, w_bar = random_problem(n=10, p=8, seed=3)
    alpha = 0.2 * torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    problem = Problem(X, w_bar, 0.01, alpha)
    A = X.T @ X + 2 * problem.lam * torch.eye(8, dtype=X.dtype)
    b = X.T @ problem.y + 2 * problem.lam * w_bar - alpha
    C = 0.5 * float(problem.y @ problem.y) + problem.lam * float(w_bar @ w_bar)
    supports = torch.tensor([[0, 2, 5], [1, 3, 7], [4, 6, 7]])
    for S, v in zip(supports, _values(A, b, supports)):
        mask = torch.zeros(8, dtype=torch.bool)
        mask[S] = True
        assert C - 0.5 * float(v) == pytest.approx(problem.objective(ridge_on_support(problem, mask)))


def test_the_exact_search_is_skipped_where_a_move_costs_more_than_its_budget(monkeypatch):
    """A problem whose support Gram costs more than two bare passes per move: step 5 does not run."""
    X, w_bar = random_problem(n=20, p=400, seed=0, correlation=0.0)
    k = 300
    assert move_cost(Problem(X, w_bar), k, 8) > max(2 * 2 * 20 * 400, 1e7)

    def refuse(*args, **kwargs):
        raise AssertionError("the exact search ran")

    monkeypatch.setattr(active_set_module, "exact_swaps", refuse)
    res = solve(X, w_bar, k, l2=1e-3, method="active")
    assert res.nnz <= k
