"""Tests of chita_minimal.network.evaluate: accuracy of the shared checkpoints, mode handling, BN recalibration."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

from chita_minimal.data import datasets as data
from chita_minimal.network.evaluate import cifar_augment, evaluate, recalibrate_bn
from chita_minimal.models import MLPNet, load_pretrained, resnet20


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    monkeypatch.setenv("CHITA_NO_DOWNLOAD", "1")  # tests never touch the network


def _load_or_skip(name, split, **kw):
    try:
        return data.load(name, split, **kw)
    except FileNotFoundError as e:
        pytest.skip(f"{name} not available locally: {e}")


def _pretrained_or_skip(name):
    try:
        return load_pretrained(name)
    except FileNotFoundError as e:
        pytest.skip(f"checkpoint {name} not available locally: {e}")


# ----------------------------------------------------------------------------- the shared checkpoints


def test_mlpnet_scores_9397_on_mnist_test():
    model = _pretrained_or_skip("mlpnet")
    test = _load_or_skip("mnist", "test")
    acc = evaluate(model, test)
    assert round(acc * len(test)) == 9397
    assert acc == 9397 / 10000


@pytest.mark.slow
def test_resnet20_scores_9143_on_cifar10_test():
    model = _pretrained_or_skip("resnet20")
    test = _load_or_skip("cifar10", "test")
    acc = evaluate(model, test, batch_size=500)
    assert round(acc * len(test)) == 9143


# ----------------------------------------------------------------------------- evaluate


def _toy_classification(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    model = MLPNet()
    with torch.no_grad():
        y = model(x).argmax(1)  # labels the model gets right by construction
    return model, x, y


def test_evaluate_counts_correctly_and_batch_size_does_not_matter():
    model, x, y = _toy_classification()
    y_wrong = y.clone()
    y_wrong[:16] = (y_wrong[:16] + 1) % 10  # 16 of 64 wrong
    ds = TensorDataset(x, y_wrong)
    assert evaluate(model, ds) == 48 / 64
    assert evaluate(model, ds, batch_size=7) == 48 / 64  # last batch smaller: nothing dropped
    assert evaluate(model, TensorDataset(x, y)) == 1.0


def test_evaluate_restores_train_mode_and_uses_eval_mode():
    model = resnet20()
    model.train()
    x = torch.randn(8, 3, 32, 32)
    bn_before = model.bn1.running_mean.clone()
    evaluate(model, TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.bn1.running_mean, bn_before)  # eval mode: BN statistics untouched
    model.eval()
    evaluate(model, TensorDataset(x, torch.zeros(8, dtype=torch.long)))
    assert not model.training


def test_evaluate_generic_dataset():
    model, x, y = _toy_classification(n=10)

    class Pairs(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return x[i], y[i]

    assert evaluate(model, Pairs(), batch_size=3) == 1.0


def test_evaluate_bad_inputs():
    model = MLPNet()
    empty = TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, empty)
    ds = TensorDataset(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, ds, batch_size=0)
    with pytest.raises(TypeError, match="model"):
        evaluate("model", ds)
    with pytest.raises(TypeError, match="dataset"):
        evaluate(model, [1, 2])


# ----------------------------------------------------------------------------- cifar_augment


def test_cifar_augment_crops_and_flips():
    B = 256
    x = torch.randn(B, 3, 32, 32)
    out = cifar_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    # every output is a shifted (by at most 4 pixels), possibly flipped window of its input, padded with
    # black, which is -1 in the default normalisation (mean 0.5, std 0.5)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), value=-1.0)
    n_flipped, n_shifted = 0, 0
    for b in range(B):
        matches = [(i, j, f) for i in range(9) for j in range(9) for f in (False, True)
                   if torch.equal(out[b], (padded[b, :, i:i + 32, j:j + 32].flip(-1) if f
                                            else padded[b, :, i:i + 32, j:j + 32]))]
        assert len(matches) == 1, b
        i, j, f = matches[0]
        n_flipped += f
        n_shifted += (i, j) != (4, 4)
    assert 0.35 * B < n_flipped < 0.65 * B
    assert n_shifted > 0.9 * B
    # deterministic for a generator seed, different for another
    assert torch.equal(out, cifar_augment(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, cifar_augment(x, torch.Generator().manual_seed(1)))


def test_cifar_augment_pads_black_of_the_normalisation():
    x = torch.full((64, 3, 8, 8), 7.0)
    mean, std = data.NORMALIZATIONS["cifar10"]["cifar"]
    out = cifar_augment(x, torch.Generator().manual_seed(0), normalization="cifar")
    for c in range(3):
        vals = out[:, c].unique()
        assert len(vals) == 2 and vals[1].item() == 7.0
        assert vals[0].item() == pytest.approx(-mean[c] / std[c])  # black pixel after normalising
    out = cifar_augment(x, torch.Generator().manual_seed(0), normalization="none")
    assert set(out.unique().tolist()) == {0.0, 7.0}


def test_cifar_augment_bad_input():
    with pytest.raises(ValueError, match="x"):
        cifar_augment(torch.ones(3, 8, 8), torch.Generator())
    with pytest.raises(ValueError, match="normalization"):
        cifar_augment(torch.ones(2, 3, 8, 8), torch.Generator(), normalization="imagenet")
    with pytest.raises(TypeError, match="generator"):
        cifar_augment(torch.ones(2, 3, 8, 8), 0)


# ----------------------------------------------------------------------------- recalibrate_bn


def _bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def test_recalibrate_bn_changes_stats_deterministically():
    torch.manual_seed(0)
    model = resnet20()
    x = 3.0 + 2.0 * torch.randn(40, 3, 16, 16)  # far from the initial stats (mean 0, var 1)
    ds = TensorDataset(x, torch.zeros(40, dtype=torch.long))
    before = _bn_stats(model)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    model.eval()
    recalibrate_bn(model, ds, batch_size=16, augment=cifar_augment, seed=0)
    assert not model.training  # mode restored
    after = _bn_stats(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # weights untouched
    assert model.bn1.num_batches_tracked.item() == 3  # reset, then batches of 16, 16, 8

    again = recalibrate_bn(model, ds, batch_size=16, augment=cifar_augment, seed=0)
    assert again is model
    assert all(torch.equal(after[k], v) for k, v in _bn_stats(model).items())  # same seed: same stats
    recalibrate_bn(model, ds, batch_size=16, augment=cifar_augment, seed=1)
    assert not torch.equal(after["bn1.running_mean"], model.bn1.running_mean)


def test_recalibrate_bn_exact_average_with_cumulative_momentum():
    bn = nn.BatchNorm1d(3, momentum=None)  # cumulative average over batches
    model = nn.Sequential(nn.Flatten(), bn)
    x = torch.randn(30, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([5.0, -1.0, 0.5])
    recalibrate_bn(model, TensorDataset(x, torch.zeros(30)), batch_size=10)
    # three equal batches: the running mean is the mean of the batch means = the data mean
    torch.testing.assert_close(bn.running_mean, x.mean(0))
    assert model.training  # nn.Sequential starts in train mode; restored


def test_recalibrate_bn_exact_gives_the_statistics_of_the_whole_set():
    # ResNet20's first BatchNorm normalises conv1's outputs: with exact=True its running statistics are
    # the mean and unbiased variance of conv1(x) over the whole set, per channel, computed directly here
    torch.manual_seed(0)
    model = resnet20()
    x = 3.0 + 2.0 * torch.randn(24, 3, 16, 16)
    ds = TensorDataset(x, torch.zeros(24, dtype=torch.long))
    with torch.no_grad():
        h = model.conv1(x)  # (24, 16, 16, 16)
    whole_mean, whole_var = h.mean((0, 2, 3)), h.var((0, 2, 3))  # var: unbiased, as BatchNorm keeps it

    recalibrate_bn(model, ds, batch_size=24, exact=True)  # one batch: the whole set
    torch.testing.assert_close(model.bn1.running_mean, whole_mean)
    torch.testing.assert_close(model.bn1.running_var, whole_var)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # restored

    # four equal batches in the shuffled order: the mean is still the whole set's; the variance is the
    # average of the four batches' unbiased variances (what PyTorch's cumulative average keeps)
    recalibrate_bn(model, ds, batch_size=6, seed=3, exact=True)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(3))
    batch_vars = torch.stack([h[order[i:i + 6]].var((0, 2, 3)) for i in range(0, 24, 6)])
    torch.testing.assert_close(model.bn1.running_mean, whole_mean)
    torch.testing.assert_close(model.bn1.running_var, batch_vars.mean(0))
    assert model.bn1.num_batches_tracked.item() == 4

    # without exact, momentum 0.1 remembers the reset values (mean 0, var 1): far from the set's statistics
    recalibrate_bn(model, ds, batch_size=24)
    torch.testing.assert_close(model.bn1.running_mean, 0.1 * whole_mean)
    torch.testing.assert_close(model.bn1.running_var, 0.9 + 0.1 * whole_var)


def test_recalibrate_bn_bad_inputs():
    ds = TensorDataset(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="BatchNorm"):
        recalibrate_bn(MLPNet(), ds)
    with pytest.raises(ValueError, match="passes"):
        recalibrate_bn(resnet20(), TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4)), passes=0)
    with pytest.raises(TypeError, match="augment"):
        recalibrate_bn(resnet20(), TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4)), augment=3)
    with pytest.raises(TypeError, match="exact"):
        recalibrate_bn(resnet20(), TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4)), exact=1)
