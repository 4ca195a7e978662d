"""Tests of the ALDS-style low-rank decomposition: factorize, EYM errors, min-max rank allocation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chita_minimal.report import Report
from chita_minimal.structure.lowrank import allocate_ranks, compress, factorize, relative_error

F64 = torch.float64


def _conv(seed, cin=6, cout=8, k=3, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, **kw).double()


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_linear_reproduces_output(bias):
    torch.manual_seed(0)
    lin = nn.Linear(13, 7, bias=bias).double()
    f = factorize(lin, 7)
    x = torch.randn(5, 13, dtype=F64)
    assert torch.allclose(f(x), lin(x), atol=1e-5)
    assert f[0].weight.shape == (7, 13) and f[1].weight.shape == (7, 7) and (f[1].bias is not None) == bias
    assert torch.allclose(factorize(lin, 100)(x), lin(x), atol=1e-5)  # rank clipped to min(out, in)


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1), dict(stride=1, padding=2, dilation=2),
                                dict(stride=(1, 2), padding=(0, 1), bias=False)])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_full_rank_conv_reproduces_output(kw, groups):
    conv = _conv(1, **kw)
    full = min(8, 6 // groups * 9)
    f = factorize(conv, full, groups=groups)
    x = torch.randn(2, 6, 11, 10, dtype=F64)
    assert f(x).shape == conv(x).shape and torch.allclose(f(x), conv(x), atol=1e-5)
    assert f[0].groups == groups and f[0].out_channels == groups * full and f[1].kernel_size == (1, 1)


@pytest.mark.parametrize("groups", [1, 2])
def test_measured_error_equals_relative_error(groups):
    conv = _conv(2, cin=8, cout=12, padding=1, bias=False)
    lin = nn.Linear(20, 15, bias=False).double()
    for layer, j in [(conv, groups), (lin, 1)]:
        W = layer.weight.detach()
        for r in [1, 2, 5, 7]:
            f = factorize(layer, r, groups=j)
            if isinstance(layer, nn.Linear):
                Wr = (f[1].weight @ f[0].weight).detach()
            else:  # blockdiag: group g's output channels of the first conv see only its input channels
                A, B = f[0].weight.reshape(j, r, -1), f[1].weight.reshape(12, j, r)
                Wr = torch.cat([B[:, g] @ A[g] for g in range(j)], dim=1).detach()  # (out, C·kh·kw) group-major
                Wr = Wr.view(12, j, -1, 9).reshape(W.shape)
            meas = float(torch.linalg.norm(W - Wr.view_as(W)) / torch.linalg.norm(W))
            assert abs(meas - relative_error(W, r, j)) < 1e-9


def test_relative_error_limits():
    W = torch.randn(6, 10, dtype=F64)
    assert relative_error(W, 6) == 0.0 and relative_error(W, 50) == 0.0
    errs = [relative_error(W, r) for r in range(1, 7)]
    assert all(a >= b for a, b in zip(errs, errs[1:])) and 0 < errs[0] < 1
    s = torch.linalg.svdvals(W)
    assert abs(errs[2] - float((s[3:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())) < 1e-12


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.fc1 = nn.Linear(32 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _layer_params(m, r):
    b = 0 if m.bias is None else m.bias.numel()
    return m.weight.numel() + b if r is None else r * (m.weight[0].numel() + m.weight.shape[0]) + b


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("c", [0.3, 0.5, 0.7])
def test_allocate_meets_budget_and_beats_uniform(seed, c):
    torch.manual_seed(seed)
    net = _Net()
    mods = {n + ".weight": m for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    # structured spectra: make the layers differ in compressibility
    with torch.no_grad():
        for i, m in enumerate(mods.values()):
            W = m.weight.view(m.weight.shape[0], -1)
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            W.copy_(U @ torch.diag(S * torch.exp(-(0.1 + 0.3 * i) * torch.arange(len(S)))) @ Vh)
    ranks = allocate_ranks(net, c)
    dense = sum(_layer_params(m, None) for m in mods.values())
    assert sum(_layer_params(mods[n], r) for n, r in ranks.items()) <= (1 - c) * dense
    err = max(0.0 if r is None else relative_error(mods[n].weight, r) for n, r in ranks.items())
    # uniform: every layer keeps the same fraction (1 − c) of its own parameters
    uni = {n: max(1, int((1 - c) * _layer_params(m, None) - (0 if m.bias is None else m.bias.numel()))
                  // (m.weight[0].numel() + m.weight.shape[0])) for n, m in mods.items()}
    assert sum(_layer_params(mods[n], r) for n, r in uni.items()) <= (1 - c) * dense
    assert err <= max(relative_error(mods[n].weight, r) for n, r in uni.items()) + 1e-12
    rep = compress(net, c)
    new = rep.model
    assert rep.params_after <= (1 - c) * rep.params_before and rep.params_before == dense
    assert abs(rep.max_error - err) < 1e-12
    assert sum(p.numel() for p in new.parameters()) == rep.params_after
    assert sum(p.numel() for p in net.parameters()) == dense  # original unchanged
    x = torch.randn(2, 3, 8, 8)
    assert new(x).shape == (2, 10)


def test_layer_left_dense_when_factorizing_saves_nothing():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(60, 60))
    with torch.no_grad():  # the big layer has rank 3: factorizing it saves most of the budget
        net[2].weight.copy_(torch.randn(60, 3) @ torch.randn(3, 60))
    rep = compress(net, 0.5, names=["0.weight", "2.weight"])
    new = rep.model
    assert rep.layers["0.weight"]["rank"] is None and rep.layers["0.weight"]["error"] == 0
    assert rep.layers["0.weight"]["params_after"] == rep.layers["0.weight"]["params_before"] == 20
    assert rep.layers["2.weight"]["rank"] >= 3 and rep.max_error < 1e-6  # min-max: numerical-noise ranks fit too
    assert isinstance(new[0], nn.Linear) and isinstance(new[2], nn.Sequential)
    x = torch.randn(5, 60)
    assert torch.allclose(new[2](x), net[2](x), atol=1e-4)


def test_compress_with_groups_reports_and_runs():
    torch.manual_seed(0)
    net = _Net()
    rep = compress(net, 0.4, names=["conv2.weight", "fc1.weight"], groups=2)
    new = rep.model
    assert rep.layers["conv2.weight"]["groups"] == 2 and rep.layers["fc1.weight"]["groups"] == 1
    assert rep.params_after <= 0.6 * rep.params_before
    assert isinstance(new.conv2, nn.Sequential) and new.conv2[0].groups == 2
    assert new(torch.randn(1, 3, 8, 8)).shape == (1, 10)


def test_errors():
    net = _Net()
    for c, error in [(0, ValueError), (1, ValueError), (1.5, ValueError), (-0.1, ValueError),
                     (float("nan"), ValueError), (True, TypeError), ("0.5", TypeError)]:
        with pytest.raises(error, match="fraction"):
            allocate_ranks(net, c)
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"'1.weight'.*BatchNorm2d"):
        compress(bn, 0.5, names=["0.weight", "1.weight"])
    dw = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match=r"'0.weight'.*grouped"):
        allocate_ranks(dw, 0.5)
    with pytest.raises(ValueError, match="infeasible"):
        allocate_ranks(nn.Sequential(nn.Linear(4, 4)), 0.9)
    with pytest.raises(ValueError, match="groups"):
        allocate_ranks(net, 0.5, groups=2)  # conv1 has 3 input channels
    with pytest.raises(ValueError, match="groups"):
        factorize(nn.Linear(4, 4), 2, groups=2)
    with pytest.raises(ValueError, match="rank"):
        factorize(nn.Linear(4, 4), 0)


def test_compress_returns_a_report_and_old_compression_name_warns():
    torch.manual_seed(0)
    net = _Net()
    rep = compress(net, 0.4, names=["conv2.weight", "fc1.weight"])
    assert isinstance(rep, Report) and rep.method == "lowrank" and rep.masks == {} and rep.stages == []
    assert rep.target == rep.compression == 0.4
    assert rep.achieved == 1 - rep.params_after / rep.params_before >= 0.4
    assert set(rep.seconds) == {"total"} and isinstance(rep.model, nn.Module) and rep.model is not net
    assert "conv2.weight" in str(rep) and "max relative layer error" in str(rep)
    with pytest.warns(DeprecationWarning, match=r"compress\(compression=\.\.\.\) is now compress\(fraction=\.\.\.\)"):
        old = compress(net, compression=0.4, names=["conv2.weight", "fc1.weight"])
    assert old.layers == rep.layers and old.achieved == rep.achieved
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(old.model(x), rep.model(x))
    with pytest.raises(TypeError, match="both"):
        compress(net, fraction=0.4, compression=0.4)
