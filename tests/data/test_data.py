"""Tests of chita_minimal.data.datasets: decoding, normalisation, hash checks, lookup errors, splits."""

import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from chita_minimal.data import datasets as data
from conftest import needs_cifar, needs_mnist

MNIST_NAMES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]



@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    monkeypatch.setenv("CHITA_NO_DOWNLOAD", "1")  # tests never touch the network


@needs_mnist
@pytest.mark.parametrize("split, n, first", [("train", 60000, [5, 0, 4, 1, 9]), ("test", 10000, [7, 2, 1, 0, 4])])
def test_mnist_shapes_labels_normalisation(split, n, first):
    ds = data.load("mnist", split)
    x, y = ds.tensors
    assert isinstance(ds, TensorDataset)
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert y[:5].tolist() == first
    assert set(y.unique().tolist()) == set(range(10))
    # background pixels (0) map to -0.1307/0.3081, ink (255) to (1-0.1307)/0.3081
    assert x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    assert x.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-6)
    if split == "train":  # the constants are the training set's mean / std
        assert x.mean().item() == pytest.approx(0.0, abs=1e-3)
        assert x.std().item() == pytest.approx(1.0, abs=1e-3)


@needs_mnist
def test_mnist_class_counts_and_none_normalisation():
    x, y = data.load("mnist", "test", normalization="none").tensors
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert x.min().item() == 0.0 and x.max().item() == 1.0


@needs_cifar
@pytest.mark.parametrize("split, n, first", [("train", 50000, [6, 9, 9, 4, 1]), ("test", 10000, [3, 8, 8, 0, 6])])
def test_cifar_shapes_labels(split, n, first):
    x, y = data.load("cifar10", split).tensors
    assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert y[:5].tolist() == first
    assert torch.bincount(y).tolist() == [n // 10] * 10
    assert x.min().item() == -1.0 and x.max().item() == 1.0  # mean 0.5 / std 0.5


@needs_cifar
def test_cifar_pixels_and_normalisations():
    raw, _ = data.load("cifar10", "train", normalization="none").tensors
    # first image: R plane starts 59, 43, 50; B plane ends 140, 84, 72 (the known values)
    assert (raw[0, 0, 0, :3] * 255).round().tolist() == [59, 43, 50]
    assert (raw[0, 2, -1, -3:] * 255).round().tolist() == [140, 84, 72]
    mean = raw.mean(dim=(0, 2, 3))
    assert mean.tolist() == pytest.approx([0.4914, 0.4822, 0.4465], abs=1e-4)
    x, _ = data.load("cifar10", "train", normalization="cifar").tensors
    cmean, cstd = data.NORMALIZATIONS["cifar10"]["cifar"]
    expected = (raw[:10] - torch.tensor(cmean).view(1, 3, 1, 1)) / torch.tensor(cstd).view(1, 3, 1, 1)
    torch.testing.assert_close(x[:10], expected)
    assert x.mean(dim=(0, 2, 3)).abs().max().item() < 1e-3


@needs_mnist
def test_repeated_load_is_cached_and_independent():
    a = data.load("mnist", "test")
    b = data.load("mnist", "test")
    assert torch.equal(a.tensors[0], b.tensors[0])
    a.tensors[0][0] += 1.0  # a caller modifying its copy must not change later loads
    c = data.load("mnist", "test")
    assert torch.equal(c.tensors[0], b.tensors[0])


def _local_path(rel):
    """Path of a file of the local data folder ($CHITA_DATA_DIR, else ../shared/data), or skip."""
    folder = Path(os.environ["CHITA_DATA_DIR"]) if os.environ.get("CHITA_DATA_DIR") else data._repo_data_dir()
    if not (folder / rel).is_file():
        pytest.skip(f"{rel} not found in {folder}")
    return folder / rel


@needs_mnist
def test_corrupted_mnist_file_raises(tmp_path):
    x_ok = data.load("mnist", "test").tensors[0]
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in MNIST_NAMES[2:]:
        shutil.copy(_local_path(f"mnist/{name}"), folder / name)
    torch.testing.assert_close(data.load("mnist", "test", root=tmp_path, download=False).tensors[0], x_ok)
    target = folder / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:-100])  # truncate
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz") as info:
        data.load("mnist", "test", root=tmp_path, download=False)
    assert data._SHA256["mnist/t10k-images-idx3-ubyte.gz"] in str(info.value)  # names the expected hash


