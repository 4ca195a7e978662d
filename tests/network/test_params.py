"""Tests of chita_minimal.network.params: prunable set, flat vector round trips, masks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chita_minimal.network.params import (Layout, MaskKeeper, apply_masks, flatten, layout, masks_from, per_layer_sparsity, prunable_names, resolve, split, write_back)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.c1 = nn.Conv1d(4, 3, 2)
        self.c2 = nn.Conv2d(3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.c3 = nn.Conv3d(2, 2, 1)
        self.fc = nn.Linear(6, 3)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_prunable_names_default_set():
    assert prunable_names(Net()) == ["c1.weight", "c2.weight", "c3.weight", "fc.weight"]
    assert resolve(Net()) == prunable_names(Net())


def test_prunable_names_tied_weight_once():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    m[1].weight = m[0].weight
    assert prunable_names(m) == ["0.weight"]


def test_resolve_user_names():
    net = Net()
    assert resolve(net, ["fc.weight", "bn.weight", "c1.bias"]) == ["fc.weight", "bn.weight", "c1.bias"]
    with pytest.raises(ValueError, match=r"unknown.*'fc\.w'.*'c1\.weight', 'c2\.weight'"):
        resolve(net, ["fc.w"])
    with pytest.raises(ValueError, match=r"duplicate.*fc\.weight"):
        resolve(net, ["fc.weight", "c1.weight", "fc.weight"])
    with pytest.raises(ValueError, match="empty"):
        resolve(net, [])
    with pytest.raises(TypeError, match="names"):
        resolve(net, "fc.weight")
    with pytest.raises(TypeError, match="model"):
        resolve("net")
    with pytest.raises(ValueError, match="no prunable"):
        resolve(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()))


def test_layout_fields():
    lay = layout(Net())
    assert lay.names == ("c1.weight", "c2.weight", "c3.weight", "fc.weight")
    assert lay.numels == (24, 6, 4, 18) and lay.offsets == (0, 24, 30, 34) and lay.p == 52
    assert lay.shapes[1] == (2, 3, 1, 1) and len(lay) == 4
    assert lay.span("c3.weight") == slice(30, 34)


def test_flatten_write_back_round_trip():
    m = mlp()
    lay = layout(m)
    w = flatten(m, lay)
    assert w.shape == (lay.p,) == (8 * 16 + 16 * 4,) and not w.requires_grad
    torch.testing.assert_close(w[:128], m[0].weight.reshape(-1), atol=0, rtol=0)
    w[0] = 123.0  # a copy: the model is unchanged
    assert m[0].weight[0, 0] != 123.0
    w2 = torch.randn(lay.p)
    p0, b0 = m[0].weight, m[0].bias.clone()
    write_back(m, lay, w2)
    assert m[0].weight is p0 and torch.equal(m[0].bias, b0)  # in place, biases untouched
    torch.testing.assert_close(flatten(m, lay), w2, atol=0, rtol=0)
    with pytest.raises(ValueError, match=rf"\({lay.p},\)"):
        write_back(m, lay, torch.zeros(lay.p + 1))
    with pytest.raises(ValueError, match="shape"):
        write_back(m, lay, torch.zeros(2, lay.p))
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        write_back(m, lay, [0.0] * lay.p)
    with pytest.raises(TypeError, match="Layout"):
        flatten(m, ["0.weight"])
    with pytest.raises(ValueError, match="not a parameter"):
        flatten(nn.Linear(8, 16), lay)


def test_split_and_sparsity():
    m = mlp()
    lay = layout(m)
    w = torch.arange(1.0, lay.p + 1)
    parts = split(lay, w)
    assert list(parts) == ["0.weight", "2.weight"]
    assert parts["0.weight"].shape == (16, 8) and parts["2.weight"].shape == (4, 16)
    assert parts["2.weight"][0, 0] == 129.0
    w[:32] = 0  # 32 of 128 in the first layer
    w[128:192] = 0  # all of the second
    assert per_layer_sparsity(lay, w) == {"0.weight": 0.25, "2.weight": 1.0}
    with pytest.raises(ValueError, match="shape"):
        split(lay, w[:-1])


def test_masks_and_apply_masks():
    m = mlp()
    lay = layout(m)
    support = torch.rand(lay.p, generator=torch.Generator().manual_seed(0)) > 0.5
    masks = masks_from(lay, support)
    assert masks["0.weight"].shape == (16, 8) and masks["0.weight"].dtype == torch.bool
    apply_masks(m, masks)
    w = flatten(m, lay)
    assert torch.all(w[~support] == 0) and torch.all(w[support] != 0)
    with pytest.raises(TypeError, match="bool"):
        masks_from(lay, support.float())
    with pytest.raises(ValueError, match="unknown"):
        apply_masks(m, {"9.weight": masks["0.weight"]})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(m, {"0.weight": masks["2.weight"]})


def _train(m, opt, steps, keeper=None, apply=True):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        if keeper is not None and apply:
            keeper.apply()


def _pruned_mlp_with_warm_optimizer():
    """MLP trained a few steps (momentum buffers full), then half its weights pruned."""
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    _train(m, opt, 3)
    lay = layout(m)
    w = flatten(m, lay)
    support = w.abs() >= w.abs().median()
    return m, opt, lay, masks_from(lay, support), support


def test_mask_keeper_keeps_zeros():
    m, opt, lay, masks, support = _pruned_mlp_with_warm_optimizer()
    with MaskKeeper(m, masks) as keeper:
        assert torch.all(flatten(m, lay)[~support] == 0)  # applied on creation
        _train(m, opt, 5, keeper)
        w = flatten(m, lay)
        assert torch.all(w[~support] == 0) and torch.all(w[support] != 0)
        grads = torch.cat([m[0].weight.grad.reshape(-1), m[2].weight.grad.reshape(-1)])
        assert torch.all(grads[~support] == 0)  # hooks zero the masked gradients
    m.zero_grad()
    F.cross_entropy(m(torch.randn(16, 8)), torch.randint(0, 4, (16,))).backward()
    assert m[0].weight.grad[~masks["0.weight"]].abs().sum() > 0  # hooks removed on exit


def test_without_apply_zeros_drift():
    # hooks alone: momentum from before pruning still moves the zeros
    m, opt, lay, masks, support = _pruned_mlp_with_warm_optimizer()
    keeper = MaskKeeper(m, masks)
    _train(m, opt, 5, keeper, apply=False)
    keeper.remove()
    assert flatten(m, lay)[~support].abs().sum() > 0
    # no keeper at all: gradients move them too
    m, opt, lay, masks, support = _pruned_mlp_with_warm_optimizer()
    apply_masks(m, masks)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    _train(m, opt, 2)
    assert flatten(m, lay)[~support].abs().sum() > 0


def test_layout_is_frozen():
    lay = layout(mlp())
    assert isinstance(lay, Layout)
    with pytest.raises(Exception):
        lay.p = 3
