"""Properties of the CHITA solvers on small problems (brute force, direct solves)."""

import itertools
import math

import pytest
import torch

from chita_minimal.solver.problem import Problem, num_kept, ridge_on_support
from chita_minimal.solver.iht import hard_threshold
from chita_minimal.solver.threshold import BAND_MIN, kth_largest
from chita_minimal.solver.solve import solve
from chita_minimal.solver.active_set import active_set
from chita_minimal.solver.blocks import block_backsolve, make_blocks
from chita_minimal.solver.iht import iht
from conftest import random_problem

METHODS = ["active", "iht", "iht-fixed", "backsolve", "block", "block-iht"]


def _opts(method):
    return {"blocks": 5} if method.startswith("block") else {}


def brute_force(problem, k):
    """Best objective over all supports of size k (exact ridge solve on each)."""
    best, best_support = math.inf, None
    for S in itertools.combinations(range(problem.p), k):
        mask = torch.zeros(problem.p, dtype=torch.bool)
        mask[list(S)] = True
        f = problem.objective(ridge_on_support(problem, mask))
        if f < best:
            best, best_support = f, mask
    return best, best_support


# -- sparsity and ties ---------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_exactly_k_nonzeros(method, k):
    X, w_bar = random_problem(n=30, p=12, seed=k)
    res = solve(X, w_bar, k, l2=0.05, method=method, **_opts(method))
    assert res.support.dtype == torch.bool and int(res.support.sum()) == k
    assert res.nnz == k
    assert torch.all(res.w[~res.support] == 0)


@pytest.mark.parametrize("method", METHODS)
def test_at_most_k_when_w_bar_is_sparser(method):
    X, w_bar = random_problem(n=30, p=12, seed=1)
    w_bar[:8] = 0.0  # only 4 nonzeros
    res = solve(X, w_bar, 6, l2=0.05, method=method, **_opts(method))
    assert res.nnz <= 6 and int(res.support.sum()) == 6


def test_hard_threshold_ties_are_deterministic():
    v = torch.tensor([1.0, -2.0, 1.0, 2.0, 1.0, 0.5])
    mask = hard_threshold(v, 3)
    assert mask.tolist() == [True, True, False, True, False, False]  # ties at |1|: lowest index wins
    assert hard_threshold(torch.ones(6), 4).tolist() == [True] * 4 + [False] * 2
    assert int(hard_threshold(torch.randn(1000), 137).sum()) == 137


