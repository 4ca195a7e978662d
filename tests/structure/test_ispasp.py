"""Tests of I-SpaSP structured pruning: sparse recovery on planted supports, never worse than its
start, function preserved with every channel kept, exact FLOP budgets with one shared keep ratio,
refit against no refit, small model = masked model, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from chita_minimal.report import Report
from chita_minimal.structure.ispasp import ispasp, ispasp_prune, recover, uniform_counts
from chita_minimal.models import MLPNet, resnet20
from chita_minimal.models.resnet_cifar import ResNetCifar
from chita_minimal.structure.channels import FlopModel, channel_groups, flops

from conftest import image_data, randomise_bn

F64 = torch.float64


def _data(m=24, seed=0, shape=(1, 28, 28)):
    return image_data(m, shape, seed)



def _gram(Z, Y):
    return Z @ Z.T, Z @ Y, float(Y @ Y)


def _ls_residual(Z, Y, S):
    """min_a ‖Y − Z[S]ᵀa‖/‖Y‖ by a direct least-squares solve on the explicit columns."""
    A = Z[S].T  # (m, |S|)
    a = torch.linalg.lstsq(A, Y.unsqueeze(1)).solution.squeeze(1)
    return float((Y - A @ a).norm() / Y.norm())


# -----------------------------------------------------------------------------
# sparse recovery


def test_all_channels_give_zero_residual_and_unit_coefficients():
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(6, 50, generator=g, dtype=F64)
    rec = recover(*_gram(Z, Z.sum(0)), 6)  # Y = Σ_c Z_c, every channel kept
    assert bool(rec.support.all()) and torch.equal(rec.coef, torch.ones(6, dtype=F64))
    assert rec.residuals[-1] < 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_recovers_planted_support(seed):
    g = torch.Generator().manual_seed(seed)
    C, m, s = 30, 200, 5
    Z = torch.randn(C, m, generator=g, dtype=F64)
    planted = torch.randperm(C, generator=g)[:s]
    Z[planted] *= 0.5  # the planted columns have the smallest norms: the top-s-by-norm start misses them all
    a_true = (1 + torch.rand(s, generator=g, dtype=F64)) * torch.sign(torch.randn(s, generator=g, dtype=F64))
    Y = a_true @ Z[planted]
    rec = recover(*_gram(Z, Y), s, iterations=10)
    truth = torch.zeros(C, dtype=torch.bool)
    truth[planted] = True
    assert rec.residuals[0] > 0.5  # the start is far off
    assert torch.equal(rec.support, truth)
    assert torch.allclose(rec.coef[planted], a_true, atol=1e-6)
    assert rec.residuals[-1] < 1e-4 and 1 <= rec.iterations <= 10


def test_chosen_support_never_worse_than_norm_start():
    better = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        C, m, s = 12, 40, 4
        Z = torch.randn(C, m, generator=g, dtype=F64) @ torch.randn(m, m, generator=g, dtype=F64) / m ** 0.5
        Z *= torch.exp(0.5 * torch.randn(C, 1, generator=g, dtype=F64))
        Y = torch.randn(m, generator=g, dtype=F64) + torch.randn(C, generator=g, dtype=F64) @ Z
        rec = recover(*_gram(Z, Y), s)
        start = torch.topk(Z.norm(dim=1), s).indices
        r_start, r_chosen = _ls_residual(Z, Y, start), _ls_residual(Z, Y, rec.support)
        assert rec.residuals[0] == pytest.approx(r_start, rel=1e-5)  # Gram formulas = direct residuals
        assert min(rec.residuals) == pytest.approx(r_chosen, rel=1e-5)
        assert r_chosen <= r_start * (1 + 1e-9) and int(rec.support.sum()) == s
        better += r_chosen < r_start * (1 - 1e-6)
    assert better >= 5  # it does move away from the start on random data


# -----------------------------------------------------------------------------
# budget


def _next_removal_overshoots(model, counts, fraction, shape):
    """One more step of the shared ratio (each group whose count drops next loses a channel) overshoots."""
    widths = {k: model.get_submodule(gr.producer).weight.shape[0] for k, gr in channel_groups(model).items()}
    # k_g = round((1 − r)·C_g) holds for r ≤ 1 − (k_g − ½)/C_g; the least such bound: next change
    bound = {g: 1 - (k - 0.5) / widths[g] for g, k in counts.items() if k > 1}
    lows = [1 - (k + 0.5) / widths[g] for g, k in counts.items()]  # k_g holds for r > this
    assert max(lows) < min(bound.values()) + 1e-12  # one shared ratio r gives all counts
    r_next = min(bound.values())
    more = {g: k - 1 if g in bound and bound[g] <= r_next + 1e-12 else k for g, k in counts.items()}
    cost = FlopModel(model, shape)
    assert 1 - cost(more) / cost.total > fraction


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.7])
def test_budget_shared_ratio_and_measured_flops(fraction):
    model = resnet20()
    counts = uniform_counts(model, fraction)
    _next_removal_overshoots(model, counts, fraction, (3, 32, 32))
    rep = ispasp(model, _data(4, shape=(3, 32, 32)), fraction, n_samples=4, iterations=3, batch_size=4)
    small = rep.model
    dense = flops(model, (3, 32, 32))
    assert isinstance(rep, Report) and rep.method == "ispasp" and rep.target == fraction and rep.masks == {}
    assert rep.achieved == rep.flop_fraction and set(rep.seconds) == {"total"} and "relative residual" in str(rep)
    assert rep.flop_fraction == 1 - flops(small, (3, 32, 32)) / dense and rep.flops_pruned == flops(small, (3, 32, 32))
    assert rep.flop_fraction <= fraction and fraction - rep.flop_fraction < 0.01
    assert {k: int(m.sum()) for k, m in rep.keep.items()} == counts
    assert small.layer3[1].conv1.weight.shape[0] == counts["layer3.1.conv1"] == small.layer3[1].conv2.weight.shape[1]


def test_ispasp_prune_is_a_deprecated_alias_and_shrink_returns_its_report():
    import chita_minimal as cm

    model, data = MLPNet(), _data(16)
    with pytest.warns(DeprecationWarning, match=r"ispasp_prune\(...\) is deprecated.*method='ispasp'"):
        old = ispasp_prune(model, data, 0.4, n_samples=8, iterations=3)
    new = cm.shrink(model, data, 0.4, "ispasp", n_samples=8, iterations=3)
    assert type(new).__name__ == "ISpaSPReport" and new.final_residual == old.final_residual
    assert new.achieved == old.achieved and all(torch.equal(new.keep[k], old.keep[k]) for k in old.keep)


def test_budget_mlpnet():
    model = MLPNet()
    for fraction in (0.1, 0.4, 0.9):
        counts = uniform_counts(model, fraction)
        _next_removal_overshoots(model, counts, fraction, (1, 28, 28))
        k1, k2 = counts["fc1"], counts["fc2"]
        assert 1 - (784 * k1 + k1 * k2 + k2 * 10) / 32360 <= fraction


# -----------------------------------------------------------------------------
# the pruned networks


def test_every_channel_kept_preserves_the_function():
    model, data = randomise_bn(ResNetCifar(1)).eval(), _data(8, shape=(3, 32, 32))
    assert uniform_counts(model, 1e-6) == {k: model.get_submodule(gr.producer).weight.shape[0]
                                           for k, gr in channel_groups(model).items()}
    rep = ispasp(model, data, 1e-6, n_samples=8)
    small = rep.model
    assert rep.flop_fraction == 0 and all(r < 1e-6 for r in rep.final_residual.values())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(small.eval()(x), model(x), atol=1e-5, rtol=0)


def test_refit_lowers_reconstruction_error_and_residuals_match_the_network():
    torch.manual_seed(0)
    model, data, n = MLPNet(), _data(48), 32
    rep_r = ispasp(model, data, 0.5, n_samples=n, refit=True, seed=1, batch_size=8)
    small_r = rep_r.model
    rep_0 = ispasp(model, data, 0.5, n_samples=n, refit=False, seed=1)
    small_0 = rep_0.model
    x = data.tensors[0][torch.randperm(48, generator=torch.Generator().manual_seed(1))[:n]].flatten(1)
    with torch.no_grad():
        h = torch.relu(model.fc1(x))
        Y = model.fc2(h)  # first group: the target is fc2's output on the dense hidden layer
        assert torch.equal(rep_r.keep["fc1"], rep_0.keep["fc1"])  # same h' = h, same selection
        err = {}
        for key, rep in (("refit", rep_r), ("plain", rep_0)):
            err[key] = float((Y - h * rep.scales["fc1"].float() @ model.fc2.weight.T).norm() / Y.norm())
            assert err[key] == pytest.approx(rep.final_residual["fc1"], rel=1e-5)
        assert err["refit"] < err["plain"]
        assert torch.equal(rep_0.scales["fc1"], rep_0.keep["fc1"].to(F64))  # no refit: weights unchanged
        # last group: the consumer is fc3, so its residual is the relative error of the pruned logits
        logits = model(x)
        for small, rep in ((small_r, rep_r), (small_0, rep_0)):
            e = float((small(x) - logits).norm() / logits.norm())
            assert e == pytest.approx(rep.final_residual["fc2"], rel=1e-4)
        assert rep_r.final_residual["fc2"] < rep_0.final_residual["fc2"]


@pytest.mark.parametrize("refit", [False, True])
def test_small_model_equals_masked_model(refit):
    model, data = randomise_bn(ResNetCifar(1)).eval(), _data(8, shape=(3, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = ispasp(model, data, 0.4, n_samples=8, refit=refit, batch_size=3)
    small = rep.model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, gr in channel_groups(model).items():
            drop = ~rep.keep[name]
            assert drop.any()
            if refit:  # consumer input columns scaled by a_c (0 for removed channels)
                masked.get_submodule(gr.consumer).weight.mul_(rep.scales[name].view(1, -1, 1, 1))
            else:  # removed channel's output exactly zero: producer row and BN entries
                masked.get_submodule(gr.producer).weight[drop] = 0
                masked.get_submodule(gr.bn).weight[drop] = 0
                masked.get_submodule(gr.bn).bias[drop] = 0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(small.eval()(x), masked(x), atol=1e-5, rtol=0)
    if refit:
        kept_scales = torch.cat([rep.scales[g][rep.keep[g]] for g in rep.keep])
        assert (kept_scales - 1).abs().max() > 1e-3  # some kept column was really rescaled


# -----------------------------------------------------------------------------
# errors


def test_bad_inputs():
    model, data = MLPNet(), _data(8)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            ispasp(model, data, bad, n_samples=4)
    with pytest.raises(TypeError, match="fraction"):
        ispasp(model, data, "half", n_samples=4)
    with pytest.raises(ValueError, match="n_samples must"):
        ispasp(model, data, 0.5, n_samples=0)
    with pytest.raises(ValueError, match="n_samples = 9"):
        ispasp(model, data, 0.5, n_samples=9)
    with pytest.raises(TypeError, match="Linear"):
        ispasp(nn.Linear(3, 2), data, 0.5, n_samples=4)
    with pytest.raises(TypeError, match="refit"):
        ispasp(model, data, 0.5, n_samples=4, refit="yes")
    with pytest.raises(ValueError, match="iterations"):
        ispasp(model, data, 0.5, n_samples=4, iterations=-1)
    with pytest.raises(ValueError, match="s must"):
        recover(torch.eye(3, dtype=F64), torch.ones(3, dtype=F64), 3.0, 4)
