"""N:M sparsity as the constraint of the CHITA solvers: the pattern, τ_c, feasibility, brute force."""

import itertools
import math

import pytest
import torch
from torch import nn

from chita_minimal.solver.problem import Problem, ridge_on_support
from chita_minimal.solver.iht import hard_threshold
from chita_minimal.network import params
from chita_minimal.solver.active_set import active_set
from chita_minimal.solver.backsolve import first_step
from chita_minimal.solver.iht import _step_to_keep_support, iht
from chita_minimal.solver.patterns import NM, nm_groups, parse_pattern
from chita_minimal.solver.solve import PATTERN_METHODS, solve
from conftest import random_problem


def contiguous(p, n, m):
    return NM(n, m, torch.arange(p).view(-1, m))


def scattered(p, n, m, seed=0):
    """Groups of m coordinates drawn at random (not contiguous, rows not sorted)."""
    return NM(n, m, torch.randperm(p, generator=torch.Generator().manual_seed(seed)).view(-1, m))


def assert_feasible(pattern, w, support):
    assert support.dtype == torch.bool and int(support.sum()) == pattern.k
    assert torch.all(pattern.counts(support) == pattern.n)  # exactly N kept in every group
    assert torch.all(pattern.counts(w) <= pattern.n)
    assert torch.all(w[~support] == 0)


def brute_force(problem, pattern):
    """Best objective over all N:M supports (exact ridge solve on each)."""
    best = math.inf
    for choice in itertools.product(*[itertools.combinations(row.tolist(), pattern.n) for row in pattern.groups]):
        mask = torch.zeros(problem.p, dtype=torch.bool)
        mask[[i for c in choice for i in c]] = True
        best = min(best, problem.objective(ridge_on_support(problem, mask)))
    return best


# -- the pattern ---------------------------------------------------------------------

def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern(" 4:8 ") == (4, 8)
    assert parse_pattern("1:2") == (1, 2)


@pytest.mark.parametrize("spec", ["4:4", "5:4", "0:4", "-1:4", "a:b", "2", "2:4:8", "2.0:4", "", "2:"])
def test_parse_pattern_bad_strings(spec):
    with pytest.raises(ValueError, match="N"):
        parse_pattern(spec)


@pytest.mark.parametrize("spec", [2, None, b"2:4", (2, 4, 8)])
def test_parse_pattern_needs_a_string_or_a_pair(spec):
    with pytest.raises(TypeError, match="pattern"):
        parse_pattern(spec)


def test_parse_pattern_one_type_for_strings_and_pairs():
    assert parse_pattern((2, 4)) == parse_pattern([2, 4]) == parse_pattern("2:4") == (2, 4)
    with pytest.raises(ValueError, match="N"):
        parse_pattern((4, 4))
    with pytest.raises(TypeError, match="int"):
        parse_pattern((2.0, 4))


@pytest.mark.parametrize("args,exc,word", [
    ((2, 4, torch.arange(8.0).view(2, 4)), TypeError, "groups"),
    ((2, 4, torch.arange(8).view(4, 2)), ValueError, "groups"),
    ((2, 4, torch.arange(8)), ValueError, "groups"),
    ((2, 4, torch.tensor([[0, 1, 2, 3], [4, 5, 6, 6]])), ValueError, "exactly once"),
    ((2, 4, torch.tensor([[0, 1, 2, 3], [4, 5, 6, 8]])), ValueError, "exactly once"),
    ((4, 4, torch.arange(8).view(2, 4)), ValueError, "N < M"),
    ((0, 4, torch.arange(8).view(2, 4)), ValueError, "N < M"),
    ((2.0, 4, torch.arange(8).view(2, 4)), TypeError, "n"),
])
def test_bad_groups(args, exc, word):
    with pytest.raises(exc, match=word):
        NM(*args)


def test_nm_groups_from_shapes():
    groups = nm_groups([(4, 8), (2, 3, 4), (8,)], 4)  # a Linear, a Conv1d-like weight, a 1-D weight
    assert groups.dtype == torch.long and groups.shape == (8 + 6 + 2, 4)
    torch.testing.assert_close(groups, torch.arange(64).view(-1, 4))  # row-major: runs along each row
    NM(2, 4, groups)  # a valid partition of 0..63
    # every group lies inside one row of one layer
    rows = torch.cat([torch.arange(32) // 8, 4 + torch.arange(24) // 12, torch.full((8,), 6)])
    assert torch.all(rows[groups] == rows[groups[:, :1]])


def test_nm_groups_from_a_layout():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2), nn.Conv2d(2, 3, 2))
    lay = params.layout(model)
    pattern = NM.for_layout("2:4", lay)
    assert pattern.p == lay.p and pattern.k == lay.p // 2
    for offset, numel, shape in zip(lay.offsets, lay.numels, lay.shapes):  # groups stay inside rows
        row = numel // shape[0]
        g = pattern.groups[(pattern.groups[:, 0] >= offset) & (pattern.groups[:, 0] < offset + numel)] - offset
        assert g.shape[0] == numel // 4 and torch.all(g // row == g[:, :1] // row)


