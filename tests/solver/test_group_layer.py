"""The structured layer problem: group selection against brute force, the OBS costs and gains against direct
evaluations, the backsolve against a direct solve."""

import itertools

import pytest
import torch

from chita_minimal.solver.group_layer import (_addition_gains, _removal_costs, _swap_deltas, group_backsolve,
                                              group_objective, group_scores, select_groups)
from chita_minimal.solver.layer import damp


def problem(r=5, d=12, N=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g, dtype=torch.float64) @ (torch.eye(d, dtype=torch.float64)
                                                               + 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64))
    return torch.randn(r, d, generator=g, dtype=torch.float64), X.T @ X / N


def test_objective_and_backsolve_agree_with_a_direct_solve():
    W, H = problem()
    Hd = damp(H, 0.01)
    cols = torch.tensor([0, 3, 4, 9])
    What = group_backsolve(W, Hd, cols)
    direct = torch.linalg.solve(Hd[cols][:, cols], (W @ Hd[:, cols]).T).T
    assert torch.allclose(What[:, cols], direct)
    assert What[:, [1, 2, 5]].abs().max() == 0
    E = W - What
    assert group_objective(W, Hd, cols) == pytest.approx(float(((E @ Hd) * E).sum()), rel=1e-10)


@pytest.mark.parametrize("s", [1, 3])
def test_obs_costs_and_gains_are_exact(s):
    W, H = problem(d=12)
    Hd = damp(H, 0.01)
    groups = torch.arange(12).view(-1, s)
    G = groups.shape[0]
    kept = torch.ones(G, dtype=torch.bool)
    kept[1] = False
    f = group_objective(W, Hd, groups[kept].reshape(-1))
    costs, What, cols, _ = _removal_costs(W, Hd, groups, kept)
    gains = _addition_gains(W, Hd, groups, kept, What, cols)
    for q in range(G):
        trial = kept.clone()
        trial[q] = not kept[q]
        fq = group_objective(W, Hd, groups[trial].reshape(-1))
        if kept[q]:
            assert float(costs[q]) == pytest.approx(fq - f, rel=1e-8, abs=1e-10)
        else:
            assert float(gains[q]) == pytest.approx(f - fq, rel=1e-8, abs=1e-10)


def test_the_best_swap_is_exact():
    """The closed-form change of f for a swap of single columns equals the direct evaluation, and it is the best
    of all swaps."""
    W, H = problem(r=4, d=10, seed=1)
    Hd = damp(H, 0.01)
    groups = torch.arange(10).view(10, 1)
    kept = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    f = group_objective(W, Hd, kept.nonzero().squeeze(1))
    _, What, cols, Hinv = _removal_costs(W, Hd, groups, kept)
    delta, a, b = _swap_deltas(W, Hd, groups, kept, What, cols, Hinv)
    direct = {}
    for i in (~kept).nonzero().squeeze(1).tolist():
        for j in kept.nonzero().squeeze(1).tolist():
            trial = kept.clone()
            trial[i], trial[j] = True, False
            direct[(i, j)] = group_objective(W, Hd, trial.nonzero().squeeze(1)) - f
    assert delta == pytest.approx(direct[(a, b)], rel=1e-8, abs=1e-10)
    assert delta <= min(direct.values()) + 1e-10


def test_select_groups_reaches_the_brute_force_optimum():
    """Greedy removal + swaps + restarts (no enumeration) find the best 6 of 14 columns on at least 9 of 10
    random layers, never worse than without restarts; enumeration (few groups) finds it on all."""
    hits = 0
    for seed in range(10):
        W, H = problem(r=4, d=14, seed=seed)
        groups = torch.arange(14).view(14, 1)
        Hd = damp(H, 0.01)
        best = min(group_objective(W, Hd, torch.tensor(c)) for c in itertools.combinations(range(14), 6))
        f = {}
        for restarts in (0, 8):
            kept, _, _ = select_groups(W, H, groups, 6, exhaustive=1, restarts=restarts)
            assert int(kept.sum()) == 6
            f[restarts] = group_objective(W, Hd, kept.nonzero().squeeze(1))
        assert f[8] <= f[0] * (1 + 1e-12)
        hits += f[8] <= best * (1 + 1e-9)
        kept_all, _, _ = select_groups(W, H, groups, 6, exhaustive=10**4)
        assert group_objective(W, Hd, kept_all.nonzero().squeeze(1)) == pytest.approx(best)
    assert hits >= 9


def test_select_groups_beats_the_baselines_and_keeps_whole_groups():
    W, H = problem(r=6, d=24, seed=3)
    groups = torch.arange(24).view(8, 3)
    Hd = damp(H, 0.01)
    kept, What, _ = select_groups(W, H, groups, 4, exhaustive=1)
    f = group_objective(W, Hd, groups[kept].reshape(-1))
    for kind in ("wanda", "norm"):
        top = torch.topk(group_scores(W, H, groups, kind), 4).indices
        assert f <= group_objective(W, Hd, groups[top].reshape(-1)) + 1e-12
    zero_cols = groups[~kept].reshape(-1)
    assert What[:, zero_cols].abs().max() == 0


def test_errors_name_the_argument():
    W, H = problem()
    with pytest.raises(ValueError, match="keep = 9 exceeds the 4 groups"):
        select_groups(W, H, torch.arange(12).view(4, 3), 9)
    with pytest.raises(ValueError, match="share columns"):
        select_groups(W, H, torch.tensor([[0, 1], [1, 2]]), 1)
    with pytest.raises(TypeError, match="groups must be"):
        select_groups(W, H, [[0, 1]], 1)
