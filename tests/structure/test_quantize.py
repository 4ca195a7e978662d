"""Tests of round-to-nearest and OBQ/GPTQ-style quantization (alone and after SparseGPT pruning)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from chita_minimal.methods.layerwise import sparsegpt_layer
from chita_minimal.models.mlpnet import MLPNet
from chita_minimal.solver.problem import num_kept
from chita_minimal.report import Report
from chita_minimal.structure.quantize import obq_layer, quant_grid, quantize, quantize_model, rtn_layer
from conftest import random_layer

F64 = torch.float64


def _layer(seed, rows=12, cols=48, N=300, corr=0.8, spread=0.5, dtype=F64):
    """W (rows, cols) and H = 2/N·XXᵀ of correlated inputs X (cols, N) of different scales."""
    W, _, H = random_layer(seed, rows, cols, N, corr, spread, dtype)
    return W, H


def _err(W, Wq, H):
    d = (W - Wq).to(F64)
    return float(((d @ H.to(F64)) * d).sum()) / 2


def _on_grid(Q, scale, zero, bits, keep=None):
    """Every (kept) value equals scale·(q − zero) for an integer q in [0, 2^bits − 1] of its row."""
    q = torch.round(Q / scale + zero)
    ok = (q >= 0) & (q <= 2**bits - 1) & (scale * (q - zero) == Q)
    return bool(ok.all() if keep is None else ok[keep].all())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_and_obq_on_grid(dtype, bits, symmetric):
    W, H = _layer(0, dtype=dtype)
    W[3] = 0  # an all-zero row
    scale, zero = quant_grid(W, bits, symmetric=symmetric)
    assert scale.shape == zero.shape == (12, 1) and torch.equal(zero, torch.round(zero))
    R = rtn_layer(W, bits, symmetric=symmetric)
    assert torch.equal(R, quantize(W, scale, zero, bits))
    for bs in [1, 7, 128]:
        Q = obq_layer(W, H, bits, block_size=bs, symmetric=symmetric)
        assert Q.dtype == dtype and Q.shape == W.shape and torch.isfinite(Q).all()
        assert _on_grid(Q, scale, zero, bits) and _on_grid(R, scale, zero, bits)
        assert len(torch.unique(Q[5])) <= 2**bits
    assert torch.equal(Q[3], torch.zeros_like(Q[3]))


def test_grid_is_min_max_and_per_tensor():
    W = torch.tensor([[-1.0, 0.6, 2.0], [0.1, 0.2, 0.3]], dtype=F64)
    s, z = quant_grid(W, 2)
    assert torch.allclose(s[:, 0], torch.tensor([1.0, 0.1], dtype=F64)) and z[0, 0] == 1 and z[1, 0] == 0
    R = rtn_layer(W, 2)
    assert torch.allclose(R[0], torch.tensor([-1.0, 1.0, 2.0], dtype=F64))
    s2, z2 = quant_grid(W, 4, per_channel=False)
    assert torch.all(s2 == s2[0]) and torch.all(z2 == z2[0]) and s2.shape == (2, 1)


@pytest.mark.parametrize("seed", range(2))
def test_sixteen_bits_error_vanishes(seed):
    W, H = _layer(seed)
    energy = _err(W, torch.zeros_like(W), H)
    assert _err(W, rtn_layer(W, 16), H) < 1e-8 * energy
    assert _err(W, obq_layer(W, H, 16), H) < 1e-8 * energy


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_obq_beats_rtn_on_correlated_inputs(seed, bits):
    W, H = _layer(seed)
    rtn = _err(W, rtn_layer(W, bits), H)
    for bs in [8, 128]:
        assert _err(W, obq_layer(W, H, bits, block_size=bs), H) < rtn


def test_obq_block_size_invariant_and_float32():
    W, H = _layer(5)
    Q1, Q2 = obq_layer(W, H, 4, block_size=1), obq_layer(W, H, 4, block_size=128)
    assert (Q1 != Q2).float().mean() < 0.01  # same algorithm; only round-off can flip a rounding
    Q32 = obq_layer(W.float(), H.float(), 4)
    assert ((Q32.double() - Q2).abs() > 1e-5).float().mean() < 0.05  # grid points differ by float32 round-off


@pytest.mark.parametrize("s", [0.3, 0.5, 0.8])
def test_sparse_plus_quantized(s):
    W, H = _layer(7, rows=10, cols=40)
    Wp, keep = sparsegpt_layer(W, H, s)
    Q = obq_layer(Wp, H, 4, mask=keep)
    assert int(keep.sum()) == num_kept(s, W.numel())
    assert torch.all(Q[~keep] == 0) and int((Q != 0).sum()) <= int(keep.sum())
    scale, zero = quant_grid(Wp, 4)
    assert _on_grid(Q, scale, zero, 4)
    # the joint OBS step on the fixed mask beats rounding the pruned weights
    R = rtn_layer(Wp, 4)
    assert torch.all(R[~keep] == 0)
    assert _err(W, Q, H) < _err(W, R, H)
    # a mask on the dense weights: off-mask entries are zeroed, never quantized
    Qm = obq_layer(W, H, 4, mask=keep)
    assert torch.all(Qm[~keep] == 0)


def _mnist_like(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    return TensorDataset(x, torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("sparsity", [None, 0.5])
def test_quantize_model_mlp(sparsity):
    data = _mnist_like()
    torch.manual_seed(0)
    ref = MLPNet()
    reports = {}
    for method in ["rtn", "obq"]:
        model = MLPNet()
        model.load_state_dict(ref.state_dict())
        rep = quantize_model(model, data, 4, method=method, n_samples=64, sparsity=sparsity)
        reports[method] = rep
        assert set(rep.layer_error) == {"fc1.weight", "fc2.weight", "fc3.weight"}
        for name, mod in [("fc1.weight", model.fc1), ("fc2.weight", model.fc2), ("fc3.weight", model.fc3)]:
            W = mod.weight.detach()
            if sparsity is None:  # on the grid of the original weights
                assert _on_grid(W, *quant_grid(getattr(ref, name[:3]).weight.detach(), 4), 4)
            assert max(len(torch.unique(row)) for row in W) <= 16
            kept = W.numel() if sparsity is None else num_kept(sparsity, W.numel())
            if sparsity is not None:
                assert int((W == 0).sum()) >= W.numel() - kept
            assert rep.layer_bytes[name] == kept * 0.5 + W.shape[0] * 8 + (W.numel() / 8 if sparsity else 0)
            assert rep.dense_bytes[name] == W.numel() * 4
        assert rep.total_bytes < rep.dense_total_bytes / 4
        assert isinstance(rep, Report) and rep.method == method and rep.target == rep.bits == 4
        assert rep.achieved == 8 * rep.total_bytes / (rep.dense_total_bytes / 4) and (4 if sparsity is None else 2) < rep.achieved < 8
        assert set(rep.masks) == (set() if sparsity is None else set(rep.layer_error)) and "fc1.weight" in str(rep)
        x = data.tensors[0][:8]
        assert torch.isfinite(model(x)).all()
    assert sum(reports["obq"].layer_error.values()) < sum(reports["rtn"].layer_error.values())


def test_conv_layers_quantized_on_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))
    data = TensorDataset(torch.randn(32, 3, 6, 6), torch.zeros(32, dtype=torch.long))
    W0 = model[0].weight.detach().clone().reshape(8, -1)
    rep = quantize_model(model, data, 3, n_samples=32)
    scale, zero = quant_grid(W0, 3)
    assert _on_grid(model[0].weight.detach().reshape(8, -1), scale, zero, 3)
    assert rep.bits == 3 and rep.method == "obq" and rep.layer_error["0.weight"] > 0


def test_bad_arguments():
    W, H = _layer(0)
    for bits, error in [(1, ValueError), (17, ValueError), (0, ValueError), (4.0, TypeError), ("4", TypeError),
                        (True, TypeError)]:
        for f in [lambda: quant_grid(W, bits), lambda: rtn_layer(W, bits), lambda: obq_layer(W, H, bits),
                  lambda: quantize_model(MLPNet(), _mnist_like(8), bits, n_samples=8)]:
            with pytest.raises(error, match="bits"):
                f()
    with pytest.raises(ValueError, match="method"):
        quantize_model(MLPNet(), _mnist_like(8), 4, method="gptq", n_samples=8)
    with pytest.raises(ValueError, match="mask"):
        obq_layer(W, H, 4, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        obq_layer(W, H[:5, :5], 4)