def test_nm_groups_row_not_divisible_names_the_layer():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 6), nn.Linear(6, 2))  # last weight: rows of 6
    with pytest.raises(ValueError, match=r"2\.weight.*row length 6.*M = 4"):
        nm_groups(params.layout(model), 4)
    with pytest.raises(ValueError, match=r"layer 1.*row length 3"):
        nm_groups([(2, 4), (5, 3)], 4)
    with pytest.raises(TypeError, match="layout"):
        nm_groups(16, 4)


@pytest.mark.parametrize("pattern", [contiguous(24, 2, 4), scattered(24, 2, 4, seed=1), scattered(32, 3, 8, seed=2)])
def test_project_keeps_the_top_n_of_every_group(pattern):
    u = torch.randn(pattern.p, dtype=torch.float64)
    w, mask = pattern.project(u)
    assert_feasible(pattern, w, mask)
    torch.testing.assert_close(w[mask], u[mask], atol=0, rtol=0)
    for row in pattern.groups:  # per group, the same as top-N of that group alone
        assert torch.equal(mask[row], hard_threshold(u[row], pattern.n))
    assert pattern.k == pattern.groups.shape[0] * pattern.n


def test_project_ties_lower_index_wins():
    groups = torch.tensor([[7, 2, 5, 0], [6, 1, 3, 4]])
    pattern = NM(2, 4, groups)
    _, mask = pattern.project(torch.ones(8))
    assert torch.nonzero(mask).squeeze(1).tolist() == [0, 1, 2, 3]
    u = torch.tensor([1.0, 3.0, -1.0, 1.0, 1.0, 2.0, 3.0, 1.0])
    _, mask = pattern.project(u)  # group {0,2,5,7}: 5 then the tie |1| at 0, 2, 7 → 0; group {1,3,4,6}: 1, 6
    assert torch.nonzero(mask).squeeze(1).tolist() == [0, 1, 5, 6]


