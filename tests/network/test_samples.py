"""The data a user has: DataLoaders, iterables of batches, tuple and dict inputs, HF-style outputs, any loss."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import chita_minimal as cm
from chita_minimal.network.fisher import gradients, gradients_loop


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _data(m=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(m, 6, generator=g), torch.randint(0, 3, (m,), generator=g))


def _rows_by_hand(model, xs, ys, loss):
    """Reference: one autograd pass per sample, weights of the Linear layers flattened in order."""
    ws = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(x, y), ws)])
                        for x, y in zip(xs, ys)])


def test_a_dataloader_gives_the_x_of_its_dataset():
    ds = _data()
    a = gradients(_mlp(), ds, 12, seed=3, progress=False)
    b = gradients(_mlp(), DataLoader(ds, batch_size=7, shuffle=True), 12, seed=3, progress=False)
    assert torch.equal(a.X, b.X) and torch.equal(a.indices, b.indices)


def test_an_iterable_of_batches_takes_its_first_samples():
    ds = _data(24)
    batches = ((ds.tensors[0][i:i + 5], ds.tensors[1][i:i + 5]) for i in range(0, 24, 5))
    a = gradients(_mlp(), batches, 24, seed=1, progress=False)   # all 24 samples, drawn in the seed's order
    b = gradients(_mlp(), ds, 24, seed=1, progress=False)
    assert torch.equal(a.X, b.X)
    with pytest.raises(ValueError, match="24 samples"):
        gradients(_mlp(), iter([(ds.tensors[0], ds.tensors[1])]), 30, progress=False)
    with pytest.raises(TypeError, match="DataLoader"):
        gradients(_mlp(), 3, 5, progress=False)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, u, v):
        return self.a(u) + self.b(v)


class HFStyle(nn.Module):
    """keyword inputs, a dict output with 'logits' (as Hugging Face models return)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, input_ids, attention_mask):
        return {"logits": self.head(torch.relu(self.emb(input_ids)) * attention_mask), "hidden": input_ids}


def test_tuple_inputs_and_hf_dicts_give_the_rows_of_plain_autograd():
    g = torch.Generator().manual_seed(2)
    u, v, y = torch.randn(10, 4, generator=g), torch.randn(10, 2, generator=g), torch.randint(0, 3, (10,), generator=g)
    model = TwoInputs()
    s = gradients(model, [((u[i], v[i]), y[i]) for i in range(10)], 10, seed=0, progress=False)
    idx = s.indices.reshape(-1)
    ref = _rows_by_hand(model, [(u[i], v[i]) for i in idx], [y[i] for i in idx],
                        lambda x, t: F.cross_entropy(model(x[0][None], x[1][None]), t[None]))
    assert torch.allclose(s.X, ref, atol=1e-6)

    mask = (torch.rand(10, 5, generator=g) > 0.3).float()
    hf = HFStyle()
    items = [{"input_ids": u[i], "attention_mask": mask[i], "labels": y[i]} for i in range(10)]
    s = gradients(hf, items, 10, seed=0, progress=False)
    idx = s.indices.reshape(-1)
    ref = _rows_by_hand(hf, [i for i in idx], [y[i] for i in idx],
                        lambda i, t: F.cross_entropy(hf(u[i][None], mask[i][None])["logits"], t[None]))
    assert torch.allclose(s.X, ref, atol=1e-6)
    loader = DataLoader(items, batch_size=4)  # HF collation: a dict of batched tensors
    assert torch.equal(gradients(hf, loader, 10, seed=0, progress=False).X, s.X)


def test_loss_fn_for_a_regression_model_changes_x_as_expected():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    model = _mlp()
    s = gradients(model, TensorDataset(x, y), 16, seed=0, loss_fn=F.mse_loss, progress=False)
    idx = s.indices.reshape(-1)
    ref = _rows_by_hand(model, x[idx], y[idx], lambda a, t: F.mse_loss(model(a[None]), t[None]))
    assert torch.allclose(s.X, ref, atol=1e-6)
    half = gradients(model, TensorDataset(x, y), 16, seed=0, progress=False,
                     loss_fn=lambda out, t: 0.5 * F.mse_loss(out, t))
    assert torch.allclose(half.X, 0.5 * s.X, atol=1e-7)


class NotTraceable(nn.Module):
    """Data-dependent control flow: torch.func's vmap cannot run it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        out = self.fc(x)
        return out if float(out.detach().sum()) < 1e9 else -out


def test_a_model_vmap_cannot_trace_falls_back_to_the_loop_with_a_notice():
    ds = _data(12)
    with pytest.warns(UserWarning, match="one backward pass per row"):
        s = gradients(NotTraceable(), ds, 12, seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = gradients_loop(NotTraceable(), ds, 12, seed=0, progress=False)
    assert torch.allclose(s.X, ref.X, atol=1e-6)


def test_prune_takes_a_dataloader_a_custom_loss_and_hf_outputs():
    ds = _data(64)
    a, b = _mlp(), _mlp()
    ra = cm.prune(a, ds, 0.6, "chita", n_grads=32)
    rb = cm.prune(b, DataLoader(ds, batch_size=16), 0.6, "chita", n_grads=32)
    assert ra.objective == rb.objective
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            return {"logits": self.net(x)}

    c = Wrapper()
    rc = cm.prune(c, ds, 0.6, "chita", n_grads=32)
    assert rc.objective == pytest.approx(ra.objective, rel=1e-6)
    reg = TensorDataset(ds.tensors[0], torch.randn(64, 3))
    rd = cm.prune(_mlp(), reg, 0.6, "chita", n_grads=32, loss_fn=F.mse_loss)
    assert rd.achieved_sparsity == pytest.approx(0.6, abs=0.01)
