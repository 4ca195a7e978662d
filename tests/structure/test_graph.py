"""Tests of the channel groups traced with Torch-Pruning (chita_minimal.structure.graph) and of shrink on them:
the hand-written ResNet20/MLPNet groups reproduced member by member, scores and selection equal to values
recorded from the hand-written code, shrink keeping the function on MobileNetV1, ResNet50, a depthwise-separable
CNN with a concatenation and a flatten → Linear head, ResNet20 streams and MLPNet, index maps, scores on the new
models, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from chita_minimal.models import MLPNet, ResNet50, mobilenet_v1, resnet20
from chita_minimal.models.resnet_cifar import ResNetCifar
from chita_minimal.structure.channels import (FlopModel, channel_groups, flops, l1_scores, select, shrink,
                                              taylor2_scores, taylor_scores)

from conftest import DepthwiseCNN, image_data, randomise_bn

REFERENCE = Path(__file__).with_name("channels_reference.json")


# -----------------------------------------------------------------------------
# models and helpers


def _hand_written(model):
    """The groups the package defined by hand before they were traced: {name: (producers, bns, consumers)},
    inner groups then residual streams (the old ``channel_groups`` / ``_residual_groups``, kept as data)."""
    if isinstance(model, MLPNet):
        return {"fc1": (("fc1",), (), ("fc2",)), "fc2": (("fc2",), (), ("fc3",))}, {}
    stages = ("layer1", "layer2", "layer3")
    inner = {f"{s}.{b}.conv1": ((f"{s}.{b}.conv1",), (f"{s}.{b}.bn1",), (f"{s}.{b}.conv2",))
             for s in stages for b in range(len(getattr(model, s)))}
    streams, name, prod, bns, cons = {}, "layer1.residual", ["conv1"], ["bn1"], []
    for s in stages:
        for b, block in enumerate(getattr(model, s)):
            cons.append(f"{s}.{b}.conv1")
            if block.downsample is not None:  # the shortcut starts a new stream
                cons.append(f"{s}.{b}.downsample.0")
                streams[name] = (tuple(prod), tuple(bns), tuple(cons))
                name, prod, bns, cons = f"{s}.residual", [f"{s}.{b}.downsample.0"], [f"{s}.{b}.downsample.1"], []
            prod.append(f"{s}.{b}.conv2")
            bns.append(f"{s}.{b}.bn2")
    streams[name] = (tuple(prod), tuple(bns), tuple(cons + ["fc"]))
    return inner, streams


def _zero_removed(model, groups, drop, where="producers"):
    """Make the channels ``drop[name]`` contribute nothing: zero their producer rows (and biases) and norm
    weights/biases, or their consumer columns, through the groups' index maps."""
    with torch.no_grad():
        for name, chans in drop.items():
            gr = groups[name]
            for c in chans:
                for m in (gr.producers + gr.bns if where == "producers" else gr.consumers):
                    mod, idx = model.get_submodule(m), gr.indices_of(m, c)
                    if m in gr.consumers:
                        mod.weight[:, idx] = 0
                        continue
                    for t in (mod.weight, mod.bias):
                        if t is not None:
                            t[idx] = 0


def _removed_params(model, groups, drop):
    """Parameters that removing ``drop`` deletes: producer rows (+ bias), norm entries, consumer columns
    (a weight in a removed row and a removed column counted once)."""
    gone = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for name, chans in drop.items():
        gr = groups[name]
        for c in chans:
            for m in gr.producers + gr.bns:
                for t in ("weight", "bias"):
                    if f"{m}.{t}" in gone:
                        gone[f"{m}.{t}"][gr.indices_of(m, c)] = True
            for m in gr.consumers:
                gone[f"{m}.weight"][:, gr.indices_of(m, c)] = True
    return sum(int(g.sum()) for g in gone.values())


