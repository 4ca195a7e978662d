"""The sync-free line search (every candidate at once, the choice by masks) takes the same steps as the sequential
line search of Alg 2: same supports, objectives and iteration counts on fixed seeds (on the CPU; the CUDA test
checks it on a GPU)."""

import pytest
import torch

from chita_minimal.solver.iht import hard_threshold, iht, line_search_step, project
from chita_minimal.solver.iht_sync_free import batched_hard_threshold, iht_sync_free, line_search_step_sync_free
from chita_minimal.solver.problem import Problem
from chita_minimal.solver.patterns import NM
from conftest import random_problem


def test_batched_threshold_is_hard_threshold_row_by_row_with_its_tie_rule():
    g = torch.Generator().manual_seed(0)
    U = torch.randint(-3, 4, (6, 40), generator=g).double()  # many ties
    for k in (1, 7, 20, 39, 40):
        masks = batched_hard_threshold(U, k)
        for row, mask in zip(U, masks):
            assert torch.equal(mask, hard_threshold(row, k))


CASES = [  # (n, p, k, l2, alpha, sparse start): n > k and n < k, with and without ridge and first-order term
    (60, 40, 10, 0.0, False, False),
    (60, 40, 10, 0.05, True, False),
    (20, 80, 30, 1e-3, False, False),
    (20, 80, 30, 0.1, True, False),
    (30, 50, 5, 0.01, False, True),
    (25, 120, 60, 1e-4, False, False),
]


def _problem(case, seed):
    n, p, k, l2, with_alpha, sparse_start = case
    X, w_bar = random_problem(n=n, p=p, seed=seed)
    alpha = 0.1 * torch.randn(p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) \
        if with_alpha else None
    w0 = None
    if sparse_start:  # fewer than k nonzeros: the first step is τ* with thresholding
        w0 = w_bar.clone()
        w0[k // 2:] = 0.0
    return Problem(X, w_bar, l2, alpha), k, w0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_step_is_the_step_of_the_sequential_line_search(case, seed):
    """From the sequential path's state at every iteration, the sync-free step takes the same decision: the same
    support and weights (1e-9), residual and objective, and the same conjugate-direction state."""
    problem, k, w0 = _problem(case, seed)
    w, _ = project(problem.w_bar if w0 is None else w0, k)
    r = problem.residual(w)
    f = problem.objective(w, r)
    cg, inv_L = {}, 1.0 / problem.lipschitz()
    for _ in range(60):
        if cg.get("dd"):  # the sequential path's conjugate-direction state, as tensors (updated by the step)
            state = dict(valid=torch.tensor(True), d=cg["d"], Xd=cg["Xd"], dd=torch.tensor(cg["dd"], dtype=w.dtype))
        else:
            state = dict(valid=torch.tensor(False), d=torch.zeros_like(w), Xd=torch.zeros_like(r),
                         dd=torch.tensor(0.0, dtype=w.dtype))
        free = line_search_step_sync_free(problem, w, r, torch.tensor(f, dtype=w.dtype), k, 1e-7, state, inv_L)
        seq = line_search_step(problem, w, r, f, k, 1e-7, cg, None)
        assert torch.equal(free[1], seq[1])
        torch.testing.assert_close(free[0], seq[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(free[2], seq[2], rtol=1e-9, atol=1e-9)
        assert float(free[3]) == pytest.approx(seq[3], rel=1e-12, abs=1e-12)
        assert bool(state["valid"]) == bool(cg.get("dd"))
        if seq[3] == f and torch.equal(seq[0], w):
            break
        w, r, f = seq[0], seq[2], seq[3]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sync_free_iht_ends_where_the_sequential_one_does(case, seed):
    """Whole runs: the same final support, objective (1e-6) and iteration count (±2: the trial residuals come from
    a dense product instead of a sparse update, and rounding can flip a decision at the tolerance)."""
    problem, k, w0 = _problem(case, seed)
    seq = iht(problem, k, w0, line_search=True, max_iter=300)
    free = iht_sync_free(problem, k, w0, max_iter=300, check_every=7)
    assert torch.equal(free[1], seq[1])
    assert free[2][-1] == pytest.approx(seq[2][-1], rel=1e-6)
    assert abs(free[3] - seq[3]) <= 2
    assert all(b <= a + 1e-12 * abs(a) for a, b in zip(free[2], free[2][1:]))  # monotone


def test_sync_free_iht_in_float32_ends_on_the_same_support():
    X, w_bar = random_problem(n=40, p=200, seed=5, dtype=torch.float32)
    seq = iht(Problem(X, w_bar, 1e-2), 50, line_search=True, max_iter=200)
    free = iht_sync_free(Problem(X, w_bar, 1e-2), 50, max_iter=200)
    assert torch.equal(free[1], seq[1])
    assert free[2][-1] == pytest.approx(seq[2][-1], rel=1e-5)


def test_solve_takes_sync_free_for_iht_and_the_active_set_and_refuses_what_it_cannot_do():
    from chita_minimal.solver.solve import solve

    X, w_bar = random_problem(n=30, p=90, seed=3)
    for method in ("iht", "active"):  # the active set's step 2 on the device: its IHT without refits
        plain = solve(X, w_bar, 20, l2=0.05, method=method, **({"refit": None} if method == "active" else {}))
        free = solve(X, w_bar, 20, l2=0.05, method=method, sync_free=True)
        assert torch.equal(free.support, plain.support), method
        assert free.objective == pytest.approx(plain.objective, rel=1e-6)
    with pytest.raises(ValueError, match="sync_free"):
        solve(X, w_bar, 20, l2=0.05, method="iht", sync_free=True, refit=3)
    with pytest.raises(ValueError, match="sync_free"):
        solve(X[:, :88], w_bar[:88], None, l2=0.05, method="active", sync_free=True, pattern=NM(2, 4, torch.arange(88).view(-1, 4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")
@pytest.mark.parametrize("case", CASES)
def test_sync_free_on_cuda_ends_where_the_sequential_cpu_path_does(case):
    problem, k, w0 = _problem(case, 0)
    seq = iht(problem, k, w0, line_search=True, max_iter=300)
    gpu = Problem(problem.X.cuda(), problem.w_bar.cuda(), problem.l2,
                  None if problem.alpha is None else problem.alpha.cuda())
    free = iht_sync_free(gpu, k, None if w0 is None else w0.cuda(), max_iter=300)
    assert torch.equal(free[1].cpu(), seq[1])
    assert free[2][-1] == pytest.approx(seq[2][-1], rel=1e-6)
