"""Tests of SOSP-H structured saliency: against an explicit Fisher matrix, with select/shrink,
the no-p×p cost property, and bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from chita_minimal.network import fisher
from chita_minimal.models import MLPNet
from chita_minimal.structure.sosp import sosp_from_sample, sosp_scores
from chita_minimal.structure.channels import channel_groups, flops, select, shrink

from conftest import TinyMLP, image_data

NAMES = ["fc1.weight", "fc2.weight", "fc3.weight"]


def _data(shape, m=24, seed=0):
    return image_data(m, shape, seed)



def _reference(model, X, rows_of):
    """Direct formula with an explicit (block of the) Fisher F = XᵀX/n, per channel, in float64.
    rows_of(name, c) -> coordinates of channel c of group name in the layout NAMES."""
    X = X.double()
    n = X.shape[0]
    w = torch.cat([model.get_parameter(p).detach().reshape(-1) for p in NAMES]).double()
    g = X.mean(0)
    out = {}
    for name, gr in channel_groups(model).items():
        C = model.get_submodule(gr.producer).weight.shape[0]
        s = []
        for c in range(C):
            ix = rows_of(name, c)
            wm = torch.zeros_like(w)
            wm[ix] = w[ix]  # w ⊙ m_G
            F_rows = X[:, ix].T @ X / n  # explicit rows G of F (|G|×p)
            s.append(abs(float(wm @ g)) + 0.5 * abs(float(w[ix] @ (F_rows @ w))))
        out[name] = torch.tensor(s, dtype=torch.float64)
    return out


def _rows_fn(model):
    sizes = [model.get_parameter(p).numel() for p in NAMES]
    off = [0, sizes[0], sizes[0] + sizes[1]]
    shp = [model.get_parameter(p).shape for p in NAMES]
    pos = [torch.arange(o, o + k).view(s) for o, k, s in zip(off, sizes, shp)]

    def rows_of(name, c):
        i = NAMES.index(f"{name}.weight")
        return torch.cat([pos[i][c].reshape(-1), pos[i + 1][:, c].reshape(-1)])
    return rows_of


def test_tiny_matches_fully_explicit_fisher():
    torch.manual_seed(0)
    model = TinyMLP().double()
    data = _data((1, 4, 4))
    n = 12
    scores = sosp_scores(model, data, n, seed=3)
    X = fisher.gradients_loop(model, data, n, names=NAMES, seed=3, progress=False).X.double()  # independent X
    p = X.shape[1]
    F = X.T @ X / n  # explicit p×p Fisher (p = 176)
    w = torch.cat([model.get_parameter(q).detach().reshape(-1) for q in NAMES])
    rows_of = _rows_fn(model)
    for name, C in (("fc1", 6), ("fc2", 5)):
        assert scores[name].shape == (C,)
        for c in range(C):
            m = torch.zeros(p, dtype=torch.float64)
            m[rows_of(name, c)] = 1
            ref = abs(float((w * m) @ X.mean(0))) + 0.5 * abs(float((w * m) @ F @ w))
            assert scores[name][c].item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    # cross-group terms matter: the block-diagonal (OBD-like) version differs
    ix = rows_of("fc1", 0)
    own = abs(float(w[ix] @ F[ix][:, ix] @ w[ix]))
    assert own != pytest.approx(abs(float(w[ix] @ F[ix] @ w)), rel=1e-6)


def test_mlpnet_matches_explicit_fisher_rows_and_select_shrink():
    torch.manual_seed(1)
    model = MLPNet()
    data = _data((1, 28, 28), m=16)
    n = 8
    scores = sosp_scores(model, data, n, seed=0, batch_size=2)
    X = fisher.gradients(model, data, n, names=NAMES, seed=0, batch_size=2, progress=False).X
    ref = _reference(model, X, _rows_fn(model))
    assert set(scores) == {"fc1", "fc2"} and scores["fc1"].shape == (40,) and scores["fc2"].shape == (20,)
    for k in scores:
        assert torch.allclose(scores[k], ref[k], rtol=1e-4, atol=1e-9)
        assert (scores[k] >= 0).all()
    keep, frac = select(model, scores, 0.3)
    assert 0 < frac <= 0.3
    small = shrink(model, keep)
    assert small.fc1.weight.shape[0] == int(keep["fc1"].sum()) and small.fc2.weight.shape[1] == int(keep["fc1"].sum())
    assert flops(small, (1, 28, 28)) < flops(model, (1, 28, 28))


class _MaxNumel(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


def test_no_pxp_tensor_is_created():
    model = MLPNet()
    data = _data((1, 28, 28), m=8)
    sample = fisher.gradients(model, data, 4, names=NAMES, progress=False)
    mode = _MaxNumel()
    with mode:
        scores = sosp_from_sample(model, sample)
    p = sample.p
    assert mode.max > 0 and mode.max <= sample.n * p < p * p  # nothing larger than X itself
    assert scores["fc1"].shape == (40,)


def test_bad_inputs():
    model = MLPNet()
    data = _data((1, 28, 28), m=8)
    with pytest.raises(TypeError):
        sosp_scores(nn.Linear(3, 3), data, 2)
    with pytest.raises(ValueError):
        sosp_scores(model, data, 0)
    with pytest.raises(ValueError):
        sosp_scores(model, data, 9)  # more rows than samples
    with pytest.raises(TypeError):
        sosp_scores(model, [1, 2], 1.5)
    with pytest.raises(TypeError):
        sosp_from_sample(model, "not a sample")
    partial = fisher.gradients(model, data, 2, names=["fc1.weight", "fc2.weight"], progress=False)
    with pytest.raises(ValueError, match="fc3.weight"):
        sosp_from_sample(model, partial)