def _keep(groups, drop):
    keep = {}
    for name, chans in drop.items():
        keep[name] = torch.ones(groups[name].channels, dtype=torch.bool)
        keep[name][chans] = False
    return keep


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _check_shrink(model, x, drop, residual=False, where="producers", example_inputs=None):
    """shrink after zeroing the removed channels: the same function, exactly the expected parameters gone,
    the input model untouched (weights, modes, requires_grad)."""
    groups = channel_groups(model, example_inputs, residual=residual)
    _zero_removed(model, groups, drop, where)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)
    small = shrink(model, _keep(groups, drop), example_inputs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched
    assert not model.training and not small.training and not next(iter(small.parameters())).requires_grad
    assert all(p.requires_grad for p in list(small.parameters())[1:])
    with torch.no_grad():
        ref, out = model(x), small(x)
    assert ref.abs().max() > 1e-2  # a non-trivial function
    assert (out - ref).abs().max() <= 1e-5
    assert _n_params(model) - _n_params(small) == _removed_params(model, groups, drop)
    return small, groups


def _dyadic_fill(model):
    """Weights k/4096 − 1/2 from a hash of the position: the same on every machine and torch version, and sums
    of them are exact in float32, whatever the summation order."""
    with torch.no_grad():
        for k, (name, p) in enumerate(sorted(model.named_parameters())):
            i = torch.arange(p.numel(), dtype=torch.int64) + 1000 * k
            p.copy_((((i * 2654435761) % 4096).to(torch.float32) / 4096 - 0.5).view_as(p))
    return model


# -----------------------------------------------------------------------------
# the traced groups are the hand-written ones


@pytest.mark.parametrize("make", [resnet20, lambda: ResNetCifar(1), MLPNet], ids=["resnet20", "resnet8", "mlpnet"])
def test_traced_groups_equal_the_hand_written_ones_member_by_member(make):
    model = make()
    inner, streams = _hand_written(model)
    default, full = channel_groups(model), channel_groups(model, residual=True)
    assert list(default) == list(inner) and list(full) == list(inner) + list(streams)  # names and order
    for name, (prod, bns, cons) in {**inner, **streams}.items():
        gr = full[name]
        assert (gr.producers, gr.bns, gr.consumers, gr.others) == (prod, bns, cons, ())  # members, in order
        assert gr.index == {} and gr.residual == (name in streams)  # identity maps only
        assert gr.channels == model.get_submodule(prod[0]).weight.shape[0]
    assert all(default[k] == full[k] for k in inner)


def test_resnet20_stream_literal():
    full = channel_groups(resnet20(), residual=True)
    assert full["layer2.residual"].producers == ("layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2",
                                                 "layer2.2.conv2")
    assert full["layer2.residual"].bns == ("layer2.0.downsample.1", "layer2.0.bn2", "layer2.1.bn2", "layer2.2.bn2")
    assert full["layer2.residual"].consumers == ("layer2.1.conv1", "layer2.2.conv1", "layer3.0.conv1",
                                                 "layer3.0.downsample.0")


@pytest.mark.parametrize("key", ["resnet20", "resnet20_residual", "mlpnet"])
def test_l1_scores_and_select_equal_the_values_of_the_hand_written_groups(key):
    ref = json.loads(REFERENCE.read_text())[key]
    model = _dyadic_fill(MLPNet() if key == "mlpnet" else resnet20())
    residual = key.endswith("residual")
    scores = l1_scores(model, residual=residual)
    assert list(scores) == list(ref["scores"])
    assert all(torch.equal(scores[k], torch.tensor(v, dtype=torch.float32)) for k, v in ref["scores"].items())
    keep, achieved = select(model, scores, 0.5, residual=residual)
    assert {k: torch.nonzero(~m).squeeze(1).tolist() for k, m in keep.items()} == ref["removed"]
    assert achieved == ref["achieved"]


# -----------------------------------------------------------------------------
# groups of other models


def test_depthwise_cnn_groups_and_index_maps():
    model, x = DepthwiseCNN(), torch.zeros(1, 3, 16, 16)
    groups = channel_groups(model, x, residual=True)
    assert list(groups) == ["stem.0", "block1.3", "side", "block2.3", "fuse", "head.0"]  # head.2: the output
    g = groups["stem.0"]
    assert (g.producers, g.bns, g.consumers) == (("stem.0", "block1.0"), ("stem.1", "block1.1"), ("block1.3",))
    g = groups["block1.3"]  # block 2's depthwise conv and the side branch read block 1's channels
    assert (g.producers, g.consumers) == (("block1.3", "block2.0"), ("side", "block2.3")) and g.index == {}
    assert not any(gr.residual for gr in groups.values())
    cat = torch.arange(20)  # fuse reads the concatenation: 16 channels of block 2, then 4 of the side branch
    assert torch.equal(groups["block2.3"].channel_of("fuse"), torch.where(cat < 16, cat, -1))
    assert torch.equal(groups["side"].channel_of("fuse"), torch.where(cat >= 16, cat - 16, -1))
    assert list(groups["block2.3"].index) == ["fuse"] and groups["side"].indices_of("fuse", 1).tolist() == [17]
    cols = torch.arange(64)  # the head reads 16 channels × 2 × 2 positions, channel-major
    assert torch.equal(groups["fuse"].channel_of("head.0"), cols // 4)
    assert groups["fuse"].indices_of("head.0", 2).tolist() == [8, 9, 10, 11]
    assert groups["head.0"].index == {} and groups["head.0"].consumers == ("head.2",)
    # ignored layers keep their output width: their groups are left out
    assert "side" not in channel_groups(model, x, ignored=[model.side])
    assert list(channel_groups(model, x, ignored=["head.0", "stem.0"])) == ["block1.3", "side", "block2.3", "fuse"]


class _CatFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 1), nn.Linear(5 * 16, 3)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).flatten(1))


