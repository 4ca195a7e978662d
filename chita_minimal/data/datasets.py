"""MNIST and CIFAR-10 as in-memory TensorDatasets, read from their original files.

    ds = load("mnist", "test")          # images (10000, 1, 28, 28) float32, labels (10000,) int64
    x, y = ds.tensors

Where the files come from (first match wins):

1. the ``root`` argument, if given (only that folder, then a download if allowed);
2. else ``$CHITA_DATA_DIR``;
3. else ``<repo root>/../shared/data`` (the offline copies next to this repository), if it exists and
   ``CHITA_NO_SHARED`` is not set;
4. else files downloaded earlier into the pooch cache (``pooch.os_cache("chita_minimal")``);
5. else a download from the public source into that cache, unless ``download=False`` or
   ``CHITA_NO_DOWNLOAD=1``; ``CHITA_DOWNLOAD_BASE_URL`` points it at a mirror (see data/files.py).

A data folder holds ``mnist/<the four .gz files>`` and
``cifar10/cifar-10-batches-py/<batch files>``. Every file is hash-checked before it is
read (SHA256 of the offline copies, or the published hashes of the originals); a
truncated or corrupted file raises ValueError and is never used.
"""

from __future__ import annotations

import functools
import gzip
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from chita_minimal.data.files import candidate_folders, download_allowed, file_hash, import_pooch, retrieve, shared_dir
from chita_minimal.utils import check_int

DATASETS = ("mnist", "cifar10")
SPLITS = ("train", "test")

# Per-channel (mean, std) applied to pixels scaled to [0, 1].
NORMALIZATIONS = {
    "mnist": {"default": ((0.1307,), (0.3081,)), "none": ((0.0,), (1.0,))},
    "cifar10": {
        # What the shared ResNet20 checkpoint's BatchNorm statistics expect (91.43 % as shipped).
        "default": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        # The CHITA authors' code (needs BatchNorm recalibration with that checkpoint).
        "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    },
}

_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_MNIST_FILES = {  # split -> (images, labels), relative to the data folder
    "train": ("mnist/train-images-idx3-ubyte.gz", "mnist/train-labels-idx1-ubyte.gz"),
    "test": ("mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz"),
}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_DIR = "cifar10/cifar-10-batches-py"
_CIFAR_FILES = {
    "train": tuple(f"{_CIFAR_DIR}/data_batch_{i}" for i in range(1, 6)),
    "test": (f"{_CIFAR_DIR}/test_batch",),
}

# SHA256 of the files in shared/data (shared/data/SHA256SUMS). The MNIST files are
# byte-identical to the originals, so these also check a fresh download.
_SHA256 = {
    "mnist/train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "mnist/train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "mnist/t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "mnist/t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    f"{_CIFAR_DIR}/data_batch_1": "97eb99a2344a0ed65bb1b365c051d63e1c8f6dfd9e75ae667b209f9edd32b829",
    f"{_CIFAR_DIR}/data_batch_2": "d9fab1d3901e8b396ca3bf5918bf4057953a3c37b80d6d7dec3ed3067cd866ed",
    f"{_CIFAR_DIR}/data_batch_3": "8577377d5e96c4ba2b8a06c256641c528f6df43fddbf658e7f67528844b51c87",
    f"{_CIFAR_DIR}/data_batch_4": "9c51e9142590f5b7fe437d7ae5029a1f9a1ee2c2c6a18d5836565ea179fb153d",
    f"{_CIFAR_DIR}/data_batch_5": "1c5976a0810f245c73a23e666c39b0dedd9a8d77aeaaba50bd2b08ebdc7d6f88",
    f"{_CIFAR_DIR}/test_batch": "e9bae6029d52dda61087195bc78f5c299391e33bde08c8083ae0afb0fc2d24ee",
}
# Published MD5s of the original CIFAR-10 batch files (the list torchvision checks).
# The offline copies differ from the originals only in their placeholder file names.
_MD5_ORIGINAL = {
    f"{_CIFAR_DIR}/data_batch_1": "c99cafc152244af753f735de768cd75f",
    f"{_CIFAR_DIR}/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    f"{_CIFAR_DIR}/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    f"{_CIFAR_DIR}/data_batch_4": "634d18415352ddfa80567beed471001a",
    f"{_CIFAR_DIR}/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    f"{_CIFAR_DIR}/test_batch": "40351d587109b95175f43aff81a1287e",
}


# ----------------------------------------------------------------------------- hashing


def _check_file(path: Path, rel: str) -> None:
    """Raise ValueError unless ``path`` (data-folder entry ``rel``) has a known good hash."""
    sha = file_hash(path, "sha256")
    if sha == _SHA256[rel]:
        return
    if rel in _MD5_ORIGINAL and file_hash(path, "md5") == _MD5_ORIGINAL[rel]:
        return
    also = f" (or the original's MD5 {_MD5_ORIGINAL[rel]})" if rel in _MD5_ORIGINAL else ""
    raise ValueError(
        f"data file {path} is corrupted or truncated: its SHA256 is {sha}, expected "
        f"{_SHA256[rel]}{also}. Delete it and provide a good copy (or let it be downloaded again)."
    )


# ----------------------------------------------------------------------------- decoding


@functools.lru_cache(maxsize=None)
def _mnist_arrays(image_path: str, label_path: str, _stamp) -> tuple[np.ndarray, np.ndarray]:
    """Raw MNIST arrays: images (N, 28, 28) uint8, labels (N,) uint8 (read-only)."""
    with gzip.open(image_path, "rb") as f:
        raw = f.read()
    magic, n, rows, cols = np.frombuffer(raw, ">i4", count=4)
    if magic != 2051 or len(raw) != 16 + n * rows * cols:
        raise ValueError(f"{image_path} is not a complete IDX image file (magic {magic}, {len(raw)} bytes)")
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols)
    with gzip.open(label_path, "rb") as f:
        raw = f.read()
    magic, m = np.frombuffer(raw, ">i4", count=2)
    if magic != 2049 or m != n or len(raw) != 8 + m:
        raise ValueError(f"{label_path} is not a complete IDX label file for {n} images")
    labels = np.frombuffer(raw, np.uint8, offset=8)
    return images, labels


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batch files: refuses every global but numpy's array rebuilders."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # name written by NumPy 1.x / Python 2
        ("numpy._core.multiarray", "_reconstruct"),  # the same function under NumPy 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a CIFAR batch file")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct  # NumPy >= 2
            except ImportError:  # pragma: no cover - NumPy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