@pytest.mark.parametrize("kind", ["normal", "ties", "constant", "sorted", "rows"])
def test_kth_largest_is_the_exact_selection(kind):
    """The banded selection (CPU, large inputs) returns exactly the k-th largest entry, also on inputs where the
    strided sample misleads it (sorted data, repeated rows, many ties) and at the ends k = 1 and k = n."""
    g = torch.Generator().manual_seed(0)
    n = 3 * BAND_MIN + 17
    a = {"normal": torch.randn(n, generator=g).abs(),
         "ties": torch.randint(0, 7, (n,), generator=g).float(),
         "constant": torch.full((n,), 2.5),
         "sorted": torch.sort(torch.rand(n, generator=g)).values,
         "rows": (torch.rand(1, 61, generator=g) * torch.rand(n // 61 + 1, 1, generator=g)).flatten()[:n]}[kind]
    ordered = torch.sort(a, descending=True).values
    for k in (1, 2, 61, n // 50, n // 3, n // 2, n - 1, n):
        assert float(kth_largest(a, k)) == float(ordered[k - 1]), k


# -- optimality ----------------------------------------------------------------------

@pytest.mark.parametrize("correlation,floor", [(0.0, 0.95), (0.5, 0.95)])
def test_active_set_reaches_brute_force_optimum_on_most_instances(correlation, floor):
    """Measured (40 instances each, p = 10…16): active set 40/40 with independent columns and 40/40 with
    correlated ones (without its exact search of step 5: 34/40 and 28/40; the former plain path 33/40 and 28/40);
    line-search IHT alone 22/40 and 12/40; backsolve 19/40 and 15/40."""
    hits = 0
    for seed in range(40):
        p = 10 + seed % 7  # p in 10..16
        k = [2, 3, 4, 5][seed % 4]
        X, w_bar = random_problem(n=3 * p, p=p, seed=seed, correlation=correlation)
        l2 = [0.0, 0.01, 0.1][seed % 3]
        gen = torch.Generator().manual_seed(seed)  # the same instances whatever ran before
        alpha = 0.1 * torch.randn(p, dtype=torch.float64, generator=gen) if seed % 5 == 0 else None
        problem = Problem(X, w_bar, l2, alpha)
        best, _ = brute_force(problem, k)
        res = solve(X, w_bar, k, l2=l2, alpha=alpha, method="active")
        assert res.objective >= best - 1e-9 * abs(best)  # nothing beats the optimum
        hits += res.objective <= best + 1e-8 * abs(best)
    print(f"active set reached the brute-force optimum on {hits}/40 instances (correlation {correlation})")
    assert hits / 40 >= floor


def test_backsolve_equals_direct_fp64_solve():
    X, w_bar = random_problem(n=50, p=14, seed=3)
    alpha = 0.2 * torch.randn(14, dtype=torch.float64)
    problem = Problem(X, w_bar, 0.3, alpha)
    support = hard_threshold(torch.randn(14, dtype=torch.float64), 6)
    w = ridge_on_support(problem, support)
    # direct: gradient of (P) on S is zero  <=>  (X_SᵀX_S + 2λI) w_S = X_Sᵀy + 2λ w̄_S − α_S
    S = support
    A = X[:, S].T @ X[:, S] + 2 * problem.lam * torch.eye(6, dtype=torch.float64)
    b = X[:, S].T @ problem.y + 2 * problem.lam * w_bar[S] - alpha[S]
    w_direct = torch.linalg.solve(A, b)
    torch.testing.assert_close(w[S], w_direct, atol=1e-8, rtol=0)
    assert torch.all(w[~S] == 0)


@pytest.mark.parametrize("with_alpha", [False, True])
def test_woodbury_path_equals_direct_path(with_alpha):
    X, w_bar = random_problem(n=8, p=30, seed=4)  # n < |S|
    alpha = 0.1 * torch.randn(30, dtype=torch.float64) if with_alpha else None
    problem = Problem(X, w_bar, 0.05, alpha)
    support = hard_threshold(w_bar, 20)
    w_wood = ridge_on_support(problem, support, woodbury=True)
    w_direct = ridge_on_support(problem, support, woodbury=False)
    torch.testing.assert_close(w_wood, w_direct, atol=1e-9, rtol=0)


def test_block_with_one_block_equals_backsolve():
    X, w_bar = random_problem(n=20, p=40, seed=5)
    full = solve(X, w_bar, 10, l2=0.1, method="backsolve")
    one = solve(X, w_bar, 10, l2=0.1, method="block", blocks=40)
    torch.testing.assert_close(one.w, full.w, atol=1e-10, rtol=0)
    assert torch.equal(one.support, full.support)


def test_block_solves_each_block_independently():
    X, w_bar = random_problem(n=20, p=40, seed=6)
    problem = Problem(X, w_bar, 0.1)
    w, support = block_backsolve(problem, 12, [10, 30])
    for b in make_blocks(40, [10, 30]):  # each block is the exact backsolve of its own problem
        sub = Problem(X[:, b], w_bar[b], 0.1)
        torch.testing.assert_close(w[b], ridge_on_support(sub, support[b]), atol=1e-10, rtol=0)


# -- IHT -----------------------------------------------------------------------------

def planted(n=200, p=400, k=20, seed=0, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64) / math.sqrt(n)
    w_star = torch.zeros(p, dtype=torch.float64)
    true = torch.randperm(p, generator=g)[:k]
    w_star[true] = torch.sign(torch.randn(k, generator=g, dtype=torch.float64)) * (1 + torch.rand(k, generator=g, dtype=torch.float64))
    y = X @ w_star + noise * torch.randn(n, generator=g, dtype=torch.float64)
    # w̄: the truth buried in dense clutter, some of it larger than the true weights
    w_bar = w_star + 1.5 * torch.randn(p, generator=g, dtype=torch.float64)
    return X, y, w_bar, w_star


def test_line_search_iht_is_monotone():
    for seed in range(5):
        X, y, w_bar, _ = planted(seed=seed, noise=0.1)
        problem = Problem(X, w_bar, 1e-4, y=y)
        _, _, trace, _ = iht(problem, 20, line_search=True, max_iter=200)
        diffs = torch.tensor(trace[1:]) - torch.tensor(trace[:-1])
        assert torch.all(diffs <= 1e-12 * abs(trace[0])), diffs.max()


def test_line_search_beats_fixed_step_in_iterations():
    X, y, w_bar, _ = planted(seed=1, noise=0.01)
    problem = Problem(X, w_bar, 0.0, y=y)
    _, _, fixed_trace, fixed_iters = iht(problem, 20, line_search=False, max_iter=2000, tol=1e-10)
    _, _, ls_trace, ls_iters = iht(problem, 20, line_search=True, max_iter=2000, tol=1e-10)
    target = fixed_trace[-1]
    reached = next(i for i, f in enumerate(ls_trace) if f <= target * (1 + 1e-6))
    print(f"fixed step: {fixed_iters} iterations to f={target:.3e}; line search reaches it at {reached}")
    assert reached < fixed_iters


@pytest.mark.parametrize("solver", ["iht", "active"])
def test_noiseless_planted_support_is_recovered(solver):
    for seed in range(3):
        X, y, w_bar, w_star = planted(seed=seed)
        problem = Problem(X, w_bar, 0.0, y=y)
        if solver == "iht":
            w, support, _, _ = iht(problem, 20, max_iter=2000, tol=1e-12)
        else:
            w, support, _, _ = active_set(problem, 20, max_iter=2000, tol=1e-12)
        assert torch.equal(support, w_star != 0)
        torch.testing.assert_close(w, w_star, atol=1e-6, rtol=0)
        # magnitude pruning of w̄ gets it wrong: the test problem is not trivial
        assert not torch.equal(hard_threshold(w_bar, 20), w_star != 0)


def test_mask_fixes_coordinates_at_zero():
    X, w_bar = random_problem(n=30, p=16, seed=7)
    mask = torch.ones(16, dtype=torch.bool)
    mask[::2] = False
    w_bar = w_bar * mask
    for method in ["active", "iht", "backsolve"]:
        res = solve(X, w_bar, 4, l2=0.01, method=method, mask=mask)
        assert res.nnz == 4 and torch.all(res.w[~mask] == 0) and torch.all(res.support <= mask)
        ref = Problem(X, w_bar, 0.01)
        assert abs(ref.objective(res.w) - res.objective) <= 1e-9 * abs(res.objective)


# -- dtypes and devices --------------------------------------------------------------

def test_fp32_and_fp64_agree_on_support():
    X, y, w_bar, _ = planted(n=200, p=400, k=20, seed=2, noise=0.05)
    w_bar = torch.linalg.lstsq(X, y).solution + 0.1 * w_bar  # a "trained" dense w̄ near the data
    for method in METHODS:
        r64 = solve(X, w_bar, 20, l2=1e-3, method=method, **_opts(method))
        r32 = solve(X.float(), w_bar.float(), 20, l2=1e-3, method=method, **_opts(method))
        assert r32.w.dtype == torch.float32
        assert torch.equal(r32.support, r64.support), method
        torch.testing.assert_close(r32.w.double(), r64.w, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")
@pytest.mark.parametrize("method", METHODS)
def test_cpu_and_cuda_agree(method):
    X, w_bar = random_problem(n=100, p=60, seed=9)
    cpu = solve(X, w_bar, 15, l2=0.1, method=method, **_opts(method))
    gpu = solve(X.cuda(), w_bar.cuda(), 15, l2=0.1, method=method, **_opts(method))
    assert gpu.w.is_cuda
    assert torch.equal(gpu.support.cpu(), cpu.support)
    torch.testing.assert_close(gpu.w.cpu(), cpu.w, atol=1e-8, rtol=1e-8)


# -- bad input -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(k=0), ValueError, "k"),
    (dict(k=13), ValueError, "k"),
    (dict(k=2.5), TypeError, "k"),
    (dict(l2=-1.0), ValueError, "l2"),
    (dict(method="newton"), ValueError, "method"),
    (dict(method="block"), ValueError, "blocks"),
    (dict(blocks=4), ValueError, "blocks"),
])
def test_bad_arguments(kwargs, exc, word):
    X, w_bar = random_problem(n=20, p=12)
    args = dict(k=3, l2=0.1, method="active") | kwargs
    k = args.pop("k")
    with pytest.raises(exc, match=word):
        solve(X, w_bar, k, **args)


def test_bad_tensors():
    X, w_bar = random_problem(n=20, p=12)
    with pytest.raises(ValueError, match="w_bar"):
        solve(X, w_bar[:11], 3)
    bad = X.clone(); bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="X.*NaN"):
        solve(bad, w_bar, 3)
    bad = w_bar.clone(); bad[1] = float("inf")
    with pytest.raises(ValueError, match="w_bar.*Inf"):
        solve(X, bad, 3)
    with pytest.raises(ValueError, match="X.*empty"):
        solve(torch.zeros(0, 12, dtype=torch.float64), w_bar, 3)
    with pytest.raises(TypeError, match="X"):
        solve(X.long(), w_bar, 3)
    with pytest.raises(TypeError, match="X"):
        solve(X.numpy(), w_bar, 3)
    with pytest.raises(TypeError, match="w_bar"):
        solve(X, w_bar.float(), 3)
    with pytest.raises(ValueError, match="alpha"):
        solve(X, w_bar, 3, alpha=torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(s):
    with pytest.raises(ValueError, match="sparsity"):
        num_kept(s, 100)


def test_num_kept():
    assert num_kept(0.9, 32360) == 3236
    assert num_kept(0.0, 10) == 10


def test_refit_keeps_the_objective_monotone_and_ends_optimal_on_its_support():
    from chita_minimal.solver.iht import iht
    from chita_minimal.solver.problem import Problem, ridge_on_support

    for seed in range(4):
        X, w_bar = random_problem(n=30, p=60, seed=seed)  # n < k: an ill-conditioned support, slow for plain IHT
        prob = Problem(X, w_bar, 1e-4)
        w_plain, s_plain, t_plain, it_plain = iht(prob, 40, max_iter=2000)
        w, s, trace, it = iht(prob, 40, max_iter=2000, refit=3)
        assert all(b <= a + 1e-12 * abs(a) for a, b in zip(trace, trace[1:]))
        assert it <= it_plain
        torch.testing.assert_close(w, ridge_on_support(prob, s), rtol=1e-6, atol=1e-8)  # exact on its support
        if torch.equal(s, s_plain):  # same support: the same weights, reached in fewer iterations
            torch.testing.assert_close(w, ridge_on_support(prob, s_plain), rtol=1e-6, atol=1e-8)


def test_active_set_refit_option_reaches_the_plain_optimum_on_a_settled_support():
    X, w_bar = random_problem(n=25, p=50, seed=7)
    plain = solve(X, w_bar, 40, l2=1e-4, method="active", refit=None)
    refit = solve(X, w_bar, 40, l2=1e-4, method="active", refit=3)
    assert refit.objective <= plain.objective * (1 + 1e-3)
    assert int(refit.support.sum()) == 40


def test_iht_takes_and_returns_the_residual_of_its_iterates():
    """``r0`` (the residual of the start, which the caller has) gives the same iterates as computing it;
    ``return_residual`` returns y − Xw of the result (carried through the iterations and refits)."""
    X, w_bar = random_problem(n=40, p=60, seed=3)
    problem = Problem(X, w_bar, 0.01)
    w0 = torch.where(hard_threshold(w_bar, 15), w_bar, torch.zeros_like(w_bar))
    plain = iht(problem, 15, w0, refit=5)
    w, support, trace, it, r = iht(problem, 15, w0, refit=5, r0=problem.residual(w0), return_residual=True)
    torch.testing.assert_close(w, plain[0], rtol=0, atol=0)
    assert trace == plain[2] and it == plain[3]
    torch.testing.assert_close(r, problem.residual(w), rtol=1e-10, atol=1e-10)