def test_a_concatenation_torch_pruning_cannot_follow_is_an_error():
    with pytest.raises(ValueError, match="could not tell which channels"):  # not silently wrong groups
        channel_groups(_CatFlatten(), torch.zeros(1, 3, 4, 4))


def test_norm_layers_are_group_members():
    mlp = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))
    g = channel_groups(mlp, torch.zeros(2, 4))
    assert list(g) == ["0"] and (g["0"].producers, g["0"].bns, g["0"].consumers) == (("0",), ("1",), ("3",))
    cnn = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(2, 6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    g = channel_groups(cnn, torch.zeros(1, 3, 8, 8))
    assert g["0"].bns == ("1",)
    small = shrink(cnn, {"0": torch.tensor([True, False, True, True, False, True])}, torch.zeros(1, 3, 8, 8))
    assert small[0].weight.shape[0] == 4 and small[1].weight.shape == (4,) and small[3].weight.shape[1] == 4


def test_mobilenet_and_resnet50_groups():
    mob = channel_groups(mobilenet_v1(10), torch.zeros(1, 3, 32, 32))
    assert len(mob) == 14 and list(mob)[:2] == ["model.0.0", "model.1.3"]  # "fc" gives the output
    g = mob["model.1.3"]  # pointwise conv of block 1 → depthwise conv of block 2 → pointwise conv of block 2
    assert (g.producers, g.bns, g.consumers) == (("model.1.3", "model.2.0"), ("model.1.4", "model.2.1"),
                                                 ("model.2.3",))
    assert mob["model.13.3"].consumers == ("fc",)
    r50 = channel_groups(ResNet50(10), torch.zeros(1, 3, 32, 32), residual=True)
    streams = [k for k, g in r50.items() if g.residual]
    assert streams == ["layer1.residual", "layer2.residual", "layer3.residual", "layer4.residual"]
    assert len(r50) == 1 + 2 * 16 + 4 and r50["conv1"].consumers == ("layer1.0.conv1", "layer1.0.downsample.0")
    assert r50["layer4.residual"].consumers == ("layer4.1.conv1", "layer4.2.conv1", "fc")


# -----------------------------------------------------------------------------
# shrink keeps the function


@pytest.mark.parametrize("where", ["producers", "consumers"])
def test_shrink_depthwise_cnn(where):
    model = randomise_bn(DepthwiseCNN())
    x = torch.randn(3, 3, 16, 16)
    drop = {"stem.0": [1, 5], "block1.3": [0], "block2.3": [3, 7], "side": [2], "fuse": [4], "head.0": [4]}
    small, _ = _check_shrink(model, x, drop, where=where, example_inputs=x[:1])
    # per removed channel: producer rows (+ bias) + BN (2) + depthwise filter (9) + BN (2) + consumer columns,
    # less the 1×1 weights that are in a removed row and a removed column (block1.3 × stem.0: 2, block2.3 ×
    # block1.3: 2, side × block1.3: 1, fuse × (block2.3 + side): 3, head.0 × fuse's 4 columns: 4)
    assert _n_params(model) - _n_params(small) == (2 * (27 + 2 + 9 + 2 + 12) + (8 + 2 + 9 + 2 + 16 + 4)
                                                   + 2 * (12 + 2 + 16) + (12 + 1 + 16) + (20 + 1 + 4 * 16)
                                                   + (64 + 1 + 10) - (2 + 2 + 1 + 3 + 4))
    assert small.block1[0].groups == 6 and small.block2[0].weight.shape == (11, 1, 3, 3)
    assert small.fuse.weight.shape[:2] == (15, 14 + 3) and small.side.bias.shape == (3,)
    assert small.head[0].weight.shape == (15, 15 * 4)
    counts = {k: g.channels - len(drop.get(k, [])) for k, g in channel_groups(model, x[:1]).items()}
    assert FlopModel(model, (3, 16, 16))(counts) == flops(small, (3, 16, 16))  # the cost model is exact


def test_shrink_mobilenet():
    model = randomise_bn(mobilenet_v1(10))
    x = torch.randn(2, 3, 32, 32)
    drop = {name: [0, 2 + k] for k, name in enumerate(channel_groups(model, x[:1]))}
    small, _ = _check_shrink(model, x, drop, example_inputs=x[:1])
    assert small.model[2][0].groups == small.model[2][0].in_channels == 62  # depthwise conv of block 2
    counts = {k: g.channels - 2 for k, g in channel_groups(model, x[:1]).items()}
    assert FlopModel(model, (3, 32, 32))(counts) == flops(small, (3, 32, 32))


def test_shrink_resnet50_with_streams():
    model = randomise_bn(ResNet50(10))
    with torch.no_grad():  # keep activations O(1) through the 16 residual additions
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.num_features >= 256:
                m.weight.mul_(0.2)
    x = torch.randn(2, 3, 32, 32)
    drop = {name: [1, 3 + k % 5] for k, name in enumerate(channel_groups(model, x[:1], residual=True))}
    small, _ = _check_shrink(model, x, drop, residual=True, example_inputs=x[:1])
    assert small.fc.weight.shape == (10, 2046) and small.layer1[0].downsample[0].weight.shape[:2] == (254, 62)


def test_shrink_resnet20_streams_and_mlpnet():
    drop = {"layer1.residual": [0, 5], "layer2.residual": [31], "layer3.residual": [7, 8], "layer2.1.conv1": [3]}
    small, _ = _check_shrink(randomise_bn(resnet20()), torch.randn(2, 3, 32, 32), drop, residual=True)
    assert small.conv1.weight.shape == (14, 3, 3, 3) and small.fc.weight.shape == (10, 62)
    small, _ = _check_shrink(MLPNet(), torch.randn(3, 1, 28, 28), {"fc1": [0, 39], "fc2": [4]})
    assert [tuple(m.weight.shape) for m in (small.fc1, small.fc2, small.fc3)] == [(38, 784), (19, 38), (10, 19)]


def test_a_shrunk_user_model_is_saved_and_rebuilt(tmp_path):
    import chita_minimal as cm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    keep = {"block1.3": torch.arange(12) % 3 != 0}
    small = shrink(DepthwiseCNN().eval(), keep, x[:1])
    path = cm.save_pruned(small, None, tmp_path / "cnn.safetensors", masks={}, keep=keep)
    loaded = cm.load_pruned(DepthwiseCNN, path, attach_masks=False, example_inputs=x[:1])
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), small(x)) and loaded.model.block2[0].groups == 8