def test_support_of_fills_up_every_group():
    pattern = contiguous(12, 2, 4)
    w = torch.tensor([0.0, 0.0, 3.0, 0.0, 1.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.nonzero(pattern.support_of(w)).squeeze(1).tolist() == [0, 2, 4, 5, 8, 9]


def test_restrict_renumbers_the_groups():
    pattern = scattered(16, 2, 4, seed=3)
    idx = torch.tensor([0, 1, 2, 4, 5, 7, 8, 9, 11, 12, 13, 15])
    keep = torch.zeros(16, dtype=torch.bool)
    keep[idx] = True
    if bool((pattern.counts(keep) < 2).any()):
        pytest.skip("this draw leaves a group with fewer than N coordinates")
    sub = pattern.restrict(idx)
    u = torch.randn(16, dtype=torch.float64)
    _, mask_sub = sub.project(u[idx])
    _, mask_full = pattern.project(torch.where(keep, u.abs() + 1, torch.zeros_like(u)))  # A first, as in Alg 4
    assert sub.p == 12 and torch.equal(mask_sub, mask_full[idx])
    with pytest.raises(ValueError, match="fewer than N"):
        pattern.restrict(torch.arange(3))


# -- τ_c of Alg 2 ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_step_to_keep_support_per_group(seed, n, m):
    """N:M projection of w − τg keeps supp(w) just below τ_c and changes it just above."""
    gen = torch.Generator().manual_seed(seed)
    pattern = scattered(8 * m, n, m, seed=seed)
    w, support = pattern.project(torch.randn(pattern.p, generator=gen, dtype=torch.float64))
    g = torch.randn(pattern.p, generator=gen, dtype=torch.float64)
    tau_c = _step_to_keep_support(w, g, support, pattern)
    assert 0 < tau_c < math.inf
    assert torch.equal(pattern.project(w - tau_c * (1 - 1e-9) * g)[1], support)
    assert not torch.equal(pattern.project(w - tau_c * (1 + 1e-9) * g)[1], support)
    # the per-group τ_c is at least the global one with every pruned |g_j| competing
    assert tau_c >= _step_to_keep_support(w, g, support) * (1 - 1e-12)


def test_one_group_pattern_is_global_top_k():
    X, w_bar = random_problem(n=30, p=12, seed=2)
    one = NM(5, 12, torch.arange(12).view(1, 12))
    u, g = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    assert torch.equal(one.project(u)[1], hard_threshold(u, 5))
    w, support = one.project(u)
    assert _step_to_keep_support(w, g, support, one) == _step_to_keep_support(w, g, support)
    for method in PATTERN_METHODS:
        ref = solve(X, w_bar, 5, l2=0.1, method=method)
        res = solve(X, w_bar, pattern=one, l2=0.1, method=method)
        assert torch.equal(res.support, ref.support), method
        torch.testing.assert_close(res.w, ref.w, atol=1e-12, rtol=1e-12)


# -- the solvers with a pattern -----------------------------------------------------------

@pytest.mark.parametrize("method", PATTERN_METHODS)
@pytest.mark.parametrize("n,m,groups", [(2, 4, "contiguous"), (1, 4, "scattered"), (4, 8, "scattered"),
                                        (3, 4, "contiguous")])
def test_exactly_n_per_group(method, n, m, groups):
    X, w_bar = random_problem(n=40, p=48, seed=n + m)
    pattern = contiguous(48, n, m) if groups == "contiguous" else scattered(48, n, m, seed=m)
    res = solve(X, w_bar, pattern=pattern, l2=0.05, method=method)
    assert_feasible(pattern, res.w, res.support)
    assert res.nnz == pattern.k
    assert res.objective == pytest.approx(Problem(X, w_bar, 0.05).objective(res.w), rel=1e-12)


def test_fewer_nonzeros_when_w_bar_is_sparser():
    X, w_bar = random_problem(n=30, p=16, seed=1)
    w_bar[:4] = 0.0  # group 0 of w̄ is empty
    pattern = contiguous(16, 2, 4)
    for method in PATTERN_METHODS:
        res = solve(X, w_bar, pattern=pattern, l2=0.05, method=method)
        assert_feasible(pattern, res.w, res.support)


@pytest.mark.parametrize("solver", ["iht", "active"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_objective_is_monotone(solver, n, m):
    for seed in range(3):
        X, w_bar = random_problem(n=100, p=240, seed=seed)
        problem = Problem(X, w_bar, 1e-3, 0.05 * torch.randn(240, dtype=torch.float64))
        pattern = scattered(240, n, m, seed=seed)
        if solver == "iht":
            w, support, trace, _ = iht(problem, None, pattern=pattern, max_iter=300, tol=1e-10)
        else:
            w, support, trace, _ = active_set(problem, pattern.k, pattern=pattern, max_iter=300, tol=1e-10)
        assert_feasible(pattern, w, support)
        diffs = torch.tensor(trace[1:]) - torch.tensor(trace[:-1])
        assert torch.all(diffs <= 1e-12 * abs(trace[0])), diffs.max()
        assert trace[-1] == pytest.approx(problem.objective(w), rel=1e-10)
        assert trace[-1] < trace[0]


@pytest.mark.parametrize("correlation,floor", [(0.0, 0.8), (0.5, 0.9)])
def test_active_set_reaches_brute_force_optimum(correlation, floor):
    """2:4 on p = 8 or 12 (36 or 216 supports), l2 ∈ {0.1, 0.01}, α on some, groups scattered on some.

    Measured (40 instances each): the active set reaches the optimum on 35/40 (independent columns)
    and 39/40 (correlated); line-search IHT alone on 28/40 and 31/40; the active set with the
    fixed-weight in-group swap only (no exact refit of the best swap) on 30/40 and 33/40. Five of
    the six misses are two simultaneous swaps from the optimum; one is a single swap that the
    fixed-weight ranking does not put first (only the first is refit).
    """
    hits = {"active": 0, "iht": 0}
    for seed in range(40):
        p = [8, 12][seed % 2]
        X, w_bar = random_problem(n=3 * p, p=p, seed=seed, correlation=correlation)
        l2 = 0.01 if seed % 4 == 0 else 0.1
        alpha = 0.1 * torch.randn(p, dtype=torch.float64) if seed % 5 == 0 else None
        pattern = scattered(p, 2, 4, seed=seed) if seed % 3 == 0 else contiguous(p, 2, 4)
        best = brute_force(Problem(X, w_bar, l2, alpha), pattern)
        f = {}
        for method in hits:
            res = solve(X, w_bar, pattern=pattern, l2=l2, alpha=alpha, method=method)
            assert_feasible(pattern, res.w, res.support)
            assert res.objective >= best - 1e-9 * abs(best)  # nothing beats the optimum
            hits[method] += res.objective <= best + 1e-6 * abs(best)
            f[method] = res.objective
        assert f["active"] <= f["iht"] + 1e-9 * abs(best)  # on these instances: never worse than IHT
    print(f"brute-force optimum reached (correlation {correlation}): {hits}")
    assert hits["active"] / 40 >= floor
    assert hits["active"] > hits["iht"]


@pytest.mark.parametrize("with_alpha", [False, True])
def test_backsolve_is_the_ridge_on_the_projected_first_step(with_alpha):
    X, w_bar = random_problem(n=20, p=32, seed=4)
    alpha = 0.3 * torch.randn(32, dtype=torch.float64) if with_alpha else None
    problem = Problem(X, w_bar, 0.1, alpha)
    pattern = scattered(32, 2, 4, seed=4)
    u = w_bar if alpha is None else w_bar - problem.gradient(w_bar) / problem.lipschitz()
    torch.testing.assert_close(first_step(problem), u)
    _, support = pattern.project(u)
    res = solve(X, w_bar, pattern=pattern, l2=0.1, alpha=alpha, method="backsolve")
    assert torch.equal(res.support, support)
    torch.testing.assert_close(res.w, ridge_on_support(problem, support), atol=1e-12, rtol=0)


def test_fp32_and_fp64_agree():
    X, w_bar = random_problem(n=120, p=64, seed=5, correlation=0.0)
    pattern = contiguous(64, 2, 4)
    for method in PATTERN_METHODS:
        r64 = solve(X, w_bar, pattern=pattern, l2=0.1, method=method)
        r32 = solve(X.float(), w_bar.float(), pattern=pattern, l2=0.1, method=method)
        assert r32.w.dtype == torch.float32
        assert_feasible(pattern, r32.w, r32.support)
        assert torch.equal(r32.support, r64.support), method
        torch.testing.assert_close(r32.w.double(), r64.w, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")
@pytest.mark.parametrize("method", PATTERN_METHODS)
def test_cpu_and_cuda_agree(method):
    X, w_bar = random_problem(n=100, p=64, seed=9)
    pattern = scattered(64, 2, 4, seed=9)
    cpu = solve(X, w_bar, pattern=pattern, l2=0.1, method=method)
    gpu = solve(X.cuda(), w_bar.cuda(), pattern=pattern, l2=0.1, method=method)  # the pattern moves along
    assert gpu.w.is_cuda
    assert torch.equal(gpu.support.cpu(), cpu.support)
    torch.testing.assert_close(gpu.w.cpu(), cpu.w, atol=1e-8, rtol=1e-8)


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(k=5), ValueError, "k = 5"),
    (dict(pattern=contiguous(16, 2, 4)), ValueError, "pattern covers p = 16"),
    (dict(pattern="2:4"), TypeError, "pattern"),
    (dict(method="block", blocks=4), NotImplementedError, "not supported with an N:M pattern"),
    (dict(method="block-iht", blocks=4), NotImplementedError, "not supported with an N:M pattern"),
    (dict(mask=torch.ones(12, dtype=torch.bool)), NotImplementedError, "mask.*not supported with an N:M pattern"),
    (dict(distributed=True), NotImplementedError, "distributed.*not supported with an N:M pattern"),
])
def test_bad_arguments_with_a_pattern(kwargs, exc, word):
    X, w_bar = random_problem(n=20, p=12)
    args = dict(k=None, pattern=contiguous(12, 2, 4), l2=0.1, method="active") | kwargs
    with pytest.raises(exc, match=word):
        solve(X, w_bar, args.pop("k"), **args)


def test_k_equal_to_pattern_k_is_accepted():
    X, w_bar = random_problem(n=20, p=12)
    pattern = contiguous(12, 2, 4)
    a = solve(X, w_bar, 6, pattern=pattern, l2=0.1)
    b = solve(X, w_bar, pattern=pattern, l2=0.1)
    assert torch.equal(a.w, b.w)
    with pytest.raises(TypeError, match="k"):
        solve(X, w_bar, l2=0.1)  # neither k nor a pattern
