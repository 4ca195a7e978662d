"""EarlyCroP-style early pruning: Hessian-gradient saliency against an explicit Hessian, the stability rule,
exact sparsity, equal epochs, and the structured mode's FLOP budget."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

import chita_minimal as cm
from chita_minimal.report import Report
from chita_minimal.training.earlycrop import EarlyCropResult, earlycrop_train, hessian_gradient, saliency
from chita_minimal.models import MLPNet
from chita_minimal.models.resnet_cifar import ResNetCifar
from chita_minimal.training.sparse_training import SparseTrainResult
from chita_minimal.structure.channels import channel_groups, flops

NAMES = ["1.weight", "3.weight", "5.weight"]
P = 20 * 64 + 64 * 32 + 32 * 3


def net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 3)).to(dtype)


@pytest.fixture(scope="module")
def data():
    """300 samples, 3 classes given by a random linear teacher: learnable, chance = 1/3."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 20, generator=g)
    return TensorDataset(X, (X @ torch.randn(20, 3, generator=g)).argmax(1))


def test_hessian_gradient_equals_explicit_hessian_times_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 1])
    names = ["0.weight", "2.weight"]  # biases held fixed
    ws = [model.get_parameter(n) for n in names]
    flat = torch.cat([w.detach().flatten() for w in ws])

    def loss_of(v):
        parts = dict(zip(names, torch.split(v, [w.numel() for w in ws])))
        return nn.functional.cross_entropy(
            functional_call(model, {n: parts[n].view_as(w) for n, w in zip(names, ws)}, (x,)), y)

    H = torch.autograd.functional.hessian(loss_of, flat)  # (32, 32)
    g_ref = torch.func.grad(loss_of)(flat)
    g, hg = hessian_gradient(loss_of(torch.cat([w.flatten() for w in ws])), ws)
    assert torch.allclose(torch.cat([t.flatten() for t in g]), g_ref, atol=1e-12)
    assert torch.allclose(torch.cat([t.flatten() for t in hg]), H @ g_ref, atol=1e-12)
    S = saliency(model, x, y, names)
    assert list(S) == names
    assert torch.allclose(torch.cat([s.flatten() for s in S.values()]), (flat * (H @ g_ref)).abs(), atol=1e-12)
    assert all(w.grad is None for w in model.parameters())  # saliency writes no .grad