# -----------------------------------------------------------------------------
# scores and selection on the new models


def test_scores_and_select_on_mobilenet():
    model, x = randomise_bn(mobilenet_v1(10)), torch.zeros(1, 3, 32, 32)
    groups = channel_groups(model, x)
    l1 = l1_scores(model, example_inputs=x)
    ref = (model.model[1][3].weight.abs().flatten(1).sum(1) + model.model[2][0].weight.abs().flatten(1).sum(1))
    assert torch.allclose(l1["model.1.3"], ref)  # pointwise filter + depthwise filter of each channel
    t = taylor_scores(model, image_data(4, (3, 32, 32)), 2, example_inputs=x)
    assert all(t[k].shape == (g.channels,) and bool((t[k] >= 0).all()) for k, g in groups.items())
    keep, achieved = select(model, l1, 0.3, (3, 32, 32))
    assert 0.25 < achieved <= 0.3 and set(keep) == set(groups)
    assert achieved == 1 - flops(shrink(model, keep, x), (3, 32, 32)) / flops(model, (3, 32, 32))


def test_scores_and_select_on_depthwise_cnn():
    model, x = randomise_bn(DepthwiseCNN()), torch.zeros(1, 3, 16, 16)
    groups = channel_groups(model, x)
    l1 = l1_scores(model, example_inputs=x)
    assert torch.allclose(l1["side"], model.side.weight.abs().flatten(1).sum(1))  # fuse reads it, not writes it
    data = image_data(6, (3, 16, 16))
    t1 = taylor_scores(model, data, 3)  # example input: the data set's first image
    t2 = taylor2_scores(model, data, 3, example_inputs=x)
    assert set(t1) == set(groups) and all(torch.allclose(t2[k], 0.5 * t1[k]) for k in t1)
    assert all(float(t1[k].max()) > 0 for k in t1)
    keep, achieved = select(model, t1, 0.4, example_inputs=x)  # input shape taken from example_inputs
    assert 0.3 < achieved <= 0.4
    assert achieved == 1 - flops(shrink(model, keep, x), (3, 16, 16)) / flops(model, (3, 16, 16))


