"""The one-call prune API on the shared MLPNet checkpoint and on small models."""

import pytest
import torch
from torch import nn

import chita_minimal as cm
from chita_minimal.prune import PRUNE_METHODS


@pytest.fixture(scope="module")
def mnist():
    return cm.data.load("mnist", "train"), cm.data.load("mnist", "test")


@pytest.fixture()
def mlpnet():
    return cm.models.load_pretrained("mlpnet")


def test_five_lines(mnist):
    train, test = mnist
    model = cm.models.load_pretrained("mlpnet")
    report = cm.prune(model, train, sparsity=0.9, method="chita", n_grads=1000)
    acc = cm.evaluate(model, test)
    mp = cm.models.load_pretrained("mlpnet")
    cm.prune(mp, train, sparsity=0.9, method="mp")
    acc_mp = cm.evaluate(mp, test)
    print(f"MLPNet at 90 %: CHITA {acc:.4f}, MP {acc_mp:.4f}")
    assert report.achieved_sparsity == pytest.approx(0.9, abs=1 / report.p)
    assert acc > acc_mp + 0.01  # CHITA re-fits the kept weights: clearly better than magnitude pruning
    assert acc > 0.9


@pytest.mark.parametrize("method", [m for m in PRUNE_METHODS if m != "l1-filter"])  # structured: whole filters
def test_every_method_hits_the_sparsity_exactly(method, mnist, mlpnet):
    train, _ = mnist
    opts = dict(stages=3) if method == "chita++" else {}
    if method in ("wf", "cbs"):
        opts["block_size"] = 50
    report = cm.prune(mlpnet, train, 0.8, method=method, n_grads=200, l2=1e-3, **opts)
    w = torch.cat([p.detach().flatten() for n, p in mlpnet.named_parameters() if n.endswith("weight")])
    assert int((w != 0).sum()) == report.k == cm.num_kept(0.8, 32360)
    assert report.p == 32360
    assert set(report.layer_sparsity) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    for name, mask in report.masks.items():  # masks agree with the weights written back
        param = dict(mlpnet.named_parameters())[name]
        assert torch.equal(mask, param.detach() != 0) or int((param.detach()[mask] == 0).sum()) == 0
        assert torch.all(param.detach()[~mask] == 0)
    assert report.seconds["total"] >= report.seconds["solve"]


def test_chita_plus_plus_stages(mnist, mlpnet):
    train, _ = mnist
    report = cm.prune(mlpnet, train, 0.95, method="chita++", n_grads=200, schedule="linear", stages=4, base=0.5)
    assert [s["sparsity"] for s in report.stages] == pytest.approx([0.5, 0.65, 0.8, 0.95])
    assert [s["k"] for s in report.stages] == [cm.num_kept(s, 32360) for s in (0.5, 0.65, 0.8, 0.95)]
    assert report.achieved_sparsity == pytest.approx(0.95, abs=1e-4)


def test_chita_block_respects_layers(mnist, mlpnet):
    train, _ = mnist
    report = cm.prune(mlpnet, train, 0.9, method="chita-block", n_grads=200, block_size=300)
    assert report.achieved_sparsity == pytest.approx(0.9, abs=1e-4)


def test_chita_block_sliced_and_batched_give_the_same_pruned_model(mnist, mlpnet, monkeypatch):
    """On a CPU the blocks are solved one slice of X at a time; the batched path of the other devices is the same
    solve up to fp32 rounding. The removed ``fast`` switch is refused in the user's words."""
    import chita_minimal.solver.blocks as blocks_mod
    train, _ = mnist
    batched = cm.models.load_pretrained("mlpnet")
    cm.prune(mlpnet, train, 0.9, method="chita-block", n_grads=200, block_size=300)
    with monkeypatch.context() as m:
        m.setattr(blocks_mod, "_sliceable", lambda X: False)
        cm.prune(batched, train, 0.9, method="chita-block", n_grads=200, block_size=300)
    for (name, a), b in zip(mlpnet.named_parameters(), batched.parameters()):
        assert torch.equal(a == 0, b == 0), name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    untouched = cm.models.load_pretrained("mlpnet")
    with pytest.raises(cm.methods.OptionError, match="has no option 'fast'"):
        cm.prune(untouched, train, 0.9, method="chita-block", fast=True)
    for a, b in zip(untouched.parameters(), cm.models.load_pretrained("mlpnet").parameters()):
        assert torch.equal(a, b)


