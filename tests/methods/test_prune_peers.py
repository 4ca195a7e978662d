"""prune(...) with CHITA's neighbours and N:M patterns: the same API, exact sparsity accounting."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import chita_minimal as cm
from chita_minimal.network import params
from chita_minimal.solver.patterns import NM


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def _data(n=200):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g))


def _weights(model):
    lay = params.layout(model)
    return lay, params.flatten(model, lay)


@pytest.mark.parametrize("method", ["snip", "taylor", "sparsegpt"])
def test_unstructured_peers_keep_exactly_k(method):
    model = _net()
    rep = cm.prune(model, _data(), 0.7, method, n_grads=64, l2=1e-3)
    lay, w = _weights(model)
    assert rep.k == cm.num_kept(0.7, lay.p) or method == "sparsegpt"
    assert int((w != 0).sum()) <= rep.k and int(sum(m.sum() for m in rep.masks.values())) == rep.k
    assert abs(rep.achieved_sparsity - 0.7) < 0.01


def test_snip_and_taylor_rank_by_their_saliency():
    model, data = _net(), _data()
    lay, w_bar = _weights(model)
    X = cm.gradients(model, data, 64, seed=0, progress=False).X
    rep = cm.prune(model, data, 0.5, "taylor", n_grads=64, l2=1e-3, seed=0)
    score = ((X * w_bar) ** 2).mean(0)
    kept = torch.cat([rep.masks[n].reshape(-1) for n in lay.names])
    assert score[kept].min() >= score[~kept].max()


def test_l1_filter_removes_whole_filters():
    model = _net()
    rep = cm.prune(model, _data(), 0.5, "l1-filter")
    W = model[0].weight
    dead = (W.flatten(1) == 0).all(1)
    assert int(dead.sum()) == 4 and bool((W.flatten(1)[~dead] != 0).all())
    assert rep.k == int((params.flatten(model, params.layout(model)) != 0).sum())
    assert rep.achieved_sparsity == pytest.approx(4 * 18 / params.layout(model).p)


@pytest.mark.parametrize("method", ["chita", "chita-bso", "chita-iht", "mp", "sparsegpt"])
def test_nm_pattern_every_group_has_n(method):
    model = _net()
    names = ["3.weight", "5.weight"]  # conv rows have 18 entries, not a multiple of 4
    rep = cm.prune(model, _data(), 0.5, method, n_grads=64, l2=1e-3, pattern="2:4", names=names)
    lay, w = _weights(model)
    lay = params.layout(model, names)
    w = params.flatten(model, lay)
    nm = NM.for_layout("2:4", lay)
    support = torch.cat([rep.masks[n].reshape(-1) for n in lay.names])
    assert bool((nm.counts(support) == 2).all())
    assert bool((nm.counts(w != 0) <= 2).all())
    assert rep.k == nm.k


def test_pattern_errors_leave_the_model_alone():
    model, data = _net(), _data()
    lay, before = _weights(model)
    with pytest.raises(ValueError, match="sparsity must be 0.5"):
        cm.prune(model, data, 0.7, "chita", pattern="2:4", names=["3.weight"])
    with pytest.raises(ValueError, match="pattern is supported"):
        cm.prune(model, data, 0.5, "wf", pattern="2:4", l2=1e-3)
    with pytest.raises(ValueError, match="row length 18"):  # named explicitly: every one must fit
        cm.prune(model, data, 0.5, "chita", pattern="2:4", n_grads=16, names=["0.weight", "3.weight"])
    with pytest.raises(ValueError, match="N:M|pattern"):
        cm.prune(model, data, 0.5, "sparsegpt", pattern="2:x")
    assert torch.equal(params.flatten(model, lay), before)


def test_sparsegpt_dp_allocation_meets_the_budget():
    model = _net()
    rep = cm.prune(model, _data(), 0.8, "sparsegpt", n_grads=64, allocation="dp")
    assert rep.achieved_sparsity >= 0.8 - 1e-9
    assert isinstance(rep.stages[0]["allocation"], dict)
    assert set(rep.layer_sparsity) == {"0.weight", "3.weight", "5.weight"}
    with pytest.raises(ValueError, match="calibration samples"):
        cm.prune(_net(), _data(10), 0.8, "sparsegpt", n_grads=64)


def test_layers_that_cannot_take_the_pattern_are_left_dense_with_a_warning():
    model, data = _net(), _data()
    before = model[0].weight.detach().clone()   # rows of 2·3·3 = 18: 2:4 cannot cut them
    with pytest.warns(UserWarning, match=r"left dense.*0\.weight \(8, 2, 3, 3\)"):
        rep = cm.prune(model, data, 0.5, "chita", pattern="2:4", n_grads=16)
    assert torch.equal(model[0].weight, before)
    assert "0.weight" in rep.dense and "0.weight" not in rep.masks
    nm = NM.for_layout("2:4", params.layout(model, ["3.weight", "5.weight"]))
    w = params.flatten(model, params.layout(model, ["3.weight", "5.weight"]))
    assert bool((nm.counts(w != 0) <= 2).all())
    with pytest.raises(ValueError, match="no prunable weight"):
        cm.prune(nn.Sequential(nn.Linear(3, 2)), TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long)),
                 0.5, "mp", pattern="2:4")