# -----------------------------------------------------------------------------
# errors


def test_bad_inputs():
    model, x = DepthwiseCNN(), torch.zeros(1, 3, 16, 16)
    for fn in (channel_groups, l1_scores, lambda m: shrink(m, {}), lambda m: select(m, {}, 0.5)):
        with pytest.raises(ValueError, match="example_inputs|input_shape") as err:
            fn(model)
        assert "DepthwiseCNN" in str(err.value)
    with pytest.raises(ValueError, match="example_inputs"):
        channel_groups(model)
    with pytest.raises(ValueError, match=r"unknown channel group.*'block1\.3'"):
        shrink(model, {"block9": torch.ones(3, dtype=torch.bool)}, x)
    with pytest.raises(ValueError, match="shape"):
        shrink(model, {"side": torch.ones(5, dtype=torch.bool)}, x)
    with pytest.raises(ValueError, match="keeps no channel"):
        shrink(model, {"side": torch.zeros(4, dtype=torch.bool)}, x)
    with pytest.raises(ValueError, match="producers"):  # one-producer view of a group with a depthwise conv
        channel_groups(model, x)["stem.0"].producer
    with pytest.raises(ValueError, match="non-identity"):
        channel_groups(model, x)["side"].consumer


def test_attention_inner_width_is_not_a_channel_group_but_heads_and_ffn_shrink_exactly():
    """After split_attention the q/k/v/out width is cut into heads: no channel group for it (heads go whole,
    through structure.heads), while the feed-forward neurons are groups; removing zeroed heads and neurons
    keeps the function."""
    from chita_minimal.structure import channels, heads

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(),
                          nn.Linear(16 * 5, 3))
    model.eval()
    split = heads.split_attention(model)
    x = torch.randn(4, 5, 16)
    groups = channels.channel_groups(split, example_inputs=x)
    assert sorted(groups) == ["0.layers.0.linear1", "0.layers.1.linear1"]
    keep_h = {name: torch.tensor([True, False, True, True]) for name in heads.head_groups(split)}
    keep_c = {name: torch.arange(32) % 3 != 0 for name in groups}
    with torch.no_grad():
        for name in keep_h:  # zero what goes: head 1's out columns, the dropped neurons' linear2 columns
            split.get_submodule(name).out.weight[:, 4:8] = 0
        for name in keep_c:
            split.get_submodule(name.replace("linear1", "linear2")).weight[:, ~keep_c[name]] = 0
        small = channels.shrink(heads.remove_heads(split, keep_h), keep_c, example_inputs=x)
        assert (split(x) - small(x)).abs().max() < 1e-5
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in split.parameters())
