"""The plain numpy references of bench/speed.py and the runtime chapter solve the same problems as the package."""

import numpy as np
import torch

from chita_minimal.solver import reference
from chita_minimal.solver.blocks import block_backsolve, contiguous_spans, make_blocks
from chita_minimal.solver.problem import Problem
from chita_minimal.solver.solve import solve
from conftest import random_problem


def test_reference_block_backsolve_equals_the_package():
    X, w_bar = random_problem(n=30, p=120, seed=5)
    support = torch.rand(120, generator=torch.Generator().manual_seed(1)) < 0.4
    blocks = [50, 40, 30]
    w, _ = block_backsolve(Problem(X, w_bar, 0.1), None, blocks, support)
    ref = reference.block_backsolve(X.numpy(), w_bar.numpy(), contiguous_spans(make_blocks(120, blocks)),
                                    support.numpy(), 0.1)
    np.testing.assert_allclose(ref, w.numpy(), atol=1e-10, rtol=1e-10)


def test_reference_iht_is_a_feasible_descent():
    X, w_bar = random_problem(n=40, p=80, seed=6)
    k, l2 = 20, 0.05
    w, f, it = reference.iht(X.numpy(), w_bar.numpy(), k, l2)
    problem = Problem(X, w_bar, l2)
    assert int((w != 0).sum()) <= k and it >= 1
    assert abs(f - problem.objective(torch.from_numpy(w))) < 1e-9 * abs(f)
    magnitude = problem.objective(solve(X, w_bar, k, l2=l2, method="iht", max_iter=0).w)  # f at H_k(w̄)
    assert f < magnitude  # (P) is not convex: no order between its local minima and the active set's
