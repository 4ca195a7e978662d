"""Tests of structured pruning of the residual streams (``residual=True``): shrink keeps the function,
exact FLOP counts against a hand count, select under a FLOP budget, Taylor scores against a direct
gate-derivative computation, Group-CHITA with streams, and the default behaviour left unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chita_minimal.models import MLPNet, resnet20
from chita_minimal.models.resnet_cifar import ResNetCifar
from chita_minimal.structure.channels import (ChannelGroup, FlopModel, ResidualGroup, channel_groups, flops, group_chita, l1_scores, param_bytes, select, shrink, taylor2_scores, taylor_scores)

from conftest import image_data, randomise_bn

STREAMS = ["layer1.residual", "layer2.residual", "layer3.residual"]
INNER = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]


def _keep(model, drop):
    widths = {k: model.get_submodule(gr.producers[0]).weight.shape[0]
              for k, gr in channel_groups(model, residual=True).items()}
    keep = {}
    for name, chans in drop.items():
        keep[name] = torch.ones(widths[name], dtype=torch.bool)
        keep[name][chans] = False
    return keep


def _data(n=8, seed=0, shape=(3, 16, 16)):
    return image_data(n, shape, seed)



# -----------------------------------------------------------------------------
# groups and defaults


def test_groups_and_default_unchanged():
    model = resnet20()
    default = channel_groups(model)
    assert list(default) == INNER and all(isinstance(g, ChannelGroup) for g in default.values())
    assert default["layer2.1.conv1"] == ChannelGroup("layer2.1.conv1", "layer2.1.bn1", "layer2.1.conv2")
    full = channel_groups(model, residual=True)
    assert list(full) == INNER + STREAMS and all(full[k] == default[k] for k in INNER)
    assert full["layer1.residual"] == ResidualGroup(
        ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"),
        ("bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"),
        ("layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.downsample.0"))
    assert full["layer2.residual"].producers[0] == "layer2.0.downsample.0"
    assert full["layer2.residual"].bns[0] == "layer2.0.downsample.1"
    assert full["layer2.residual"].consumers == ("layer2.1.conv1", "layer2.2.conv1", "layer3.0.conv1",
                                                 "layer3.0.downsample.0")
    assert full["layer3.residual"].consumers == ("layer3.1.conv1", "layer3.2.conv1", "fc")
    inner = default["layer1.0.conv1"]
    assert inner.producers == ("layer1.0.conv1",) and inner.bns == ("layer1.0.bn1",)
    assert inner.consumers == ("layer1.0.conv2",)
    # defaults: no stream anywhere, same keys as before
    assert list(l1_scores(model)) == INNER
    keep, _ = select(model, l1_scores(model), 0.3)
    assert list(keep) == INNER
    # MLPNet has no skip connections: residual=True returns its usual groups
    mlp = MLPNet()
    assert channel_groups(mlp, residual=True) == channel_groups(mlp)
    assert mlp.fc1.weight.shape[0] == 40 and list(l1_scores(mlp, residual=True)) == ["fc1", "fc2"]
    # L1 of a stream channel = sum over its producers' rows
    l1 = l1_scores(model, residual=True)
    ref = sum(model.get_submodule(p).weight.detach().abs().flatten(1).sum(1)
              for p in full["layer2.residual"].producers)
    assert torch.allclose(l1["layer2.residual"], ref) and l1["layer2.residual"].shape == (32,)
    assert all(torch.equal(l1[k], l1_scores(model)[k]) for k in INNER)


# -----------------------------------------------------------------------------
# shrink


DROP = {"layer1.residual": [0, 5, 15], "layer2.residual": [1, 2, 31], "layer3.residual": [7, 8, 9, 63],
        "layer1.1.conv1": [3], "layer3.0.conv1": [0, 60]}


@pytest.mark.parametrize("zero", ["producers_and_bn", "consumer_columns"])
def test_shrink_streams_equals_masked_model(zero):
    model = randomise_bn(resnet20()).eval()
    groups = channel_groups(model, residual=True)
    with torch.no_grad():
        for name, chans in DROP.items():
            gr = groups[name]
            if zero == "producers_and_bn":  # the channel is exactly 0 at every residual addition
                for m in gr.producers:
                    model.get_submodule(m).weight[chans] = 0
                for m in gr.bns:
                    model.get_submodule(m).weight[chans] = 0
                    model.get_submodule(m).bias[chans] = 0
            else:  # the channel is computed (relu(β) ≠ 0) but nothing reads it
                for m in gr.consumers:
                    model.get_submodule(m).weight[:, chans] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = shrink(model, _keep(model, DROP)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(small(x), ref, atol=1e-5, rtol=0)
        assert ref.abs().max() > 1e-2  # a non-trivial function
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched
    assert small.conv1.weight.shape == (13, 3, 3, 3) and small.bn1.num_features == 13

    def shape(name):
        return tuple(small.get_submodule(name).weight.shape)

    assert shape("layer1.1.conv1") == (15, 13, 3, 3) and shape("layer1.1.conv2") == (13, 15, 3, 3)
    assert shape("layer2.0.conv1") == (32, 13, 3, 3) and shape("layer2.0.downsample.0") == (29, 13, 1, 1)
    assert small.layer2[0].downsample[1].running_var.shape == (29,) and shape("layer2.2.conv2") == (29, 32, 3, 3)
    assert shape("layer3.0.conv1") == (62, 29, 3, 3) and shape("layer3.0.downsample.0") == (60, 29, 1, 1)
    assert small.layer3[2].bn2.num_features == 60 and small.fc.weight.shape == (10, 60) and small.fc.bias.shape == (10,)


def test_flops_of_shrunk_tiny_resnet_equal_hand_count():
    model = ResNetCifar(1)
    s1, s2, s3, i1, i2, i3 = 10, 20, 40, 12, 24, 50  # chosen stream and inner widths
    keep = {"layer1.residual": torch.arange(16) < s1, "layer2.residual": torch.arange(32) >= 32 - s2,
            "layer3.residual": torch.arange(64) % 8 < 5, "layer1.0.conv1": torch.arange(16) < i1,
            "layer2.0.conv1": torch.arange(32) < i2, "layer3.0.conv1": torch.arange(64) < i3}
    small = shrink(model, keep)
    hand = (32 * 32 * 9 * 3 * s1  # stem
            + 32 * 32 * 9 * (s1 * i1 + i1 * s1)  # layer1.0 conv1, conv2 (no downsample)
            + 16 * 16 * 9 * (s1 * i2 + i2 * s2) + 16 * 16 * s1 * s2  # layer2.0 conv1, conv2, 1×1 downsample
            + 8 * 8 * 9 * (s2 * i3 + i3 * s3) + 8 * 8 * s2 * s3  # layer3.0
            + s3 * 10)  # fc
    assert flops(small, (3, 32, 32)) == hand
    counts = {k: int(m.sum()) for k, m in keep.items()}
    assert FlopModel(model, (3, 32, 32), residual=True)(counts) == hand  # the cost model select uses
    n_params = (27 * s1 + 2 * s1 + 9 * s1 * i1 + 2 * i1 + 9 * i1 * s1 + 2 * s1  # stem + layer1.0 (+ BN affine)
                + 9 * s1 * i2 + 2 * i2 + 9 * i2 * s2 + 2 * s2 + s1 * s2 + 2 * s2  # layer2.0
                + 9 * s2 * i3 + 2 * i3 + 9 * i3 * s3 + 2 * s3 + s2 * s3 + 2 * s3  # layer3.0
                + 10 * s3 + 10)  # fc
    assert sum(p.numel() for p in small.parameters()) == n_params
    n_bn = s1 + i1 + s1 + i2 + s2 + s2 + i3 + s3 + s3  # BN channels: running mean/var each, + 9 counters
    assert param_bytes(small) == 4 * (n_params + 2 * n_bn) + 8 * 9


# -----------------------------------------------------------------------------
# select


def test_select_with_streams_fills_flop_budget():
    model = resnet20()
    dense = flops(model, (3, 32, 32))
    fraction = 0.4
    keep, achieved = select(model, l1_scores(model, residual=True), fraction, residual=True)
    assert list(keep) == INNER + STREAMS
    assert achieved == 1 - flops(shrink(model, keep), (3, 32, 32)) / dense
    assert achieved <= fraction and fraction - achieved < 0.01
    assert any(not bool(keep[s].all()) for s in STREAMS)  # stream channels are removed
    for name, m in keep.items():  # greedy fills the budget: one more removal anywhere overshoots
        if int(m.sum()) > 1:
            more = {**keep, name: m.clone()}
            more[name][torch.nonzero(m)[0]] = False
            assert 1 - flops(shrink(model, more), (3, 32, 32)) / dense > fraction
    # lowest normalised scores go first: a stream channel scoring far below the rest is removed
    scores = {k: torch.ones(v.numel()) for k, v in keep.items()}
    scores["layer3.residual"][17] = 1e-3
    keep, achieved = select(model, scores, 0.01, residual=True)
    assert not keep["layer3.residual"][17] and int((~keep["layer3.residual"]).sum()) == 1 and achieved <= 0.01


# -----------------------------------------------------------------------------
# scores


def test_taylor_scores_of_streams_equal_gate_derivative():
    """I_c = mean_i (∂L_i/∂m_c)², m_c a gate (=1) scaling channel c at the output of every producer conv
    of the group (for a stream: stem or downsample and every conv2): the direct definition."""
    model = randomise_bn(ResNetCifar(1))
    data, n, seed = _data(), 5, 2
    t1 = taylor_scores(model, data, n, seed=seed, residual=True)
    t2 = taylor2_scores(model, data, n, seed=seed, residual=True)
    groups = channel_groups(model, residual=True)
    assert list(t1) == ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"] + STREAMS
    gates = {k: torch.ones(model.get_submodule(gr.producers[0]).weight.shape[0], requires_grad=True)
             for k, gr in groups.items()}
    hooks = [model.get_submodule(p).register_forward_hook(lambda m, i, out, gk=k: out * gates[gk].view(1, -1, 1, 1))
             for k, gr in groups.items() for p in gr.producers]
    ref = {k: torch.zeros(g.numel()) for k, g in gates.items()}
    model.eval()  # fisher.gradients differentiates in eval mode (running BN statistics)
    try:
        for i in torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]:
            x, y = data[int(i)]
            loss = nn.functional.cross_entropy(model(x[None]), y[None])
            grads = torch.autograd.grad(loss, list(gates.values()))
            for k, g in zip(gates, grads):
                ref[k] += g ** 2 / n
    finally:
        for h in hooks:
            h.remove()
    for k in ref:
        assert torch.allclose(t1[k], ref[k], rtol=1e-4, atol=1e-12), k
        assert torch.allclose(t2[k], 0.5 * t1[k])
    assert all(float(t1[s].max()) > 0 for s in STREAMS)
    default = taylor_scores(model, data, n, seed=seed)  # inner groups unchanged by residual=True
    assert list(default) == list(t1)[:3] and all(torch.equal(default[k], t1[k]) for k in default)


# -----------------------------------------------------------------------------
# Group-CHITA with streams


def test_group_chita_prune_with_streams():
    model, data = randomise_bn(ResNetCifar(1)), _data()
    rep = group_chita(model, data, 0.4, n_grads=4, l2=1e-2, max_iter=3, swap_rounds=1, residual=True,
                             input_shape=(3, 16, 16))
    small = rep.model
    assert set(STREAMS) <= set(rep.keep) and any(not bool(rep.keep[s].all()) for s in STREAMS)
    for name, gr in channel_groups(model, residual=True).items():  # removed channels: whole groups zero
        d = ~rep.keep[name]
        assert all(not model.get_submodule(m).weight[d].any() for m in gr.producers)
        assert all(not model.get_submodule(m).weight[:, d].any() for m in gr.consumers)
    model.eval(), small.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # consumer columns of removed channels are zero, so BN biases do not matter
        assert torch.allclose(small(x), model(x), atol=1e-4, rtol=1e-4)
    assert 0.35 < rep.flop_fraction <= 0.4 and rep.flops_pruned == flops(small, (3, 16, 16))


# -----------------------------------------------------------------------------
# errors


def test_bad_inputs():
    model = resnet20()
    with pytest.raises(TypeError, match="residual"):
        channel_groups(model, residual=1)
    with pytest.raises(TypeError, match="residual"):
        l1_scores(model, residual="yes")
    with pytest.raises(ValueError, match="layer1.residual"):  # streams requested, scores lack them
        select(model, l1_scores(model), 0.3, residual=True)
    with pytest.raises(ValueError, match="layer1.residual"):  # stream scores without residual=True
        select(model, l1_scores(model, residual=True), 0.3)
    with pytest.raises(ValueError, match="keeps no channel"):
        shrink(model, {"layer2.residual": torch.zeros(32, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        shrink(model, {"layer3.residual": torch.ones(32, dtype=torch.bool)})
    with pytest.raises(ValueError, match="layer4.residual"):
        shrink(model, {"layer4.residual": torch.ones(64, dtype=torch.bool)})
    with pytest.raises(ValueError, match="layer1.residual"):  # MLPNet has no streams
        shrink(MLPNet(), {"layer1.residual": torch.ones(16, dtype=torch.bool)})