@functools.lru_cache(maxsize=None)
def _cifar_arrays(paths: tuple[str, ...], _stamp) -> tuple[np.ndarray, np.ndarray]:
    """Raw CIFAR-10 arrays: images (N, 3, 32, 32) uint8, labels (N,) uint8 (read-only)."""
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)  # (10000, 3072): R plane, G plane, B plane
        lab = np.asarray(batch[b"labels"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lab) != len(data):
            raise ValueError(f"{path}: unexpected CIFAR batch layout, data {data.shape}, labels {lab.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    images, labels = np.concatenate(images), np.concatenate(labels)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


# ----------------------------------------------------------------------------- locating files


def _repo_data_dir() -> Path:
    return shared_dir("data")


def _cache_dir() -> Path:
    pooch = import_pooch()

    return Path(pooch.os_cache("chita_minimal"))


def _download(name: str, split: str) -> Path:
    """Fetch ``name``'s files into the pooch cache (hash-checked by pooch); return the cache folder."""
    pooch = import_pooch()

    cache = _cache_dir()
    if name == "mnist":
        for rel in _MNIST_FILES[split]:
            fname = rel.split("/")[-1]
            retrieve(_MNIST_URL + fname, f"sha256:{_SHA256[rel]}", fname, cache / "mnist")
    else:  # the archive unpacks to cifar10/cifar-10-batches-py/
        retrieve(_CIFAR_URL, f"md5:{_CIFAR_ARCHIVE_MD5}", "cifar-10-python.tar.gz", cache / "cifar10",
                 processor=pooch.Untar(extract_dir="."))
    return cache


def _find_files(name: str, split: str, root, download: bool) -> list[Path]:
    """The verified paths of the files for (name, split), or FileNotFoundError."""
    rels = _MNIST_FILES[split] if name == "mnist" else _CIFAR_FILES[split]
    folders = candidate_folders(root, "CHITA_DATA_DIR", _repo_data_dir(), _cache_dir())

    tried = []
    for folder in folders:
        missing = [rel for rel in rels if not (folder / rel).is_file()]
        if not missing:
            paths = [folder / rel for rel in rels]
            for path, rel in zip(paths, rels):
                _check_file(path, rel)
            return paths
        tried.append(f"{folder} (missing {', '.join(missing)})")

    if download_allowed(download):
        folder = _download(name, split)
        paths = [folder / rel for rel in rels]
        for path, rel in zip(paths, rels):
            _check_file(path, rel)
        return paths

    why = "download=False" if not download else "CHITA_NO_DOWNLOAD is set"
    raise FileNotFoundError(
        f"{name} ({split}) data not found. Folders tried: {'; '.join(tried) or 'none'}. "
        f"Downloading was not tried ({why}). Provide the data by pointing root= or the environment "
        f"variable CHITA_DATA_DIR at a folder laid out as mnist/<the four .gz files> and "
        f"cifar10/cifar-10-batches-py/<batch files>, or allow the download (download=True, "
        f"CHITA_NO_DOWNLOAD unset)."
    )


# ----------------------------------------------------------------------------- public API


def load(name: str, split: str, *, root=None, normalization: str = "default", download: bool = True) -> TensorDataset:
    """Load a data set split as a TensorDataset (images float32, labels int64).

    Args:
        name: "mnist" or "cifar10" (or "wikitext-2": then split is "valid" or "test" and the split's text is
            returned as a str, see :mod:`chita_minimal.data.text`).
        split: "train" or "test".
        root: data folder to use (contains ``mnist/`` and/or ``cifar10/``); see the module
            docstring for the lookup order when it is None.
        normalization: "default" (MNIST mean 0.1307 / std 0.3081; CIFAR-10 mean 0.5 / std 0.5,
            what the shared ResNet20 checkpoint expects), "cifar" (CIFAR-10 only: mean
            (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010), the authors' code) or
            "none" (pixels scaled to [0, 1]).
        download: whether a download may be tried when no local copy is found
            (``CHITA_NO_DOWNLOAD=1`` also turns it off).

    Returns:
        TensorDataset of images (N, 1, 28, 28) for MNIST or (N, 3, 32, 32) for CIFAR-10,
        float32, and labels (N,) int64.
    """
    if name == "wikitext-2":  # text for language models: the split's text as a str
        from chita_minimal.data.text import load_text

        return load_text(name, split, root=root, download=download)
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS + ('wikitext-2',)}, got {name!r}")
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(normalization, str) or normalization not in NORMALIZATIONS[name]:
        raise ValueError(
            f"normalization for {name} must be one of {tuple(NORMALIZATIONS[name])}, got {normalization!r}")

    paths = _find_files(name, split, root, download)
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if name == "mnist":
        images, labels = _mnist_arrays(str(paths[0]), str(paths[1]), stamp)
        images = images[:, None]  # (N, 1, 28, 28)
    else:
        images, labels = _cifar_arrays(tuple(str(p) for p in paths), stamp)  # (N, 3, 32, 32)

    mean, std = NORMALIZATIONS[name][normalization]
    mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    x = (images.astype(np.float32) / np.float32(255.0) - mean) / std  # new float32 array
    y = labels.astype(np.int64)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def _check_dataset(dataset) -> int:
    if not isinstance(dataset, TensorDataset):
        raise TypeError(f"dataset must be a torch.utils.data.TensorDataset, got {type(dataset).__name__}")
    return len(dataset)


def _take(dataset: TensorDataset, idx: torch.Tensor) -> TensorDataset:
    return TensorDataset(*(t[idx] for t in dataset.tensors))


def split(dataset: TensorDataset, val_size: int, *, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Split a dataset into (train_part, val_part) at random, deterministically for a seed.

    ``val_size`` samples go to the validation part and the rest to the training part;
    each part keeps the original order of its samples.
    """
    n = _check_dataset(dataset)
    val_size = check_int("val_size", val_size, low=1, high=n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return _take(dataset, train_idx), _take(dataset, val_idx)


def subset(dataset: TensorDataset, size: int, *, seed: int = 0) -> TensorDataset:
    """A random subset of ``size`` samples (in their original order), deterministic for a seed."""
    n = _check_dataset(dataset)
    size = check_int("size", size, low=1, high=n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return _take(dataset, perm[:size].sort().values)
