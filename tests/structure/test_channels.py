"""Tests of structured pruning: physical channel removal, FLOP counting, filter scores, FLOP-budget
selection and Group-CHITA (against brute force on tiny problems)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import chita_minimal as cm
from chita_minimal.models import MLPNet, resnet20
from chita_minimal.report import Report
from chita_minimal.solver.problem import Problem, ridge_on_support
from chita_minimal.structure.channels import (channel_groups, flops, group_chita, group_chita_prune, group_iht, l1_scores,
                                              param_bytes, select, shrink, taylor2_scores, taylor_scores)

from conftest import image_data, random_problem, randomise_bn

F64 = torch.float64


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


RESNET_DROP = {"layer1.0.conv1": [0, 5, 7], "layer2.1.conv1": [3], "layer3.2.conv1": [1, 2, 60]}


def _keep(model, drop):
    widths = {k: model.get_submodule(gr.producer).weight.shape[0] for k, gr in channel_groups(model).items()}
    keep = {}
    for name, chans in drop.items():
        keep[name] = torch.ones(widths[name], dtype=torch.bool)
        keep[name][chans] = False
    return keep


# -----------------------------------------------------------------------------
# shrink


@pytest.mark.parametrize("zero", ["filter_and_bn", "consumer_columns"])
def test_shrink_resnet_equals_masked_model_and_drops_exact_counts(zero):
    model = randomise_bn(resnet20()).eval()
    with torch.no_grad():
        for name, chans in RESNET_DROP.items():
            gr = channel_groups(model)[name]
            if zero == "filter_and_bn":  # the removed channel's output is exactly zero
                model.get_submodule(gr.producer).weight[chans] = 0
                model.get_submodule(gr.bn).weight[chans] = 0
                model.get_submodule(gr.bn).bias[chans] = 0
            else:  # the channel is computed but nothing reads it (what group_chita_prune produces)
                model.get_submodule(gr.consumer).weight[:, chans] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep = _keep(model, RESNET_DROP)
    small = shrink(model, keep).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5, rtol=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched
    assert small.layer1[0].conv1.weight.shape == (13, 16, 3, 3) and small.layer1[0].bn1.running_var.shape == (13,)
    assert small.layer1[0].conv2.weight.shape == (16, 13, 3, 3) and small.layer3[2].conv2.weight.shape == (64, 61, 3, 3)
    assert isinstance(small.layer3[2].bn1, nn.BatchNorm2d) and small.layer3[2].bn1.num_features == 61
    # per removed channel: conv1 row (in·9) + conv2 column (out·9) + bn1 weight/bias; FLOPs ×(out_h·out_w)
    widths_res = {"layer1.0.conv1": (16, 16, 32), "layer2.1.conv1": (32, 32, 16), "layer3.2.conv1": (64, 64, 8)}
    d_params = sum(len(c) * (widths_res[k][0] * 9 + widths_res[k][1] * 9 + 2) for k, c in RESNET_DROP.items())
    d_flops = sum(len(c) * widths_res[k][2] ** 2 * 9 * (widths_res[k][0] + widths_res[k][1])
                  for k, c in RESNET_DROP.items())
    assert _n_params(model) - _n_params(small) == d_params
    assert flops(model, (3, 32, 32)) - flops(small, (3, 32, 32)) == d_flops
    n_removed = sum(map(len, RESNET_DROP.values()))
    assert param_bytes(model) - param_bytes(small) == 4 * (d_params + 2 * n_removed)  # + running mean/var


def test_shrink_mlpnet_equals_masked_model():
    model = MLPNet()
    drop = {"fc1": [0, 3, 39], "fc2": [4, 5]}
    with torch.no_grad():
        model.fc1.weight[drop["fc1"]] = 0
        model.fc2.weight[drop["fc2"]] = 0
    small = shrink(model, _keep(model, drop))
    x = torch.randn(5, 1, 28, 28)
    assert torch.allclose(small(x), model(x), atol=1e-5, rtol=0)
    assert [tuple(m.weight.shape) for m in (small.fc1, small.fc2, small.fc3)] == [(37, 784), (18, 37), (10, 18)]
    assert _n_params(model) - _n_params(small) == 32360 - (37 * 784 + 18 * 37 + 10 * 18)
    assert flops(small, (1, 28, 28)) == 37 * 784 + 18 * 37 + 10 * 18 and flops(model, (784,)) == 32360


# -----------------------------------------------------------------------------
# cost


def test_flops_and_bytes_equal_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False), nn.Flatten(),
                        nn.Linear(6 * 4 * 4, 5))
    # conv: 8·8 out × 4 out_c × 3 in_c × 9; grouped conv: 4·4 × 6 × (4/2) × 9; linear: 96·5
    assert flops(net, (3, 8, 8)) == 8 * 8 * 4 * 3 * 9 + 4 * 4 * 6 * 2 * 9 + 96 * 5
    n_params = (4 * 3 * 9 + 4) + 8 + 6 * 2 * 9 + (96 * 5 + 5)
    assert param_bytes(net) == 4 * n_params + 4 * 8 + 8  # running mean/var + num_batches_tracked (int64)
    assert net.training  # modes restored


# -----------------------------------------------------------------------------
# scores and selection


def _data(n=24, seed=0, shape=(1, 28, 28)):
    return image_data(n, shape, seed)



def test_scores_equal_direct_computation():
    model = MLPNet()
    data = _data()
    l1 = l1_scores(model)
    assert torch.allclose(l1["fc2"], model.fc2.weight.abs().sum(1))
    t1 = taylor_scores(model, data, 6, seed=3)
    t2 = taylor2_scores(model, data, 6, seed=3)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))[:6]
    ref = {"fc1": torch.zeros(40), "fc2": torch.zeros(20)}
    for i in idx:
        x, y = data[int(i)]
        model.zero_grad()
        nn.functional.cross_entropy(model(x[None]), y[None]).backward()
        for k in ref:
            m = getattr(model, k)
            ref[k] += (m.weight.grad * m.weight.detach()).sum(1) ** 2 / 6
    for k in ref:
        assert torch.allclose(t1[k], ref[k], rtol=1e-4, atol=1e-10)
        assert torch.allclose(t2[k], 0.5 * t1[k])


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.6])
def test_select_meets_flop_budget_without_exceeding_it(fraction):
    model = resnet20()
    keep, achieved = select(model, l1_scores(model), fraction)
    dense = flops(model, (3, 32, 32))
    assert achieved == 1 - flops(shrink(model, keep), (3, 32, 32)) / dense
    assert achieved <= fraction and all(bool(m.any()) for m in keep.values())
    for name, m in keep.items():  # greedy fills the budget: one more removal anywhere overshoots
        if int(m.sum()) > 1:
            more = {**keep, name: m.clone()}
            more[name][torch.nonzero(m)[0]] = False
            assert 1 - flops(shrink(model, more), (3, 32, 32)) / dense > fraction
    assert fraction - achieved < 0.01


def test_select_mlpnet_removes_lowest_scores_first():
    model = MLPNet()
    scores = {"fc1": torch.arange(1.0, 41.0), "fc2": torch.ones(20)}
    keep, achieved = select(model, scores, 0.2)
    assert achieved <= 0.2 and 0.2 - achieved < 800 / 32360
    k1 = int(keep["fc1"].sum())
    assert torch.equal(keep["fc1"], torch.arange(40) >= 40 - k1)  # lowest scores gone first


# -----------------------------------------------------------------------------
# Group-CHITA


def _group_support(S, p=12, size=2):
    return torch.tensor([j // size in S for j in range(p)])


def test_group_iht_matches_brute_force_on_tiny_problems():
    groups = [torch.arange(2 * i, 2 * i + 2) for i in range(6)]
    hits, seeds = 0, range(20)
    for seed in seeds:
        X, w_bar = random_problem(n=40, p=12, seed=seed)
        prob = Problem(X, w_bar, l2=0.05)
        best = min(prob.objective(ridge_on_support(prob, _group_support(S)))
                   for S in itertools.combinations(range(6), 3))
        res = group_iht(prob, groups, 3, swap_candidates=2)
        f = prob.objective(res.w)
        assert abs(f - res.trace[-1]) <= 1e-9 * f
        assert all(b <= a for a, b in zip(res.trace, res.trace[1:]))  # monotone
        # start: ridge on the 3 groups of largest ‖w̄_G‖ (group magnitude + backsolve)
        mag = torch.topk(w_bar.view(6, 2).norm(dim=1), 3).indices.tolist()
        mag_point = torch.where(_group_support(mag), w_bar, torch.zeros_like(w_bar))
        assert res.trace[0] == pytest.approx(prob.objective(ridge_on_support(prob, _group_support(mag))))
        assert f <= res.trace[0] <= prob.objective(mag_point)
        assert int(res.kept.sum()) == 3 and torch.equal(res.support, _group_support(torch.nonzero(res.kept).squeeze(1).tolist()))
        assert torch.equal(res.w[~res.support], torch.zeros(6, dtype=F64))
        assert torch.allclose(res.w, ridge_on_support(prob, res.support))
        hits += f <= best * (1 + 1e-9)
    print(f"group-CHITA brute-force hit rate: {hits}/{len(seeds)}")
    assert hits >= 0.8 * len(seeds)


def test_group_iht_per_class_budgets_and_overlaps():
    X, w_bar = random_problem(n=30, p=20, seed=1)
    prob = Problem(X, w_bar, l2=0.1)
    groups = [torch.arange(2 * i, 2 * i + 2) for i in range(10)]
    classes = [0] * 4 + [1] * 6
    res = group_iht(prob, groups, [1, 4], classes=classes)
    assert int(res.kept[:4].sum()) == 1 and int(res.kept[4:].sum()) == 4
    # overlapping groups: coordinate 1 belongs to groups 0 and 1, survives only if both are kept
    res = group_iht(prob, [torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([3])], 2)
    assert int(res.kept.sum()) == 2 and bool(res.support[1]) == bool(res.kept[0] and res.kept[1])
    assert torch.equal(res.w[~res.support], torch.zeros(int((~res.support).sum()), dtype=F64))
    with pytest.raises(ValueError, match="g must keep"):
        group_iht(prob, groups, 11)


def test_group_chita_prune_mlpnet_removes_whole_groups():
    model, data = MLPNet(), _data(32)
    rep = group_chita(model, data, 0.3, n_grads=16, l2=1e-2)
    small = rep.model
    k1, k2 = int(rep.keep["fc1"].sum()), int(rep.keep["fc2"].sum())
    assert small.fc1.weight.shape == (k1, 784) and small.fc2.weight.shape == (k2, k1) and small.fc3.weight.shape == (10, k2)
    assert k1 < 40 or k2 < 20
    d1, d2 = ~rep.keep["fc1"], ~rep.keep["fc2"]
    assert not model.fc1.weight[d1].any() and not model.fc2.weight[:, d1].any()  # whole groups exactly zero
    assert not model.fc2.weight[d2].any() and not model.fc3.weight[:, d2].any()
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5, rtol=0)
    assert rep.flop_fraction <= 0.3 and rep.flops_pruned == flops(small, (784,))
    assert rep.objective <= rep.objective_start and rep.bytes_pruned < rep.bytes_dense
    assert isinstance(rep, Report) and rep.method == "group-chita" and rep.target == 0.3
    assert rep.achieved == rep.flop_fraction == 1 - rep.flops_pruned / rep.flops_dense
    assert rep.masks == {} and set(rep.seconds) == {"total"} and "fc1" in str(rep) and "objective" in str(rep)


def test_group_chita_prune_is_a_deprecated_alias_and_shrink_returns_its_report():
    """The old entry point warns and writes back as before; cm.shrink(method="group-chita") returns the same
    StructuredReport (objective, bytes) with the same channels, and leaves the model given untouched."""
    data = _data(32)
    old_model, new_model = MLPNet(), MLPNet()
    new_model.load_state_dict(old_model.state_dict())
    before = {k: v.clone() for k, v in new_model.state_dict().items()}
    with pytest.warns(DeprecationWarning, match=r"group_chita_prune\(...\) is deprecated.*method='group-chita'"):
        old = group_chita_prune(old_model, data, 0.3, n_grads=16, l2=1e-2)
    new = cm.shrink(new_model, data, 0.3, "group-chita", n_grads=16, l2=1e-2)
    assert type(new).__name__ == "StructuredReport" and new.objective == old.objective
    assert new.achieved == old.achieved and all(torch.equal(new.keep[k], old.keep[k]) for k in old.keep)
    assert all(torch.equal(v, new_model.state_dict()[k]) for k, v in before.items())


def test_group_chita_prune_resnet_small_equals_written_back_model():
    model, data = randomise_bn(resnet20()), _data(8, shape=(3, 32, 32))
    rep = group_chita(model, data, 0.4, n_grads=4, l2=1e-2, max_iter=5, swap_rounds=1)
    small = rep.model
    model.eval(), small.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # consumer columns of removed channels are zero, so BN biases do not matter
        assert torch.allclose(small(x), model(x), atol=1e-4, rtol=1e-4)
    assert rep.flop_fraction <= 0.4 and rep.flop_fraction > 0.35


# -----------------------------------------------------------------------------
# errors


def test_bad_inputs():
    model = MLPNet()
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            select(model, l1_scores(model), bad)
        with pytest.raises(ValueError, match="fraction"):
            group_chita(model, _data(), bad, n_grads=4)
    for fn in (lambda m: shrink(m, {}), l1_scores, lambda m: group_chita(m, _data(), 0.5, n_grads=4),
               lambda m: select(m, {}, 0.5)):
        with pytest.raises(TypeError, match="Linear"):
            fn(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="fc9"):
        shrink(model, {"fc9": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="fc9"):
        select(model, {**l1_scores(model), "fc9": torch.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="keeps no channel"):
        shrink(model, {"fc1": torch.zeros(40, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        shrink(model, {"fc1": torch.ones(39, dtype=torch.bool)})


def test_taylor_scores_take_a_loader_a_loss_and_dict_outputs():
    class DictMLP(MLPNet):
        def forward(self, x):
            return {"logits": super().forward(x)}

    torch.manual_seed(0)
    model, data = DictMLP(), _data(n=16)
    plain = MLPNet()
    plain.load_state_dict(model.state_dict())
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    ref = taylor_scores(plain, data, 16)
    got = taylor_scores(model, loader, 16)  # the loader's dataset, the "logits" entry, cross-entropy
    assert all(torch.allclose(ref[k], got[k], rtol=1e-5, atol=1e-9) for k in ref)
    smooth = taylor_scores(model, loader, 16, loss_fn=lambda out, y: nn.functional.cross_entropy(
        out, y, label_smoothing=0.2))
    assert not all(torch.allclose(ref[k], smooth[k]) for k in ref)
