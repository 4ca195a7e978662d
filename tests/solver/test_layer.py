"""The layer-wise problem in Gram form: backsolve, layer-wise CHITA against brute force and SparseGPT, ALPS's fixed
point, N:M."""

import itertools

import pytest
import torch

from chita_minimal.methods.layerwise import sparsegpt_layer
from chita_minimal.solver.alps import alps
from chita_minimal.solver.layer import backsolve_rows, damp, keep_mask, layer_error, refit_rows, scaled
from chita_minimal.solver.layer_chita import chita_layer


def layer(r=4, d=8, N=40, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g, dtype=dtype) @ (torch.eye(d, dtype=dtype)
                                                        + 0.4 * torch.randn(d, d, generator=g, dtype=dtype))
    W = torch.randn(r, d, generator=g, dtype=dtype)
    return W, X.T @ X / N


def test_backsolve_equals_a_direct_solve_per_row():
    W, H = layer(5, 9)
    Hd = damp(H, 0.01)
    mask = keep_mask(torch.rand(5, 9, generator=torch.Generator().manual_seed(1)), 20)
    Wb = backsolve_rows(W, Hd, mask)
    for r in range(5):
        S = mask[r].nonzero().squeeze(1)
        direct = torch.linalg.solve(Hd[S][:, S], (W[r] @ Hd)[S])
        assert torch.allclose(Wb[r, S], direct, atol=1e-10)
        assert (Wb[r, ~mask[r]] == 0).all()
    Wc = refit_rows(Hd, W, W * mask, mask, max_iter=100, rtol=1e-12)
    assert torch.allclose(Wc, Wb, atol=1e-8)


def brute_force(W, H, k):
    """The optimal objective over every support of k weights of the layer (tiny layers)."""
    r, d = W.shape
    best = float("inf")
    for S in itertools.combinations(range(r * d), k):
        mask = torch.zeros(r * d, dtype=torch.bool)
        mask[list(S)] = True
        best = min(best, layer_error(W, backsolve_rows(W, H, mask.view(r, d)), H))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_chita_layer_reaches_the_brute_force_optimum_on_tiny_layers(seed):
    W, H = layer(2, 5, seed=seed)
    k = 4
    Wc, mask, _ = chita_layer(W, H, k, percdamp=0.0, exact=True)
    assert int(mask.sum()) == k
    best = brute_force(W, H, k)
    assert layer_error(W, Wc, H) <= best * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_chita_layer_reconstructs_no_worse_than_sparsegpt(seed, sparsity):
    W, H = layer(16, 32, N=200, seed=seed)
    k = round((1 - sparsity) * W.numel())
    Wg, _ = sparsegpt_layer(W, H, sparsity)
    Wc, mask, _ = chita_layer(W, H, k, W0=Wg)
    assert int(mask.sum()) == k
    assert layer_error(W, Wc, H) <= layer_error(W, Wg, H) * (1 + 1e-9)
    Wa, _, _ = alps(W, H, k)
    assert layer_error(W, Wc, H) <= layer_error(W, Wa, H) * 1.02


def test_alps_fixed_point_is_the_backsolve_on_its_support():
    W, H = layer(8, 16, N=100, seed=3)
    Wa, mask, info = alps(W, H, 64, cg_iters=200)
    Hs, B0, d = scaled(W, H, 0.01)
    exact = backsolve_rows(B0, Hs, mask) / d
    assert torch.allclose(Wa, exact, atol=1e-6)
    assert info["iterations"] >= 3 and int(mask.sum()) == 64


@pytest.mark.parametrize("solver", ["alps", "chita"])
def test_n_m_patterns_are_exact(solver):
    W, H = layer(6, 16, N=80, seed=2)
    fn = alps if solver == "alps" else chita_layer
    Wp, mask, _ = fn(W, H, pattern="2:4")
    assert (mask.view(6, 4, 4).sum(-1) == 2).all()
    assert ((Wp != 0) & ~mask).sum() == 0


@pytest.mark.parametrize("bad,match", [(dict(k=None), "exactly one"), (dict(k=10**6), "exceeds"),
                                       (dict(k=None, pattern="2:3"), "divisible")])
def test_layer_solver_errors(bad, match):
    W, H = layer(4, 8)
    kw = dict(k=8)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        chita_layer(W, H, kw.pop("k"), **kw)