def test_saliency_leaves_batchnorm_statistics_untouched():
    model = ResNetCifar(1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    S = saliency(model, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert list(S) == cm.network.params.prunable_names(model) and all(bool((s >= 0).all()) for s in S.values())


@pytest.mark.parametrize("stability, path", [(0.92, "stable"), (0.99, "deadline")])
def test_prunes_at_first_stable_check_exact_sparsity_and_equal_epochs(data, stability, path):
    model = net()
    forwards = []
    model.register_forward_hook(lambda m, i, o: forwards.append(len(i[0])))
    res = earlycrop_train(model, data, 0.8, 6, lr=0.05, batch_size=32, check_every=1, stability=stability,
                          max_dense_epochs=2)
    assert isinstance(res, EarlyCropResult) and isinstance(res, SparseTrainResult) and res.method == "earlycrop"
    ious = [h["iou"] for h in res.history]
    assert ious[0] is None and all(0 <= v <= 1 for v in ious[1:])
    assert [h["step"] for h in res.history] == list(range(res.prune_step + 1))  # a check before every step
    first = next((h["step"] for h in res.history[1:] if h["iou"] >= stability), 20)  # D = 2 epochs × 10
    assert res.prune_step == first and [h["pruned"] for h in res.history] == [False] * first + [True]
    assert (0 < first < 20) if path == "stable" else (first == 20)
    if path == "stable":
        assert first > 1  # not the first comparison: the rule really waited for stability
    k = cm.num_kept(0.8, P)
    assert sum(int(m.sum()) for m in res.masks.values()) == k and res.sparsity == 1 - k / P
    assert all(not bool(model.get_parameter(n).detach()[~m].any()) for n, m in res.masks.items())
    assert res.steps == 60 and len(res.losses) == 6  # 6 epochs × 10 batches, whenever it pruned
    assert isinstance(res, Report) and res.target == 0.8 and res.achieved == res.sparsity and res.flop_fraction is None
    assert res.stages is res.history and res.model is None and set(res.seconds) == {"total"}
    assert len(forwards) == res.steps + len(res.history)  # training steps + one saliency pass per check
    assert forwards.count(12) == 6  # every epoch complete (300 = 9×32 + 12; saliency batch: 32 samples)
    assert forwards.count(32) == 6 * 9 + len(res.history)
    assert res.losses[-1] < res.losses[0]


def test_prune_at_init_uses_the_saliency_of_the_initial_network(data):
    model = net(dtype=torch.float64)
    init = copy.deepcopy(model)
    res = earlycrop_train(model, data, 0.9, 2, lr=0.05, batch_size=64, check_every=0, saliency_samples=300)
    assert res.prune_step == 0 and len(res.history) == 1 and res.history[0]["pruned"]
    S = saliency(init, data.tensors[0].double(), data.tensors[1])  # the whole set (in another order: same mean loss)
    flat = torch.cat([s.flatten() for s in S.values()])
    top = torch.zeros(P, dtype=torch.bool)
    top[torch.topk(flat, cm.num_kept(0.9, P)).indices] = True
    assert torch.equal(torch.cat([m.flatten() for m in res.masks.values()]), top)
    assert all(not bool(model.get_parameter(n).detach()[~m].any()) for n, m in res.masks.items())


@pytest.mark.parametrize("kind", ["mlpnet", "resnet"])
def test_structured_respects_the_flop_budget_and_the_shrunk_model_matches(kind):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "mlpnet":
        model, X, n_cls = MLPNet(), torch.randn(64, 1, 28, 28, generator=g), 10
    else:
        model, X, n_cls = ResNetCifar(1), torch.randn(16, 3, 16, 16, generator=g), 10
    data = TensorDataset(X, torch.randint(0, n_cls, (len(X),), generator=g))
    dense_flops = flops(model, X.shape[1:])
    res = earlycrop_train(model, data, 0.4, 2, lr=0.05, batch_size=8, structured=True, check_every=1,
                          stability=0.95, max_dense_epochs=1)
    assert set(res.keep) == set(channel_groups(model)) and any(not bool(m.all()) for m in res.keep.values())
    measured = 1 - flops(res.small, X.shape[1:]) / dense_flops
    assert measured == pytest.approx(res.flop_fraction) and 0 < measured <= 0.4
    for name, gr in channel_groups(model).items():  # removed channels: producer row and consumer column at 0
        drop = ~res.keep[name]
        assert not bool(model.get_submodule(gr.producer).weight.detach()[drop].any())
        assert not bool(model.get_submodule(gr.consumer).weight.detach()[:, drop].any())
        assert int(res.keep[name].sum()) == model.get_submodule(gr.consumer).weight.shape[1] - int(drop.sum())
    zeros = sum(int((~m).sum()) for m in res.masks.values())
    assert res.sparsity == pytest.approx(zeros / sum(m.numel() for m in res.masks.values())) and res.sparsity > 0
    model.eval(), res.small.eval()
    with torch.no_grad():
        assert torch.allclose(res.small(X[:4]), model(X[:4]), atol=1e-5)
    assert res.steps == 2 * len(X) // 8 and res.prune_step <= len(X) // 8
    assert res.target == 0.4 and res.achieved == res.flop_fraction and res.model is res.small
    assert "channels kept" in str(res)


def test_bad_input(data):
    model = net()
    kw = dict(lr=0.1, batch_size=32)
    with pytest.raises(ValueError, match="sparsity"):
        earlycrop_train(model, data, 1.0, 2, **kw)
    with pytest.raises(ValueError, match="epochs"):
        earlycrop_train(model, data, 0.5, 0, **kw)
    with pytest.raises(ValueError, match="stability"):
        earlycrop_train(model, data, 0.5, 2, stability=0, **kw)
    with pytest.raises(ValueError, match="stability"):
        earlycrop_train(model, data, 0.5, 2, stability=1.5, **kw)
    with pytest.raises(ValueError, match="check_every"):
        earlycrop_train(model, data, 0.5, 2, check_every=-1, **kw)
    with pytest.raises(TypeError, match="check_every"):
        earlycrop_train(model, data, 0.5, 2, check_every=1.0, **kw)
    with pytest.raises(ValueError, match="max_dense_epochs"):
        earlycrop_train(model, data, 0.5, 2, max_dense_epochs=2, **kw)
    with pytest.raises(ValueError, match="saliency_samples"):
        earlycrop_train(model, data, 0.5, 2, saliency_samples=0, **kw)
    with pytest.raises(TypeError, match="structured"):
        earlycrop_train(model, data, 0.5, 2, structured="yes", **kw)
    mlp = MLPNet()
    images = TensorDataset(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="FLOP fraction"):
        earlycrop_train(mlp, images, 0.0, 2, structured=True, **kw)
    with pytest.raises(ValueError, match="producer and consumer"):
        earlycrop_train(mlp, images, 0.5, 2, structured=True, names=["fc1.weight", "fc3.weight"], **kw)
    with pytest.raises(TypeError, match="model"):
        earlycrop_train("net", data, 0.5, 2, **kw)


def test_structured_on_a_depthwise_separable_cnn():
    """Groups with two producers (a pointwise conv and the depthwise conv that filters its channels): the removed
    channels are zero in every producer row and consumer column, and the shrunk model computes the same."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    X = torch.randn(16, 3, 8, 8, generator=g)
    data = TensorDataset(X, torch.randint(0, 10, (16,), generator=g))
    res = earlycrop_train(model, data, 0.4, 2, lr=0.05, batch_size=8, structured=True, check_every=1,
                          stability=0.95, max_dense_epochs=1)
    groups = channel_groups(model, X[:1])
    assert any(len(gr.producers) == 2 for gr in groups.values())
    assert 0 < res.flop_fraction <= 0.4
    for name, gr in groups.items():
        for c in (~res.keep[name]).nonzero().squeeze(1).tolist():
            for m in gr.producers:
                assert not bool(model.get_submodule(m).weight.detach()[gr.indices_of(m, c)].any())
            for m in gr.consumers:
                assert not bool(model.get_submodule(m).weight.detach()[:, gr.indices_of(m, c)].any())
    model.eval(), res.small.eval()
    with torch.no_grad():
        assert torch.allclose(res.small(X[:4]), model(X[:4]), atol=1e-5)
