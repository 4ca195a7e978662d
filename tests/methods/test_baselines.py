"""Tests of the baselines (MP, WoodFisher, M-FAC, CBS) against dense / brute-force references.

Dense p×p Fisher matrices appear only here, on tiny p.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from chita_minimal.methods.mfac import InverseFisher, mfac
from chita_minimal.methods.woodfisher import block_fisher_inverse, joint_obs_loss, woodfisher
from chita_minimal.methods.cbs import cbs
from chita_minimal.methods.magnitude import magnitude
from chita_minimal.methods.mfac import _targets
from chita_minimal.methods.woodfisher import to_blocks
from chita_minimal.solver.problem import Problem

F64 = torch.float64


def _instance(n, p, seed, dtype=F64, corr=0.0, spread=1.0):
    """Random gradients X (n, p) and weights w̄ (p,).

    corr adds a factor shared by all columns (weights that cancel); spread scales column q by
    exp(spread·N(0,1)), so diag(F⁻¹) varies and OBS saliency differs from magnitude.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=F64) + corr * torch.randn(n, 1, generator=g, dtype=F64)
    X = X * torch.exp(spread * torch.randn(p, generator=g, dtype=F64))
    w = torch.randn(p, generator=g, dtype=F64)
    return X.to(dtype), w.to(dtype)


def _dense_fisher(X, l2):
    n, p = X.shape
    return X.T @ X / n + l2 * torch.eye(p, dtype=X.dtype)