@needs_cifar
def test_corrupted_cifar_file_raises(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    good = _local_path("cifar10/cifar-10-batches-py/test_batch")
    blob = bytearray(good.read_bytes())
    blob[5000] ^= 0xFF  # one flipped byte in the pixels: same size, wrong content
    (folder / "test_batch").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="test_batch"):
        data.load("cifar10", "test", root=tmp_path, download=False)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_restricted_unpickler_refuses_other_globals():
    blob = pickle.dumps({"data": _Evil()}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing.*\.print"):
        data._NumpyOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()


def test_empty_folder_without_download_raises(tmp_path, monkeypatch):
    monkeypatch.delenv("CHITA_NO_DOWNLOAD")
    for name in ["mnist", "cifar10"]:
        with pytest.raises(FileNotFoundError) as info:
            data.load(name, "test", root=tmp_path, download=False)
        msg = str(info.value)
        assert str(tmp_path) in msg and "CHITA_DATA_DIR" in msg and "download" in msg


def test_env_no_download_and_env_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHITA_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data, "_cache_dir", lambda: tmp_path / "cache")  # ignore earlier downloads
    with pytest.raises(FileNotFoundError) as info:
        data.load("mnist", "train")  # download=True, but CHITA_NO_DOWNLOAD=1
    msg = str(info.value)
    assert str(tmp_path) in msg and str(tmp_path / "cache") in msg and "CHITA_NO_DOWNLOAD" in msg


@pytest.mark.parametrize("kwargs", [dict(name="imagenet", split="test"), dict(name="mnist", split="val"),
                                    dict(name="mnist", split="test", normalization="cifar"),
                                    dict(name="cifar10", split="test", normalization="imagenet")])
def test_bad_names_raise(kwargs):
    name, split = kwargs.pop("name"), kwargs.pop("split")
    with pytest.raises(ValueError, match="name|split|normalization"):
        data.load(name, split, **kwargs)


def _toy(n=100):
    return TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n) % 10)


def test_split_is_seeded_disjoint_and_complete():
    ds = _toy()
    tr, va = data.split(ds, 20, seed=3)
    assert len(tr) == 80 and len(va) == 20
    a, b = tr.tensors[0].flatten().long(), va.tensors[0].flatten().long()
    assert sorted(a.tolist() + b.tolist()) == list(range(100))
    assert torch.equal(tr.tensors[1], a % 10)  # labels travel with their inputs
    tr2, va2 = data.split(ds, 20, seed=3)
    assert torch.equal(va2.tensors[0], va.tensors[0])
    _, va3 = data.split(ds, 20, seed=4)
    assert not torch.equal(va3.tensors[0], va.tensors[0])
    assert b.tolist() != list(range(20))  # random, not the first samples


def test_subset_is_seeded():
    ds = _toy()
    s1, s2, s3 = data.subset(ds, 30, seed=0), data.subset(ds, 30, seed=0), data.subset(ds, 30, seed=1)
    assert len(s1) == 30 and torch.equal(s1.tensors[0], s2.tensors[0])
    assert not torch.equal(s1.tensors[0], s3.tensors[0])
    assert len(set(s1.tensors[0].flatten().tolist())) == 30
    assert len(data.subset(ds, 100)) == 100


@pytest.mark.parametrize("size", [0, 100, 101, -1])
def test_split_bad_sizes(size):
    with pytest.raises(ValueError, match="val_size"):
        data.split(_toy(), size)


@pytest.mark.parametrize("size, exc", [(0, ValueError), (101, ValueError), (2.5, TypeError), (True, TypeError)])
def test_subset_bad_sizes(size, exc):
    with pytest.raises(exc, match="size"):
        data.subset(_toy(), size)


def test_split_needs_tensor_dataset():
    with pytest.raises(TypeError, match="dataset"):
        data.split([1, 2, 3], 1)


def test_download_path_with_a_fake_pooch(tmp_path, monkeypatch):
    """The download branch (no network here): pooch.retrieve is replaced by a local copy."""
    import pooch

    calls = []
    sources = {name: _local_path(f"mnist/{name}") for name in MNIST_NAMES}

    def fake_retrieve(url, known_hash, fname, path, **kwargs):
        calls.append((url, known_hash))
        Path(path).mkdir(parents=True, exist_ok=True)
        shutil.copy(sources[fname], Path(path) / fname)
        return str(Path(path) / fname)

    monkeypatch.delenv("CHITA_NO_DOWNLOAD")
    monkeypatch.setenv("CHITA_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(data, "_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    ds = data.load("mnist", "test")
    assert calls == [("https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz",
                      "sha256:" + data._SHA256["mnist/t10k-images-idx3-ubyte.gz"]),
                     ("https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz",
                      "sha256:" + data._SHA256["mnist/t10k-labels-idx1-ubyte.gz"])]
    assert (tmp_path / "cache" / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file()
    assert ds.tensors[1][:5].tolist() == [7, 2, 1, 0, 4]
    # later, with downloads off, the cache is found without calling pooch
    monkeypatch.setenv("CHITA_NO_DOWNLOAD", "1")
    calls.clear()
    assert torch.equal(data.load("mnist", "test").tensors[0], ds.tensors[0]) and calls == []
