"""Tests of chita_minimal.network.fisher: the vmap gradients against a plain backward loop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from chita_minimal.network.fisher import FisherSample, gradients, gradients_loop


def mlp(dtype=torch.float64):
    """MLPNet shape: 784-40-20-10, no biases."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 40, bias=False), nn.ReLU(),
                         nn.Linear(40, 20, bias=False), nn.ReLU(),
                         nn.Linear(20, 10, bias=False)).to(dtype)


def cnn(dtype=torch.float64):
    """Conv2d + BatchNorm2d + Linear with bias; BN running stats made non-trivial."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                      nn.Flatten(), nn.Linear(6 * 6 * 6, 10))
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
    return m.to(dtype).eval()


def data(shape, N=64, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(N, *shape, generator=g, dtype=dtype),
                         torch.randint(0, 10, (N,), generator=g))


def both(model, ds, n, **kw):
    a = gradients(model, ds, n, progress=False, **kw)
    b = gradients_loop(model, ds, n, progress=False, **kw)
    assert torch.equal(a.indices, b.indices)
    return a, b


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_mlp_vmap_equals_loop(dtype, atol, batch_size):
    model, ds = mlp(dtype), data((1, 28, 28), dtype=dtype)
    a, b = both(model, ds, 12, batch_size=batch_size)
    assert isinstance(a, FisherSample)
    assert a.X.shape == (12, 784 * 40 + 40 * 20 + 20 * 10) == (12, 32360)
    assert a.X.dtype == dtype and a.indices.shape == (12, batch_size)
    assert a.indices.unique().numel() == 12 * batch_size  # without replacement
    torch.testing.assert_close(a.X, b.X, atol=atol, rtol=0)
    torch.testing.assert_close(a.mean_grad, a.X.mean(0), atol=0, rtol=0)
    assert a.seconds > 0 and a.X.abs().sum() > 0


def test_row_is_gradient_of_mean_minibatch_loss():
    model, ds = mlp(), data((1, 28, 28))
    s = gradients(model, ds, 3, batch_size=4, progress=False)
    x, y = ds.tensors[0][s.indices[1]], ds.tensors[1][s.indices[1]]  # (4, 1, 28, 28), (4,)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    row = torch.cat([model[i].weight.grad.reshape(-1) for i in (1, 3, 5)])
    torch.testing.assert_close(s.X[1], row, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cnn_batchnorm_eval_default_set(dtype, atol):
    model, ds = cnn(dtype), data((3, 8, 8), dtype=dtype)
    a, b = both(model, ds, 10, batch_size=2)
    assert a.layout.names == ("0.weight", "4.weight")  # no biases, no BN parameters
    assert a.X.shape[1] == 6 * 3 * 3 * 3 + 10 * 216
    torch.testing.assert_close(a.X, b.X, atol=atol, rtol=0)


def test_names_subset_and_non_weight_names():
    model, ds = cnn(), data((3, 8, 8))
    full = gradients(model, ds, 6, progress=False)
    sub = gradients(model, ds, 6, names=["4.weight"], progress=False)
    assert sub.layout.names == ("4.weight",) and sub.X.shape == (6, 2160)
    torch.testing.assert_close(sub.X, full.X[:, full.layout.span("4.weight")], atol=1e-12, rtol=0)
    # a bias or BN parameter may be named explicitly
    a, b = both(model, ds, 6, params=["4.bias", "1.weight", "0.weight"])
    assert a.X.shape == (6, 10 + 6 + 162)
    torch.testing.assert_close(a.X, b.X, atol=1e-10, rtol=0)


def test_generic_dataset_same_as_tensor_dataset():
    model, ds = mlp(), data((1, 28, 28))
    pairs = [(ds.tensors[0][i], int(ds.tensors[1][i])) for i in range(len(ds))]
    a = gradients(model, ds, 5, batch_size=2, progress=False)
    b = gradients(model, pairs, 5, batch_size=2, progress=False)
    torch.testing.assert_close(a.X, b.X, atol=0, rtol=0)


def test_float32_inputs_cast_to_float64_model():
    model = mlp(torch.float64)
    a = gradients(model, data((1, 28, 28), dtype=torch.float32), 3, progress=False)
    assert a.X.dtype == torch.float64


def test_seed_determinism():
    model, ds = mlp(), data((1, 28, 28))
    a = gradients(model, ds, 8, seed=3, progress=False)
    b = gradients(model, ds, 8, seed=3, progress=False)
    c = gradients(model, ds, 8, seed=4, progress=False)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.X, b.X)
    assert not torch.equal(a.indices, c.indices) and not torch.allclose(a.X, c.X)


def test_chunking_does_not_change_result():
    model, ds = cnn(), data((3, 8, 8))
    a = gradients(model, ds, 9, batch_size=2, chunk_size=1, progress=False)
    b = gradients(model, ds, 9, batch_size=2, chunk_size=4, progress=False)
    c = gradients(model, ds, 9, batch_size=2, chunk_size=1000, progress=False)
    torch.testing.assert_close(a.X, b.X, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.X, c.X, atol=1e-12, rtol=0)


def test_custom_loss():
    model, ds = mlp(), data((1, 28, 28))
    loss = lambda out, y: 0.5 * F.cross_entropy(out, y)  # noqa: E731
    a = gradients(model, ds, 4, progress=False)
    b = gradients(model, ds, 4, loss_fn=loss, progress=False)
    torch.testing.assert_close(b.X, 0.5 * a.X, atol=1e-12, rtol=0)


def test_bad_sizes():
    model, ds = mlp(), data((1, 28, 28), N=10)
    with pytest.raises(ValueError, match=r"10 samples.*12"):
        gradients(model, ds, 6, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="n_grads must be >= 1"):
        gradients(model, ds, 0, progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        gradients_loop(model, ds, 2, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        gradients(model, ds, 2, chunk_size=0, progress=False)
    with pytest.raises(TypeError, match="n_grads must be an int"):
        gradients(model, ds, 2.0, progress=False)
    with pytest.raises(TypeError, match="model"):
        gradients("model", ds, 2, progress=False)
    with pytest.raises(ValueError, match="exactly 2 tensors"):
        gradients(model, TensorDataset(*ds.tensors, ds.tensors[1]), 2, progress=False)


def test_unknown_names_lists_valid_ones():
    model, ds = cnn(), data((3, 8, 8))
    with pytest.raises(ValueError, match=r"unknown.*conv\.weight.*'0\.weight', '4\.weight'"):
        gradients(model, ds, 2, names=["conv.weight"], progress=False)


def test_nan_weight_names_layer_and_restores_mode():
    model, ds = cnn(), data((3, 8, 8))
    model.train()
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"4\.weight"):
        gradients(model, ds, 2, progress=False)
    assert model.training and model[1].training


def test_nonfinite_gradient_names_layers():
    model, ds = mlp(), data((1, 28, 28))
    bad_loss = lambda out, y: (out * float("inf")).sum()  # noqa: E731
    for fn in (gradients, gradients_loop):
        with pytest.raises(ValueError, match=r"non-finite.*gradients.*5\.weight"):
            fn(model, ds, 2, loss_fn=bad_loss, progress=False)


def test_mode_and_state_restored():
    model, ds = cnn(), data((3, 8, 8))
    model.train()
    model[1].eval()  # mixed modes must come back exactly
    stats = model[1].running_mean.clone()
    w = model[0].weight
    for fn in (gradients, gradients_loop):
        s = fn(model, ds, 4, batch_size=2, device="cpu", progress=False)
        assert model.training and not model[1].training and model[4].training
        assert torch.equal(model[1].running_mean, stats)  # eval mode: BN stats untouched
        assert model[0].weight is w and w.device.type == "cpu" and w.grad is None
        assert s.X.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_moved_and_restored():
    model, ds = cnn(), data((3, 8, 8))
    ref = gradients(model, ds, 4, progress=False)
    s = gradients(model, ds, 4, device="cuda", progress=False)
    assert s.X.device.type == "cuda"
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    torch.testing.assert_close(s.X.cpu(), ref.X, atol=1e-10, rtol=0)
    model.cuda()
    t = gradients_loop(model, ds, 4, progress=False)  # default: the model's device
    assert t.X.device.type == "cuda"
    torch.testing.assert_close(t.X.cpu(), ref.X, atol=1e-10, rtol=0)


def test_frozen_parameters_still_differentiated():
    model, ds = mlp(), data((1, 28, 28))
    model.requires_grad_(False)
    a, b = both(model, ds, 3)
    torch.testing.assert_close(a.X, b.X, atol=1e-10, rtol=0)
    assert not any(t.requires_grad for t in model.parameters())  # flags restored
