"""The block-diagonal problem of Alg 6: its operator, the batched per-block backsolve, block IHT."""

import pytest
import torch

from chita_minimal.solver.problem import Problem
from chita_minimal.solver.solve import solve
from chita_minimal.network import params as cm_params
from chita_minimal.solver.blocks import (BlockProblem, block_backsolve, block_backsolve_looped, layer_blocks, make_blocks)
from conftest import random_problem

SPECS = [7, [10, 25, 5], [torch.arange(0, 40, 2), torch.arange(1, 40, 2)]]


def dense_block_diagonal(X, blocks):
    """X̃ = diag(X_1, …, X_G) as a (G·n, p) matrix (tiny problems only)."""
    n, p = X.shape
    parts = make_blocks(p, blocks)
    out = torch.zeros(len(parts) * n, p, dtype=X.dtype)
    for g, b in enumerate(parts):
        out[g * n:(g + 1) * n, b] = X[:, b]
    return out


@pytest.mark.parametrize("blocks", SPECS)
def test_operator_is_the_block_diagonal_matrix(blocks):
    X, w_bar = random_problem(n=12, p=40, seed=1)
    Xt = dense_block_diagonal(X, blocks)
    bp = BlockProblem(X, w_bar, blocks, l2=0.3)
    v, r = torch.randn(40, dtype=X.dtype), torch.randn(Xt.shape[0], dtype=X.dtype)
    torch.testing.assert_close(bp.matvec(v), Xt @ v)
    torch.testing.assert_close(bp.rmatvec(r), Xt.T @ r)
    idx = torch.tensor([3, 17, 30])
    torch.testing.assert_close(bp.matvec_cols(idx, v[idx]), Xt[:, idx] @ v[idx])
    # the same objective as Problem on the dense block-diagonal matrix, also after restriction
    ref = Problem(Xt, w_bar, 0.3)
    ref.lam = bp.lam  # λ = l2·n/2 uses the n of one block
    w = torch.randn(40, dtype=X.dtype)
    assert bp.objective(w) == pytest.approx(ref.objective(w), rel=1e-10)
    keep = torch.tensor([0, 5, 6, 21, 39])
    w_sub = torch.zeros(40, dtype=X.dtype)
    w_sub[keep] = w[keep]
    assert bp.restrict(keep).objective(w[keep]) == pytest.approx(bp.objective(w_sub), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("blocks", SPECS)
@pytest.mark.parametrize("with_alpha", [False, True])
@pytest.mark.parametrize("sliced", [False, True])
def test_batched_and_looped_block_backsolve_agree(dtype, blocks, with_alpha, sliced, monkeypatch):
    _slicing(monkeypatch, sliced)
    X, w_bar = random_problem(n=12, p=40, seed=2, dtype=dtype)
    alpha = 0.1 * torch.randn(40, dtype=dtype) if with_alpha else None
    problem = Problem(X, w_bar, 0.2, alpha)
    for k in [3, 17, 33]:
        w1, s1 = block_backsolve(problem, k, blocks)
        w2, s2 = block_backsolve_looped(problem, k, blocks)
        assert torch.equal(s1, s2) and int((w1 != 0).sum()) <= k
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(w1, w2, atol=tol, rtol=tol)


@pytest.mark.parametrize("sliced", [False, True])
def test_batched_block_backsolve_woodbury_and_singular_paths(sliced, monkeypatch):
    _slicing(monkeypatch, sliced)
    X, w_bar = random_problem(n=6, p=40, seed=3)  # blocks of 20 > n = 6: the n×n Woodbury form
    problem = Problem(X, w_bar, 0.5)
    support = torch.zeros(40, dtype=torch.bool)
    support[::2] = True
    torch.testing.assert_close(block_backsolve(problem, 20, 20, support)[0],
                               block_backsolve_looped(problem, 20, 20, support)[0])
    singular = Problem(X, w_bar, 0.0)  # λ = 0 and 10 columns on 6 rows per block: minimum-norm least squares
    torch.testing.assert_close(block_backsolve(singular, 20, 20, support)[0],
                               block_backsolve_looped(singular, 20, 20, support)[0])


@pytest.mark.parametrize("n", [10, 80])  # n = 10: wide blocks take the n×n Woodbury form
@pytest.mark.parametrize("with_alpha", [False, True])
@pytest.mark.parametrize("spec", ["sizes", "int", "index"])
@pytest.mark.parametrize("sliced", [False, True])
def test_block_backsolve_equals_the_looped_reference_across_buckets_and_chunks(n, with_alpha, spec, sliced, monkeypatch):
    """Blocks keeping 0…120 columns (many padded widths, several buckets), chunked solves: 1e-10 in fp64.
    On a CPU contiguous blocks ("sizes", "int") are solved one slice at a time (counted); ``sliced=False``: the
    batched buckets of every other device."""
    import chita_minimal.solver.blocks as blocks_mod
    _slicing(monkeypatch, sliced)
    slices = []
    real = blocks_mod._block_ridge_sliced
    monkeypatch.setattr(blocks_mod, "_block_ridge_sliced", lambda *a: slices.append(1) or real(*a))
    gen = torch.Generator().manual_seed(4)
    sizes = [50, 120, 7, 64, 1, 33, 90, 35]
    p = sum(sizes)
    X = torch.randn(n, p, generator=gen, dtype=torch.float64)
    w_bar = torch.randn(p, generator=gen, dtype=torch.float64)
    alpha = 0.1 * torch.randn(p, generator=gen, dtype=torch.float64) if with_alpha else None
    blocks = {"sizes": sizes, "int": 40, "index": list(torch.randperm(p, generator=gen).split(sizes))}[spec]
    density = torch.rand(len(sizes), generator=gen).repeat_interleave(torch.tensor(sizes))
    support = torch.rand(p, generator=gen) < density  # from empty to almost full blocks
    monkeypatch.setattr(blocks_mod, "_SOLVE_NUMBERS", 3 * 16 * max(16, n))  # a few blocks per chunk
    for l2 in [0.05, 1.0]:
        problem = Problem(X, w_bar, l2, alpha)
        w1, _ = block_backsolve(problem, None, blocks, support)
        w2, _ = block_backsolve_looped(problem, None, blocks, support)
        assert not bool(w1[~support].any())
        torch.testing.assert_close(w1, w2, atol=1e-10, rtol=1e-10)
    assert len(slices) == (2 if sliced and spec != "index" else 0)


def _slicing(monkeypatch, sliced: bool):
    """On a CPU block_ridge solves contiguous blocks one slice at a time; ``sliced=False`` takes the batched path
    of the other devices instead."""
    if not sliced:
        import chita_minimal.solver.blocks as blocks_mod
        monkeypatch.setattr(blocks_mod, "_sliceable", lambda X: False)


def test_padded_width_bounds_the_padding():
    from chita_minimal.solver.blocks import padded_width
    s = torch.arange(0, 2000)
    W = padded_width(s)
    assert int(W[0]) == 0 and bool((W >= s).all()) and bool((W % 8 == 0).all())
    assert bool((W[33:] <= 1.25 * s[33:]).all())
    assert len(torch.unique(W[(s > 256) & (s <= 512)])) <= 4  # about four widths per octave


@pytest.mark.parametrize("seed", range(12))
def test_block_iht_with_one_block_equals_the_active_set(seed):
    """The same Alg 4 on the same problem. The active set gives a plain dense Problem a few more devices (batched
    trial steps, several swaps at once, the Frobenius bound for L, the exact search of step 5); on a problem with
    ``dense_x = False``, as the block-diagonal problem is, it runs without them: there the two agree to rounding."""
    from chita_minimal.solver.active_set import active_set

    class Operator(Problem):  # the same problem, seen by the active set as a general operator
        dense_x = False

    X, w_bar = random_problem(n=25, p=60, seed=seed)
    k = 5 + 4 * seed
    problem = Operator(X, w_bar, 0.05)
    w, support, _, _ = active_set(problem, k)
    block = solve(X, w_bar, k, l2=0.05, method="block-iht", blocks=60)
    assert torch.equal(support, block.support)
    torch.testing.assert_close(block.w, w, atol=1e-9, rtol=1e-9)
    assert block.objective == pytest.approx(problem.objective(w), rel=1e-9)


@pytest.mark.parametrize("blocks", SPECS)
def test_block_iht_keeps_one_global_k_and_improves_on_block_backsolve(blocks):
    X, w_bar = random_problem(n=12, p=40, seed=4)
    parts = make_blocks(40, blocks)
    for k in [4, 13, 29]:
        res = solve(X, w_bar, k, l2=0.1, method="block-iht", blocks=blocks)
        assert int(res.support.sum()) == k and int((res.w != 0).sum()) <= k
        assert not bool((res.w[~res.support] != 0).any())
        assert all(a >= b - 1e-9 * abs(a) for a, b in zip(res.trace, res.trace[1:]))  # monotone
        # the block objective is the quantity both minimise: block IHT starts at block backsolve's support
        bp = BlockProblem(X, w_bar, blocks, l2=0.1)
        w_bso, _ = block_backsolve(Problem(X, w_bar, 0.1), k, blocks)
        assert bp.objective(res.w) <= bp.objective(w_bso) + 1e-9
        # the support is not a fixed quota per block: the counts follow the global top-k
        assert sum(int(res.support[b].sum()) for b in parts) == k


def test_block_iht_moves_away_from_the_magnitude_mask():
    # α = 0: block backsolve keeps the magnitude-pruning mask; block IHT does not have to
    X, w_bar = random_problem(n=30, p=60, seed=5, correlation=0.5)
    moved = 0
    for k in [10, 20, 30, 40]:
        res = solve(X, w_bar, k, l2=0.01, method="block-iht", blocks=15)
        bso = solve(X, w_bar, k, l2=0.01, method="block", blocks=15)
        moved += not torch.equal(res.support, bso.support)
        assert res.trace[-1] <= BlockProblem(X, w_bar, 15, 0.01).objective(bso.w) + 1e-9
    assert moved >= 3


def test_block_iht_respects_a_mask():
    X, w_bar = random_problem(n=12, p=40, seed=6)
    mask = torch.rand(40, generator=torch.Generator().manual_seed(0)) < 0.6
    res = solve(X, w_bar, 10, l2=0.1, method="block-iht", blocks=8, mask=mask)
    assert int(res.support.sum()) == 10 and not bool((res.support & ~mask).any())
    assert not bool((res.w[~mask] != 0).any())


def test_block_iht_needs_blocks():
    X, w_bar = random_problem(n=12, p=40, seed=7)
    with pytest.raises(ValueError, match="needs blocks"):
        solve(X, w_bar, 10, method="block-iht")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")
def test_block_iht_cpu_and_cuda_agree():
    X, w_bar = random_problem(n=25, p=200, seed=8)
    cpu = solve(X, w_bar, 40, l2=0.1, method="block-iht", blocks=30)
    gpu = solve(X.cuda(), w_bar.cuda(), 40, l2=0.1, method="block-iht", blocks=30)
    assert torch.equal(cpu.support, gpu.support.cpu())
    torch.testing.assert_close(gpu.w.cpu(), cpu.w, atol=1e-8, rtol=1e-8)


def test_layer_blocks_partition_each_layer_without_straddling():
    model = torch.nn.Sequential(torch.nn.Linear(7, 5, bias=False), torch.nn.Linear(5, 3, bias=False))
    lay = cm_params.layout(model, cm_params.resolve(model))   # layers of 35 and 15 weights
    blocks = layer_blocks(lay, 10)
    assert [len(b) for b in blocks] == [10, 10, 10, 5, 10, 5]
    assert torch.equal(torch.cat(blocks), torch.arange(lay.p))
    layer_of = torch.repeat_interleave(torch.arange(len(lay)), torch.tensor(lay.numels))
    assert all(len(set(layer_of[b].tolist())) == 1 for b in blocks)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            layer_blocks(lay, bad)


def test_equal_partition_cuts_every_layer_into_equal_blocks():
    from types import SimpleNamespace
    lay = SimpleNamespace(offsets=[0, 1234, 1234 + 80], numels=[1234, 80, 2000])
    fixed = layer_blocks(lay, 500)
    equal = layer_blocks(lay, 500, partition="equal")
    for parts in (fixed, equal):  # a partition of range(p) that never straddles a layer
        assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(3314))
        assert all(len({int(torch.searchsorted(torch.tensor(lay.offsets), int(i), right=True)) for i in b[[0, -1]]})
                   == 1 for b in parts)
    assert [len(b) for b in fixed] == [500, 500, 234, 80, 500, 500, 500, 500]
    assert [len(b) for b in equal] == [617, 617, 80, 500, 500, 500, 500]
    with pytest.raises(ValueError, match="partition must be one of"):
        layer_blocks(lay, 500, partition="random")


def test_a_shifted_fixed_partition_moves_every_cut_and_still_partitions_each_layer():
    from types import SimpleNamespace
    lay = SimpleNamespace(offsets=[0, 1234, 1234 + 80], numels=[1234, 80, 2000])
    shifted = layer_blocks(lay, 500, shift=200)
    assert torch.equal(torch.sort(torch.cat(shifted)).values, torch.arange(3314))
    # a layer longer than the shift starts with it; one shorter (80) stays one block
    assert [len(b) for b in shifted] == [200, 500, 500, 34, 80, 200, 500, 500, 500, 300]
    assert all(len({int(torch.searchsorted(torch.tensor(lay.offsets), int(i), right=True)) for i in b[[0, -1]]})
               == 1 for b in shifted)
    assert [len(b) for b in layer_blocks(lay, 500, shift=0)] == [len(b) for b in layer_blocks(lay, 500)]
    for bad in (-1, 500, 2.0, True):
        with pytest.raises(ValueError, match="shift"):
            layer_blocks(lay, 500, shift=bad)
    with pytest.raises(ValueError, match="shift"):
        layer_blocks(lay, 500, partition="equal", shift=100)