def test_mask_keeper_keeps_pruned_weights_at_zero(mnist, mlpnet):
    train, _ = mnist
    report = cm.prune(mlpnet, train, 0.9, method="chita-bso", n_grads=200)
    opt = torch.optim.SGD(mlpnet.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = train.tensors[0][:256], train.tensors[1][:256]
    with cm.MaskKeeper(mlpnet, report.masks) as keeper:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(mlpnet(x), y).backward()
            opt.step()
            keeper.apply()
    for name, mask in report.masks.items():
        assert torch.all(dict(mlpnet.named_parameters())[name].detach()[~mask] == 0)


# -- bad input: clear errors, model untouched ------------------------------------------------

def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(sparsity=1.0), ValueError, "sparsity"),
    (dict(sparsity=-0.1), ValueError, "sparsity"),
    (dict(sparsity="0.9"), TypeError, "sparsity"),
    (dict(method="obs"), ValueError, "chita-bso"),  # lists the valid names
    (dict(n_grads=0), ValueError, "n_grads"),
    (dict(l2=-1.0), ValueError, "l2"),
    (dict(names=["fc9.weight"]), ValueError, "fc1.weight"),
    (dict(method="wf", l2=0.0), ValueError, "l2"),
])
def test_bad_arguments(kwargs, exc, word, mnist, mlpnet):
    train, _ = mnist
    before = _weights(mlpnet)
    args = dict(sparsity=0.9, n_grads=50) | kwargs
    with pytest.raises(exc, match=word):
        cm.prune(mlpnet, train, args.pop("sparsity"), **args)
    assert _unchanged(mlpnet, before)


def test_dataset_smaller_than_n_grads(mlpnet):
    small = torch.utils.data.TensorDataset(torch.randn(10, 1, 28, 28), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="10 samples"):
        cm.prune(mlpnet, small, 0.5, n_grads=20)


def test_nan_gradients_name_the_layer_and_leave_the_model_untouched(mlpnet):
    x = torch.randn(64, 1, 28, 28)
    x[5] = float("nan")
    data = torch.utils.data.TensorDataset(x, torch.zeros(64, dtype=torch.long))
    before = _weights(mlpnet)
    with pytest.raises(ValueError, match="fc1.weight"):
        cm.prune(mlpnet, data, 0.5, n_grads=64)
    assert _unchanged(mlpnet, before)


def test_failure_in_a_later_chita_plus_plus_stage_restores_the_model(mnist, mlpnet):
    train, _ = mnist
    before = _weights(mlpnet)
    x = train.tensors[0][:300].clone()
    data = torch.utils.data.TensorDataset(x, train.tensors[1][:300])
    # stage 0 uses seed 0, stage 1 draws other samples (seed 1): poison a sample only stage 1 picks
    idx0 = set(cm.gradients(mlpnet, data, 100, seed=0, progress=False).indices.flatten().tolist())
    idx1 = cm.gradients(mlpnet, data, 100, seed=1, progress=False).indices.flatten().tolist()
    x[next(i for i in idx1 if i not in idx0)] = float("nan")
    with pytest.raises(ValueError):
        cm.prune(mlpnet, data, 0.9, method="chita++", stages=3, n_grads=100)
    assert _unchanged(mlpnet, before)


def test_model_without_prunable_parameters():
    model = nn.Sequential(nn.ReLU())
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="prunable"):
        cm.prune(model, data, 0.5, n_grads=4)


def test_block_size_reaches_woodfisher(mnist):
    train, _ = mnist
    a, b = cm.models.load_pretrained("mlpnet"), cm.models.load_pretrained("mlpnet")
    cm.prune(a, train, 0.9, method="wf", n_grads=100, block_size=20)
    cm.prune(b, train, 0.9, method="wf", n_grads=100, block_size=200)
    assert not torch.equal(a.fc1.weight, b.fc1.weight)  # a different Fisher block gives other weights
    with pytest.raises(ValueError, match="block_size"):
        cm.prune(cm.models.load_pretrained("mlpnet"), train, 0.9, method="mp", block_size=20)


class TinyTransformer(nn.Module):
    """Tokens → embedding → one encoder layer → mean → classes (the shape of an HF classifier)."""

    def __init__(self, vocab=20, d=16, heads=2, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, 32, dropout=0.0, batch_first=True),
                                             num_layers=1)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def test_attention_projections_are_pruned_and_what_stays_dense_is_reported():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randint(0, 20, (64, 7), generator=g), torch.randint(0, 3, (64,), generator=g))
    model = TinyTransformer()
    names = cm.network.params.prunable_names(model)
    assert "encoder.layers.0.self_attn.in_proj_weight" in names and "embed.weight" not in names
    assert "embed.weight" in cm.network.params.prunable_names(model, embeddings=True)
    rep = cm.prune(model, data, 0.7, "mp")
    w = model.encoder.layers[0].self_attn.in_proj_weight
    assert rep.layer_sparsity["encoder.layers.0.self_attn.in_proj_weight"] == pytest.approx(float((w == 0).float().mean()))
    assert rep.achieved_sparsity == pytest.approx(0.7, abs=1 / rep.p)
    assert rep.dense["embed.weight"] == 20 * 16 and 0 < rep.dense_share < 1
    text = str(rep)
    assert "in_proj_weight" in text and "left dense" in text and "embed.weight" in text
    rep = cm.prune(TinyTransformer(), data, 0.7, "chita", n_grads=32)   # gradients through attention
    assert rep.achieved_sparsity == pytest.approx(0.7, abs=1 / rep.p)
    assert 0 < rep.layer_sparsity["encoder.layers.0.self_attn.in_proj_weight"] < 1