def _block_diag_fisher(X, l2, B):
    F = _dense_fisher(X, l2)
    p = F.shape[0]
    same = (torch.arange(p) // B).unsqueeze(0) == (torch.arange(p) // B).unsqueeze(1)
    return torch.where(same, F, torch.zeros_like(F))


def _restricted_minimiser(X, w_bar, l2, support):
    """argmin Problem(X, w̄, l2).objective over w with w = 0 off the support, solved directly."""
    prob = Problem(X, w_bar, l2)
    S = torch.nonzero(support).squeeze(1)
    XS = X[:, S]
    lhs = XS.T @ XS + 2 * prob.lam * torch.eye(len(S), dtype=X.dtype)
    rhs = XS.T @ prob.y + 2 * prob.lam * w_bar[S]
    w = torch.zeros_like(w_bar)
    w[S] = torch.linalg.solve(lhs, rhs)
    return w


ALL = {
    "magnitude": lambda X, w, k: magnitude(w, k),
    "woodfisher": lambda X, w, k: woodfisher(X, w, k, l2=0.1, block_size=7),
    "woodfisher_joint": lambda X, w, k: woodfisher(X, w, k, l2=0.1, block_size=7, update="joint"),
    "mfac": lambda X, w, k: mfac(X, w, k, l2=0.1),
    "mfac_3steps": lambda X, w, k: mfac(X, w, k, l2=0.1, steps=3),
    "cbs": lambda X, w, k: cbs(X, w, k, l2=0.1, block_size=7),
}


# -- WoodFisher -------------------------------------------------------------------------------
@pytest.mark.parametrize("update", ["independent", "joint"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_woodfisher_one_removal_is_exact_obs(update, seed):
    n, p, l2 = 20, 10, 0.3
    X, w_bar = _instance(n, p, seed)
    Finv = torch.linalg.inv(_dense_fisher(X, l2))
    d = Finv.diagonal()
    q = int(torch.argmin(w_bar**2 / (2 * d)))  # OBS: smallest saliency
    w_obs = w_bar - (w_bar[q] / d[q]) * Finv[:, q]  # OBS update (Hassibi & Stork)
    w_obs[q] = 0.0
    w, support = woodfisher(X, w_bar, p - 1, l2=l2, block_size=p, update=update)
    assert torch.nonzero(~support).flatten().tolist() == [q]
    torch.testing.assert_close(w, w_obs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 6, 9, 12])
def test_woodfisher_joint_one_block_is_restricted_minimiser(k):
    n, p, l2 = 15, 12, 0.2
    X, w_bar = _instance(n, p, seed=k)
    w, support = woodfisher(X, w_bar, k, l2=l2, block_size=100, update="joint")
    torch.testing.assert_close(w, _restricted_minimiser(X, w_bar, l2, support), rtol=0, atol=1e-10)


@pytest.mark.parametrize("update", ["independent", "joint"])
def test_woodfisher_blocks_match_dense_block_diagonal_obs(update):
    """Several blocks (the last shorter): global saliency threshold + per-block OBS updates."""
    n, p, l2, B, k = 30, 23, 0.5, 5, 9
    X, w_bar = _instance(n, p, seed=3)
    Finv = torch.linalg.inv(_block_diag_fisher(X, l2, B))
    d = Finv.diagonal()
    removed = torch.ones(p, dtype=torch.bool)
    removed[torch.topk(w_bar**2 / (2 * d), k).indices] = False
    Q = torch.nonzero(removed).squeeze(1)
    if update == "independent":
        u = torch.zeros_like(w_bar)
        u[Q] = w_bar[Q] / d[Q]
    else:  # Finv is block diagonal, so the dense joint solve decouples into the blocks
        u = torch.zeros_like(w_bar)
        u[Q] = torch.linalg.solve(Finv[Q][:, Q], w_bar[Q])
    expected = torch.where(removed, torch.zeros_like(w_bar), w_bar - Finv @ u)
    w, support = woodfisher(X, w_bar, k, l2=l2, block_size=B, update=update)
    assert torch.equal(support, ~removed)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-10)


def test_woodbury_block_inverse_equals_dense_inverse():
    n, p, l2, B = 15, 23, 0.05, 5  # four full blocks and one of 3
    X, _ = _instance(n, p, seed=4)
    F = _dense_fisher(X, l2)
    Finv = block_fisher_inverse(X, l2, B)
    assert Finv.shape == (5, B, B)
    for b in range(5):
        lo, hi = b * B, min(p, b * B + B)
        m = hi - lo
        torch.testing.assert_close(Finv[b, :m, :m], torch.linalg.inv(F[lo:hi, lo:hi]), rtol=0, atol=1e-10)
    # padding of the last block: decoupled, (1/l2)·I
    torch.testing.assert_close(Finv[4, 3:, 3:], torch.eye(2, dtype=F64) / l2, rtol=0, atol=1e-10)
    assert float(Finv[4, :3, 3:].abs().max()) < 1e-12


# -- M-FAC ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [10, 80])  # n < p and n > p
def test_mfac_inverse_fisher_products(n):
    p, l2 = 50, 0.1
    X, _ = _instance(n, p, seed=n)
    F = _dense_fisher(X, l2)
    Finv = InverseFisher(X, l2)
    v = torch.randn(p, dtype=F64, generator=torch.Generator().manual_seed(0))
    V = torch.randn(p, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(Finv.matvec(v), torch.linalg.solve(F, v), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(Finv.matvec(V), torch.linalg.solve(F, V), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(Finv.diag(), torch.linalg.inv(F).diagonal(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [1, 7, 29])
def test_mfac_one_step_matches_dense_obs(k):
    n, p, l2 = 25, 30, 0.2
    X, w_bar = _instance(n, p, seed=k)
    Finv = torch.linalg.inv(_dense_fisher(X, l2))
    d = Finv.diagonal()
    support = torch.zeros(p, dtype=torch.bool)
    support[torch.topk(w_bar**2 / (2 * d), k).indices] = True
    u = torch.where(support, torch.zeros_like(w_bar), w_bar / d)
    expected = torch.where(support, w_bar - Finv @ u, torch.zeros_like(w_bar))
    w, s = mfac(X, w_bar, k, l2=l2)
    assert torch.equal(s, support)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-10)


def test_mfac_steps_follow_geometric_targets_and_use_restricted_fisher():
    assert _targets(1000, 100, 1) == [100]
    assert _targets(1000, 100, 2) == [316, 100]
    assert _targets(1000, 100, 4) == [562, 316, 178, 100]
    assert _targets(5, 5, 3) == [5]
    # a second step on the masked gradients equals OBS with the Fisher of the kept coordinates
    n, p, l2 = 25, 20, 0.2
    X, w_bar = _instance(n, p, seed=5)
    w1, s1 = mfac(X, w_bar, _targets(p, 4, 2)[0], l2=l2)
    w2, s2 = mfac(X, w_bar, 4, l2=l2, steps=2)
    S = torch.nonzero(s1).squeeze(1)
    Finv = torch.linalg.inv(_dense_fisher(X[:, S], l2))
    d = Finv.diagonal()
    keep = torch.zeros(len(S), dtype=torch.bool)
    keep[torch.topk(w1[S] ** 2 / (2 * d), 4).indices] = True
    wS = w1[S] - Finv @ torch.where(keep, torch.zeros_like(d), w1[S] / d)
    expected = torch.zeros_like(w_bar)
    expected[S[keep]] = wS[keep]
    assert torch.equal(s2, expected != 0)
    torch.testing.assert_close(w2, expected, rtol=0, atol=1e-10)


# -- every method ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(ALL))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_exactly_k_nonzeros(method, dtype):
    n, p = 12, 20
    X, w_bar = _instance(n, p, seed=6, dtype=dtype)
    for k in [1, 2, 7, 13, p - 1, p]:
        w, support = ALL[method](X, w_bar, k)
        assert w.dtype == dtype and w.shape == (p,) and support.dtype == torch.bool
        assert int(support.sum()) == k
        assert int((w != 0).sum()) == k, (method, k)
        assert torch.all(w[~support] == 0.0)
        if k == p:
            assert torch.equal(w, w_bar)


def test_magnitude_keeps_largest_and_breaks_ties_by_index():
    w_bar = torch.tensor([1.0, -2.0, 0.5, 2.0, -1.0, 1.0])
    w, support = magnitude(w_bar, 3)
    assert support.tolist() == [True, True, False, True, False, False]  # |1| tie: index 0 wins
    assert w.tolist() == [1.0, -2.0, 0.0, 2.0, 0.0, 0.0]
    for _ in range(3):
        assert torch.equal(magnitude(w_bar, 3).support, support)
    assert magnitude(w_bar, 5).support.tolist() == [True, True, False, True, True, True]


# -- CBS --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_cbs_never_worse_than_woodfisher_per_block(seed):
    n, p, l2, B, k = 8, 60, 0.01, 12, 20
    X, w_bar = _instance(n, p, seed, corr=2.0)
    A = block_fisher_inverse(X, l2, B)
    wb = to_blocks(w_bar, 5, B)
    wf = woodfisher(X, w_bar, k, l2=l2, block_size=B, update="joint")
    cb = cbs(X, w_bar, k, l2=l2, block_size=B)
    rem_wf, rem_cb = ~to_blocks(wf.support, 5, B), ~to_blocks(cb.support, 5, B)
    assert torch.equal(rem_wf.sum(1), rem_cb.sum(1))  # same allocation
    loss_wf, loss_cb = joint_obs_loss(A, wb, rem_wf), joint_obs_loss(A, wb, rem_cb)
    assert torch.all(loss_cb <= loss_wf * (1 + 1e-12))
    # CBS-U: each block's weights are the joint OBS update for CBS's removed set
    expected = torch.zeros_like(w_bar)
    for b in range(5):
        sl = slice(b * B, b * B + B)
        expected[sl] = _restricted_minimiser(X[:, sl], w_bar[sl], l2, cb.support[sl])
    torch.testing.assert_close(cb.w, expected, rtol=0, atol=1e-8)


def test_cbs_local_search_improves_somewhere():
    improved = 0
    for seed in range(5):
        X, w_bar = _instance(8, 60, seed, corr=2.0)
        A = block_fisher_inverse(X, 0.01, 12)
        wb = to_blocks(w_bar, 5, 12)
        l_wf = joint_obs_loss(A, wb, ~to_blocks(woodfisher(X, w_bar, 20, l2=0.01, block_size=12).support, 5, 12))
        l_cb = joint_obs_loss(A, wb, ~to_blocks(cbs(X, w_bar, 20, l2=0.01, block_size=12).support, 5, 12))
        improved += int((l_cb < l_wf * (1 - 1e-6)).sum())
    assert improved >= 3


def test_cbs_reaches_brute_force_optimum_most_of_the_time():
    """One block, p = 8, k = 3: optimal support of the joint OBS loss by enumeration.

    Observed on these 20 seeds: CBS 19/20 optimal, WoodFisher's saliency selection 8/20.
    """
    p, k, l2 = 8, 3, 0.01
    hits_cbs = hits_wf = 0
    for seed in range(20):
        X, w_bar = _instance(6, p, seed, corr=2.0)
        A = block_fisher_inverse(X, l2, p)
        best = min(float(joint_obs_loss(A, w_bar[None], torch.tensor([[i not in S for i in range(p)]])))
                   for S in itertools.combinations(range(p), k))
        loss = lambda s: float(joint_obs_loss(A, w_bar[None], ~s[None]))  # noqa: E731
        res = cbs(X, w_bar, k, l2=l2)
        hits_cbs += loss(res.support) <= best * (1 + 1e-9)
        hits_wf += loss(woodfisher(X, w_bar, k, l2=l2).support) <= best * (1 + 1e-9)
        torch.testing.assert_close(res.w, _restricted_minimiser(X, w_bar, l2, res.support), rtol=0, atol=1e-8)
    print(f"brute-force optimum reached: CBS {hits_cbs}/20, WoodFisher {hits_wf}/20")
    assert hits_cbs >= 16
    assert hits_cbs > hits_wf


def test_cbs_zero_rounds_is_woodfisher_joint():
    X, w_bar = _instance(8, 60, 0, corr=2.0)
    a = cbs(X, w_bar, 20, l2=0.01, block_size=12, swap_rounds=0)
    b = woodfisher(X, w_bar, 20, l2=0.01, block_size=12, update="joint")
    assert torch.equal(a.support, b.support)
    torch.testing.assert_close(a.w, b.w, rtol=0, atol=1e-12)


# -- input checks ------------------------------------------------------------------------------
FISHER = {
    "woodfisher": lambda X, w, k, **kw: woodfisher(X, w, k, **{"l2": 0.1, **kw}),
    "mfac": lambda X, w, k, **kw: mfac(X, w, k, **{"l2": 0.1, **kw}),
    "cbs": lambda X, w, k, **kw: cbs(X, w, k, **{"l2": 0.1, **kw}),
}


@pytest.mark.parametrize("method", list(FISHER))
def test_bad_input(method):
    f = FISHER[method]
    X, w = _instance(5, 10, 0)
    for l2 in [0.0, -1.0, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="l2"):
            f(X, w, 3, l2=l2)
    for k in [0, 11, -1]:
        with pytest.raises(ValueError, match="k"):
            f(X, w, k)
    with pytest.raises(TypeError, match="k"):
        f(X, w, 3.0)
    with pytest.raises(ValueError, match="w_bar"):
        f(X, torch.randn(11, dtype=F64), 3)
    with pytest.raises(ValueError, match="w_bar"):
        f(X, w[None], 3)
    with pytest.raises(ValueError, match="X"):
        f(X[0], w, 3)
    with pytest.raises(TypeError, match="X"):
        f(X.to(torch.int64), w, 3)
    with pytest.raises(TypeError, match="w_bar"):
        f(X, w.to(torch.int32), 3)
    with pytest.raises(TypeError, match="w_bar"):
        f(X, w.float(), 3)  # dtype mismatch with X
    if method in ("woodfisher", "cbs"):
        for bs in [0, -3]:
            with pytest.raises(ValueError, match="block_size"):
                f(X, w, 3, block_size=bs)
        with pytest.raises(TypeError, match="block_size"):
            f(X, w, 3, block_size=2.5)
    if method == "woodfisher":
        with pytest.raises(ValueError, match="update"):
            f(X, w, 3, update="exact")
    if method == "mfac":
        with pytest.raises(ValueError, match="steps"):
            f(X, w, 3, steps=0)
    if method == "cbs":
        with pytest.raises(ValueError, match="swap_rounds"):
            f(X, w, 3, swap_rounds=-1)


def test_bad_input_magnitude_and_helpers():
    with pytest.raises(TypeError, match="w_bar"):
        magnitude(torch.arange(5), 2)
    with pytest.raises(ValueError, match="k"):
        magnitude(torch.randn(5), 6)
    with pytest.raises(ValueError, match="w_bar"):
        magnitude(torch.randn(5, 1), 2)
    with pytest.raises(ValueError, match="l2"):
        InverseFisher(torch.randn(3, 4), 0.0)
    with pytest.raises(ValueError, match="block_size"):
        block_fisher_inverse(torch.randn(3, 4), 0.1, 0)


# -- precision ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(ALL))
def test_fp32_gives_the_fp64_support(method):
    """Well conditioned (n ≫ p, l2 = 1): fp32 picks the same support and close weights."""
    X, w_bar = _instance(200, 40, seed=7)
    X = X / 4
    for k in [5, 20]:
        w64, s64 = ALL[method](X, w_bar, k)
        w32, s32 = ALL[method](X.float(), w_bar.float(), k)
        assert torch.equal(s32, s64), (method, k)
        torch.testing.assert_close(w32.double(), w64, rtol=1e-4, atol=1e-5)
