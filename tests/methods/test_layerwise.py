"""Tests of layer-wise OBS pruning (SparseGPT), calibration Hessians and the SPDY-style allocation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from chita_minimal.solver.iht import hard_threshold
from chita_minimal.methods.layerwise import (allocate, calibration_hessians, layer_errors, layerwise_prune, sparsegpt_layer)
from chita_minimal.report import Report
from chita_minimal.solver.problem import num_kept
from conftest import random_layer

F64 = torch.float64


def _layer(seed, rows=16, cols=64, N=400, corr=0.5, spread=0.5, dtype=F64):
    """W (rows, cols), inputs X (cols, N) with correlated features of different scales, H = 2/N·XXᵀ."""
    return random_layer(seed, rows, cols, N, corr, spread, dtype)


def _err(W, Wp, H):
    d = (W - Wp).to(F64)
    return float(((d @ H.to(F64)) * d).sum()) / 2


# -- sparsegpt_layer ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("block_size", [1, 8, 13, 128])
def test_sparsegpt_exact_unstructured_sparsity(dtype, block_size):
    W, _, H = _layer(0, rows=7, cols=37, dtype=dtype)
    for s in [0.1, 0.33, 0.5, 0.9, 0.97]:
        Wp, keep = sparsegpt_layer(W, H, s, block_size=block_size)
        zeros = W.numel() - num_kept(s, W.numel())
        assert Wp.dtype == dtype and Wp.shape == W.shape and keep.dtype == torch.bool
        assert int((~keep).sum()) == zeros and int((Wp == 0).sum()) == zeros
        assert torch.all(Wp[~keep] == 0) and torch.isfinite(Wp).all()


@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8), "2:4"])
def test_sparsegpt_exact_n_m(pattern):
    n, m = (2, 4) if pattern == "2:4" else pattern  # one N:M type: "2:4" and (2, 4) alike
    W, _, H = _layer(1, rows=9, cols=48)
    for bs in [5, 16, 128]:  # 5 is rounded down to a multiple of m
        Wp, keep = sparsegpt_layer(W, H, pattern=pattern, block_size=bs)
        assert torch.all(keep.view(9, -1, m).sum(2) == n)
        assert torch.all((Wp != 0).view(9, -1, m).sum(2) == n)
        assert torch.all(Wp[~keep] == 0)
    with pytest.raises(ValueError, match="divisible"):
        sparsegpt_layer(W[:, :46], H[:46, :46], pattern=(2, 4))
    with pytest.raises(ValueError, match="N < M"):  # N = M keeps everything: not a pattern (as in prune's "N:M")
        sparsegpt_layer(W, H, pattern=(3, 3))


def test_sparsegpt_sparsity_zero_returns_w_unchanged():
    W, _, H = _layer(2, dtype=torch.float32)
    Wp, keep = sparsegpt_layer(W, H, 0.0)
    assert torch.equal(Wp, W) and keep.all()
    Wp, keep = sparsegpt_layer(W, H, mask=torch.ones_like(W, dtype=torch.bool))
    assert torch.equal(Wp, W)


@pytest.mark.parametrize("seed", range(5))
def test_sparsegpt_beats_magnitude_on_correlated_inputs(seed):
    W, _, H = _layer(seed)
    for s in [0.3, 0.5, 0.8]:
        k = W.numel() - round(s * W.numel())
        mag = torch.where(hard_threshold(W.flatten(), k).view_as(W), W, torch.zeros_like(W))
        for bs in [8, 128]:
            Wp, _ = sparsegpt_layer(W, H, s, block_size=bs)
            assert _err(W, Wp, H) < _err(W, mag, H)
    top = W.abs().view(16, -1, 4).topk(2, dim=2).indices
    keep = torch.zeros(16, 16, 4, dtype=torch.bool).scatter_(2, top, True).view_as(W)
    assert _err(W, sparsegpt_layer(W, H, pattern=(2, 4))[0], H) < _err(W, torch.where(keep, W, 0 * W), H)


def _sequential_obs(w, H, keep):
    """Reference: for each pruned column j in order, the exact OBS removal with columns ≥ j free (dense solves)."""
    w = w.clone()
    for j in range(len(w)):
        if not keep[j]:
            Hinv = torch.linalg.inv(H[j:, j:])
            w[j:] -= w[j] / Hinv[0, 0] * Hinv[:, 0]
            w[j] = 0.0
    return w


@pytest.mark.parametrize("block_size", [1, 2, 4, 6])
def test_sparsegpt_fixed_mask_obs_update_equals_direct_solve(block_size):
    _, X, H = _layer(3, rows=1, cols=6, N=50)
    w = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(9))
    # pruned columns first: the sequential OBS updates give the least-squares optimum on the mask
    for keep in [torch.tensor([False, False, False, True, True, True]), torch.tensor([False] + [True] * 5)]:
        Wp, mask = sparsegpt_layer(w[None], H, mask=keep[None], block_size=block_size, percdamp=0.0)
        assert torch.equal(mask[0], keep)
        K = torch.nonzero(keep).squeeze(1)
        expected = torch.zeros_like(w)
        expected[K] = torch.linalg.lstsq(X[K].T, (w @ X)[:, None]).solution.squeeze(1)  # min_v ‖w X − v X_K‖
        torch.testing.assert_close(Wp[0], expected, rtol=0, atol=1e-10)
    # any mask: equals one explicit OBS solve per pruned column, and never beats the optimum
    for keep in [torch.tensor([True, False, True, False, False, True]), torch.tensor([False, True] * 3)]:
        Wp, _ = sparsegpt_layer(w[None], H, mask=keep[None], block_size=block_size, percdamp=0.0)
        torch.testing.assert_close(Wp[0], _sequential_obs(w, H, keep), rtol=0, atol=1e-10)
        K = torch.nonzero(keep).squeeze(1)
        opt = torch.zeros_like(w)
        opt[K] = torch.linalg.lstsq(X[K].T, (w @ X)[:, None]).solution.squeeze(1)
        assert _err(w[None], Wp, H) >= _err(w[None], opt[None], H) - 1e-12


def test_sparsegpt_dead_inputs_and_bad_arguments():
    W, _, H = _layer(4, rows=4, cols=10)
    H[3, :] = 0
    H[:, 3] = 0  # input 3 is always zero
    Wp, keep = sparsegpt_layer(W, H, 0.5)
    assert torch.isfinite(Wp).all() and torch.all(Wp[:, 3] == 0)
    assert int((~keep).sum()) == 20 and not keep[:, 3].any()  # saliency 0: pruned first
    with pytest.raises(ValueError, match="exactly one"):
        sparsegpt_layer(W, H, 0.5, pattern=(2, 4))
    with pytest.raises(ValueError, match="shape"):
        sparsegpt_layer(W, H[:5, :5], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sparsegpt_layer(W, H, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt_layer(W * float("nan"), H, 0.5)
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_layer(W, -H - torch.eye(10, dtype=F64), 0.5)


# -- calibration_hessians ----------------------------------------------------------------------
def _data(n, shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))


def test_hessians_linear_equal_direct():
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    ds = _data(20, (5,))
    Hs = calibration_hessians(net, ds, 20, batch_size=7)
    x = ds.tensors[0]
    h = torch.relu(net[0](x)).detach()
    torch.testing.assert_close(Hs["0.weight"], 2 / 20 * x.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Hs["2.weight"], 2 / 20 * h.T @ h, rtol=1e-12, atol=1e-12)
    assert set(Hs) == {"0.weight", "2.weight"}
    # a subset: seeded, reproducible, and of n_samples samples
    a = calibration_hessians(net, ds, 8, seed=3)["0.weight"]
    torch.testing.assert_close(a, calibration_hessians(net, ds, 8, seed=3, batch_size=3)["0.weight"])
    assert not torch.allclose(a, calibration_hessians(net, ds, 8, seed=4)["0.weight"])


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("conv", [
    dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1),
    dict(in_channels=2, out_channels=3, kernel_size=(2, 3), dilation=(2, 1), padding=(1, 0)),
    dict(in_channels=2, out_channels=3, kernel_size=(2, 3), padding="same"),
])
def test_hessians_conv_equal_unfold_and_reproduce_conv_error(conv):
    net = nn.Sequential(nn.Conv2d(**conv, bias=False), nn.ReLU(), nn.Conv2d(3, 2, 1)).double()
    ds = _data(6, (2, 7, 8))
    H = calibration_hessians(net, ds, 6, batch_size=4, names=["0.weight"])["0.weight"]
    x = ds.tensors[0]
    if conv.get("padding") != "same":
        p = F.unfold(x, conv["kernel_size"], dilation=conv.get("dilation", 1), padding=conv["padding"],
                     stride=conv.get("stride", 1))  # (B, C·kh·kw, L)
        N = p.shape[0] * p.shape[2]
        torch.testing.assert_close(H, 2 / N * torch.einsum("bil,bjl->ij", p, p), rtol=1e-12, atol=1e-12)
    # rows of W.reshape(out, -1) against H: tr(ΔW H ΔWᵀ)/2 = mean over outputs of ‖conv_ΔW(x)‖²
    dW = torch.randn_like(net[0].weight)
    out = F.conv2d(x, dW, stride=net[0].stride, padding=conv["padding"], dilation=net[0].dilation)  # (B, o, h, w)
    N = out.shape[0] * out.shape[2] * out.shape[3]
    torch.testing.assert_close(_err(dW.reshape(3, -1), 0 * dW.reshape(3, -1), H), float(out.pow(2).sum()) / N,
                               rtol=1e-10, atol=0)


def test_hessians_errors():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    ds = _data(4, (4, 3, 3), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"'0.weight'.*groups=2"):
        calibration_hessians(net, ds, 4)
    assert set(calibration_hessians(net, ds, 4, names=["2.weight"])) == {"2.weight"}
    with pytest.raises(ValueError, match="not the weight"):
        calibration_hessians(net, ds, 4, names=["2.bias"])
    with pytest.raises(ValueError, match="exceeds"):
        calibration_hessians(net, ds, 5, names=["2.weight"])


# -- layerwise_prune ---------------------------------------------------------------------------
def _mlp(d_in=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, 8), nn.ReLU(), nn.Linear(8, 4))


def test_layerwise_prune_exact_sparsity_and_only_weights_change():
    ds = _data(64, (16,), dtype=torch.float32)
    for s in [0.3, 0.5]:
        net = _mlp()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        rep = layerwise_prune(net, ds, s, n_samples=48, batch_size=16)
        for name, numel in [("0.weight", 128), ("2.weight", 32)]:
            W = net.state_dict()[name]
            assert int((W == 0).sum()) == numel - num_kept(s, numel)
            assert rep.layer_sparsity[name] == (numel - num_kept(s, numel)) / numel
            assert torch.equal(rep.masks[name], W != 0)
            assert not torch.equal(W[W != 0], before[name][W != 0])  # OBS updates moved kept weights
        for name in ["0.bias", "2.bias"]:
            assert torch.equal(net.state_dict()[name], before[name])
        assert rep.achieved_sparsity == pytest.approx(sum((m.numel() - int(m.sum())) for m in rep.masks.values()) / 160)
        assert {"hessians", "total", "0.weight", "2.weight"} <= set(rep.seconds)


def test_layerwise_prune_modes_patterns_and_allocation():
    ds = _data(64, (16,), dtype=torch.float32)
    a, b = _mlp(), _mlp()
    layerwise_prune(a, ds, 0.5, n_samples=32)
    rep = layerwise_prune(b, ds, 0.5, n_samples=32, sequential=True)
    assert rep.sequential
    assert torch.equal(a[0].weight, b[0].weight)  # the first layer sees the same inputs
    assert int((b[2].weight == 0).sum()) == 16 and not torch.equal(a[2].weight, b[2].weight)
    net = _mlp()
    layerwise_prune(net, ds, None, pattern=(2, 4), n_samples=32)
    for W in (net[0].weight, net[2].weight):
        assert torch.all((W != 0).view(W.shape[0], -1, 4).sum(2) == 2)
    net = _mlp()
    rep = layerwise_prune(net, ds, None, allocation={"0.weight": 0.25, "2.weight": 0.75}, n_samples=32)
    assert rep.layer_sparsity == {"0.weight": 0.25, "2.weight": 0.75}


def test_layerwise_prune_errors_leave_model_untouched():
    ds = _data(32, (6,), dtype=torch.float32)
    net = _mlp(6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"'0.weight'.*exclude it via names"):
        layerwise_prune(net, ds, None, pattern=(2, 4), n_samples=16)
    with pytest.raises(ValueError, match="allocation"):
        layerwise_prune(net, ds, None, allocation={"0.weight": 0.5}, n_samples=16)
    with pytest.raises(ValueError, match="contradicts"):
        layerwise_prune(net, ds, 0.3, pattern=(2, 4), names=["2.weight"], n_samples=16)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    layerwise_prune(net, ds, None, pattern=(2, 4), names=["2.weight"], n_samples=16)
    assert torch.equal(net[0].weight, before["0.weight"])
    assert torch.all((net[2].weight != 0).view(4, -1, 4).sum(2) == 2)



def test_layerwise_report_is_a_report_and_old_blocksize_name_warns():
    ds = _data(64, (16,), dtype=torch.float32)
    a, b = _mlp(), _mlp()
    rep = layerwise_prune(a, ds, 0.5, n_samples=32, block_size=4)
    with pytest.warns(DeprecationWarning, match=r"layerwise_prune\(blocksize=\.\.\.\) is now layerwise_prune\(block_size=\.\.\.\)"):
        old = layerwise_prune(b, ds, 0.5, n_samples=32, blocksize=4)
    assert torch.equal(a[0].weight, b[0].weight) and torch.equal(a[2].weight, b[2].weight)
    assert old.achieved == rep.achieved
    assert isinstance(rep, Report) and rep.method == "sparsegpt"
    assert rep.target == rep.sparsity == 0.5 and rep.achieved == rep.achieved_sparsity
    assert rep.stages == [] and set(rep.masks) == {"0.weight", "2.weight"}
    assert "sparsegpt" in str(rep) and "calibration samples" in str(rep)
    with pytest.raises(TypeError, match="both"):
        layerwise_prune(_mlp(), ds, 0.5, n_samples=32, blocksize=4, block_size=4)

# -- layer_errors ------------------------------------------------------------------------------
def test_layer_errors_equal_direct_reconstruction_error():
    ds = _data(40, (16,))
    net = _mlp().double()
    grid = [0.0, 0.5, 0.9]
    errs = layer_errors(net, ds, grid, n_samples=40)
    raw = layer_errors(net, ds, grid, n_samples=40, relative=False)
    x = ds.tensors[0]
    for name, inp in [("0.weight", x), ("2.weight", torch.relu(net[0](x)).detach())]:
        W = net.get_parameter(name).detach()
        H = 2 / 40 * inp.T @ inp
        Wp, _ = sparsegpt_layer(W, H, 0.5)
        direct = ((W - Wp) @ inp.T).pow(2).sum() / 40
        assert raw[name][0] == 0.0 and errs[name][0] == 0.0
        assert raw[name][1] == pytest.approx(float(direct), rel=1e-9)
        assert errs[name][1] == pytest.approx(float(direct / (W @ inp.T).pow(2).sum() * 40), rel=1e-9)
        assert errs[name][1] < errs[name][2]
    assert torch.equal(net[0].weight, _mlp().double()[0].weight)  # the model is not changed


# -- allocate ----------------------------------------------------------------------------------
def _brute(errors, sizes, grid, target, slack=0.0):
    names = list(errors)
    budget = (1 - target) * sum(sizes.values()) - slack
    best = None
    for combo in itertools.product(range(len(grid)), repeat=len(names)):
        kept = sum((1 - grid[s]) * sizes[nm] for s, nm in zip(combo, names))
        if kept <= budget + 1e-9:
            e = sum(errors[nm][s] for s, nm in zip(combo, names))
            best = e if best is None else min(best, e)
    return best


def _total(errors, choice, grid):
    return sum(errors[nm][grid.index(s)] for nm, s in choice.items())


@pytest.mark.parametrize("seed", range(6))
def test_allocate_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    grid = [0.0, 0.25, 0.5, 0.75]
    sizes = {"a": 100, "b": 200, "c": 300}
    errors = {nm: (torch.rand(4, generator=g, dtype=F64).sort().values * (j + 1)).tolist()  # grow with sparsity
              for j, nm in enumerate(sizes)}
    for target in [0.0, 0.2, 0.5, 0.6, 0.75]:
        slack = (1 - target) * 600 - 150
        res = slack if slack > 0 else 1
        choice = allocate(errors, sizes, grid, target, resolution=int(round(res)))  # unit 1: no rounding loss
        kept = sum((1 - choice[nm]) * sizes[nm] for nm in sizes)
        assert kept <= (1 - target) * 600 + 1e-9
        assert _total(errors, choice, grid) == pytest.approx(_brute(errors, sizes, grid, target), abs=1e-12)
    # real-valued sizes, default resolution: always within budget, and at least as good as any choice
    # that leaves L·unit of slack
    sizes = {"a": 137, "b": 911, "c": 58}
    grid = [0.1, 0.3, 0.55, 0.8]
    for target in [0.2, 0.42, 0.6, 0.79]:
        choice = allocate(errors, sizes, grid, target)
        kept = sum((1 - choice[nm]) * sizes[nm] for nm in sizes)
        assert kept <= (1 - target) * sum(sizes.values()) + 1e-9
        unit = ((1 - target) * 1106 - sum(0.2 * s for s in sizes.values())) / 10_000
        assert _total(errors, choice, grid) <= _brute(errors, sizes, grid, target, slack=3 * unit) + 1e-12


def test_allocate_edges_and_errors():
    grid = [0.0, 0.5, 0.9]
    errors = {"a": [0.0, 1.0, 5.0], "b": [0.0, 2.0, 3.0]}
    sizes = {"a": 10, "b": 10}
    assert allocate(errors, sizes, grid, 0.0) == {"a": 0.0, "b": 0.0}
    assert allocate(errors, sizes, grid, 0.9) == {"a": 0.9, "b": 0.9}  # the largest level, exactly feasible
    assert allocate(errors, sizes, grid, 0.7) == {"a": 0.5, "b": 0.9}
    with pytest.raises(ValueError, match="infeasible"):
        allocate(errors, sizes, grid, 0.95)
    with pytest.raises(ValueError, match="entries"):
        allocate({"a": [0.0, 1.0], "b": [0.0, 2.0, 3.0]}, sizes, grid, 0.5)
    with pytest.raises(ValueError, match="keys"):
        allocate(errors, {"a": 10}, grid, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        allocate({"a": [0.0, float("nan"), 1.0], "b": [0.0, 2.0, 3.0]}, sizes, grid, 0.5)
