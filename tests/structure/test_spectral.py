"""Tests of Hessian-spectral-radius channel scores: Fisher radii against eigvalsh of explicit X_GᵀX_G/n,
Hessian radii against eigvalsh of the explicit Hessian block, the upper bound on ½ w_Gᵀ H_GG w_G,
the FLOP budget of cm.shrink(method="spectral") and its deprecated alias spectral_prune, and bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import chita_minimal as cm
from chita_minimal.network import fisher
from chita_minimal.models import MLPNet
from chita_minimal.models.resnet_cifar import ResNetCifar
from chita_minimal.network.params import layout
from chita_minimal.report import Report
from chita_minimal.structure.spectral import spectral_prune, spectral_radii, spectral_scores, top_abs_eigenvalue
from chita_minimal.structure.channels import channel_groups, flops, select, shrink, weight_groups

from conftest import TinyMLP, image_data

F64 = torch.float64
NAMES = ["fc1.weight", "fc2.weight", "fc3.weight"]


def _data(shape, m=24, seed=0):
    return image_data(m, shape, seed)



def _blocks(model, H):
    """Per group: list of (H_GG, w_G) for every channel, from an explicit p×p matrix in the layout NAMES."""
    lay = layout(model, NAMES)
    w = torch.cat([model.get_parameter(k).detach().reshape(-1) for k in NAMES]).double()
    idx, owner = weight_groups(model, lay)
    out = {name: [] for name in channel_groups(model)}
    for ix, name in zip(idx, owner):
        out[name].append((H[ix][:, ix], w[ix]))
    return out


def _explicit_hessian(model, data, N, seed):
    """Hessian of the mean cross-entropy on the N samples drawn with seed, w.r.t. the flat weights (p×p)."""
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:N]
    x, y = data.tensors[0][idx].double(), data.tensors[1][idx]
    lay = layout(model, NAMES)
    w0 = torch.cat([model.get_parameter(k).detach().reshape(-1) for k in NAMES]).double()

    def loss(w):
        prm = {k: w[lay.span(k)].view(s) for k, s in zip(lay.names, lay.shapes)}
        return F.cross_entropy(functional_call(model, prm, (x,)), y)

    return torch.autograd.functional.hessian(loss, w0)


def test_fisher_radius_equals_eigvalsh_of_explicit_block():
    torch.manual_seed(0)
    model, data, n = TinyMLP().double(), _data((1, 4, 4)), 12
    rho = spectral_radii(model, data, n, seed=3)
    scores = spectral_scores(model, data, n, seed=3)
    X = fisher.gradients_loop(model, data, n, names=NAMES, seed=3, progress=False).X.double()  # independent X
    blocks = _blocks(model, X.T @ X / n)
    for name, C in (("fc1", 6), ("fc2", 5)):
        assert rho[name].shape == (C,) and rho[name].dtype == F64 and scores[name].device.type == "cpu"
        for c, (H, w) in enumerate(blocks[name]):
            lam = torch.linalg.eigvalsh(H)
            assert rho[name][c].item() == pytest.approx(float(lam.max()), rel=1e-9)
            quad = 0.5 * float(w @ H @ w)
            assert scores[name][c].item() == pytest.approx(0.5 * float(lam.max()) * float(w @ w), rel=1e-9)
            assert quad <= scores[name][c].item() * (1 + 1e-12)  # the score bounds the quadratic term
    assert any(0.5 * float(w @ H @ w) < 0.9 * s for (H, w), s in zip(blocks["fc1"], scores["fc1"]))  # not tight


def test_fisher_radius_conv_channels():
    torch.manual_seed(0)
    model, data, n = ResNetCifar(1).eval(), _data((3, 8, 8), m=6), 5
    rho = spectral_radii(model, data, n, batch_size=1, seed=1)
    names = [f"{gr.producer}.weight" for gr in channel_groups(model).values()]
    names += [f"{gr.consumer}.weight" for gr in channel_groups(model).values()]
    sample = fisher.gradients(model, data, n, names=names, seed=1, progress=False)
    idx, owner = weight_groups(model, sample.layout)
    X = sample.X.double()
    for name in ("layer1.0.conv1", "layer3.0.conv1"):
        ixs = [ix for ix, o in zip(idx, owner) if o == name]
        assert rho[name].shape == (len(ixs),)
        for c in (0, len(ixs) - 1):
            XG = X[:, ixs[c]]
            assert rho[name][c].item() == pytest.approx(float(torch.linalg.eigvalsh(XG.T @ XG / n).max()), rel=1e-6)


def test_hessian_radius_matches_explicit_hessian():
    torch.manual_seed(0)
    model, data, n = TinyMLP().double(), _data((1, 4, 4)), 10
    H = _explicit_hessian(model, data, n, seed=2)
    blocks = _blocks(model, H)
    exact = {k: torch.tensor([float(torch.linalg.eigvalsh(Hg).abs().max()) for Hg, _ in v]) for k, v in blocks.items()}
    # |G| = 16 + 5 = 21 (fc1 channels) and 6 + 10 = 16 (fc2 channels)
    rho = spectral_radii(model, data, n, curvature="hessian", seed=2, iterations=25)
    few = spectral_radii(model, data, n, curvature="hessian", seed=2, iterations=4)
    scores = spectral_scores(model, data, n, curvature="hessian", seed=2, iterations=25)
    for name in ("fc1", "fc2"):
        assert torch.allclose(rho[name], exact[name].double(), rtol=1e-4, atol=0)
        assert (few[name] <= exact[name] * (1 + 1e-9)).all()  # Ritz values never exceed the radius
        for (Hg, w), s in zip(blocks[name], scores[name]):
            assert abs(0.5 * float(w @ Hg @ w)) <= float(s) * (1 + 1e-6)
    assert model.training  # modes restored


def test_top_abs_eigenvalue_indefinite_operator():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=F64))
    lam = torch.linspace(-1, 0.5, 40, dtype=F64)
    lam[0] = -3.0  # the radius comes from a negative eigenvalue
    A = Q @ torch.diag(lam) @ Q.T
    for k, tol in ((20, 1e-8), (40, 1e-10)):  # 40 products span the whole space: exact
        rho = top_abs_eigenvalue(lambda v: A @ v, 40, k, torch.Generator().manual_seed(1))
        assert rho == pytest.approx(3.0, rel=tol)


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_spectral_shrink_meets_budget(fraction):
    torch.manual_seed(0)
    model, data = MLPNet(), _data((1, 28, 28), m=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = cm.shrink(model, data, fraction, "spectral", n_grads=8)
    small, keep, achieved = rep.model, rep.keep, rep.achieved
    assert isinstance(rep, Report) and rep.method == "spectral" and rep.target == fraction and rep.masks == {}
    assert rep.flops_dense == 32360 and rep.flops_pruned == flops(small, (1, 28, 28))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert achieved <= fraction and achieved == 1 - flops(small, (1, 28, 28)) / 32360
    ref_keep, _ = select(model, spectral_scores(model, data, 8), fraction)
    assert all(torch.equal(keep[k], ref_keep[k]) for k in keep)
    assert small.fc1.weight.shape[0] == int(keep["fc1"].sum()) == small.fc2.weight.shape[1]
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(small(x), shrink(model, keep)(x))


def test_bad_args():
    model, data = MLPNet(), _data((1, 28, 28), m=8)
    with pytest.raises(ValueError, match="curvature"):
        spectral_scores(model, data, 4, curvature="trace")
    with pytest.raises(ValueError, match="max_hvps"):
        spectral_scores(model, data, 4, curvature="hessian", max_hvps=1000)  # 60 channels × 20 products
    with pytest.raises(ValueError, match="n_grads must"):
        spectral_scores(model, data, 0)
    with pytest.raises(ValueError, match="iterations"):
        spectral_scores(model, data, 4, curvature="hessian", iterations=0)
    with pytest.raises(ValueError):
        spectral_scores(model, data, 9)  # more rows than samples
    with pytest.raises(ValueError, match="n_grads·batch_size"):
        spectral_scores(TinyMLP(), _data((16,), m=8), 5, curvature="hessian", batch_size=2)
    with pytest.raises(TypeError, match="Linear"):
        spectral_scores(nn.Linear(3, 2), data, 4)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            cm.shrink(model, data, bad, "spectral", n_grads=4)


def test_spectral_prune_is_a_deprecated_alias_of_shrink():
    torch.manual_seed(0)
    model, data = MLPNet(), _data((1, 28, 28), m=16)
    with pytest.warns(DeprecationWarning, match=r"spectral_prune\(...\) is deprecated.*cm.shrink"):
        old = spectral_prune(model, data, 0.3, n_grads=8)
    new = cm.shrink(model, data, 0.3, "spectral", n_grads=8)
    assert old.achieved == new.achieved and all(torch.equal(old.keep[k], new.keep[k]) for k in new.keep)
