"""Pretrained dense networks of the CHITA paper: names → files, hashes, URLs.

    model = load_pretrained("mlpnet")     # MLPNet on MNIST, 93.97 % test accuracy
    model = load_pretrained("resnet20")   # ResNet20 on CIFAR-10, 91.43 % with data.load's default normalisation

Where the checkpoint comes from (first match wins):

1. the ``root`` argument, if given (only that folder, then a download if allowed);
2. else ``$CHITA_CHECKPOINT_DIR``;
3. else ``<repo root>/../shared/checkpoints`` (the offline copies next to this repository), if it exists and
   ``CHITA_NO_SHARED`` is not set;
4. else files downloaded earlier into ``pooch.os_cache("chita_minimal")/checkpoints``;
5. else a download of the authors' file (github.com/mazumder-lab/CHITA, ``checkpoints/``),
   unless ``download=False`` or ``CHITA_NO_DOWNLOAD=1``; ``CHITA_DOWNLOAD_BASE_URL`` points it at a mirror
   (see data/files.py).

Every file is SHA256-checked before ``torch.load(..., weights_only=True)``; nothing is
ever unpickled with ``weights_only=False``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from chita_minimal.data.files import (candidate_folders, download_allowed, download_url, file_hash, import_pooch,
                                     retrieve, shared_dir)
from chita_minimal.models.mlpnet import MLPNet
from chita_minimal.models.mobilenet import mobilenet_v1
from chita_minimal.models.resnet50 import resnet50
from chita_minimal.models.resnet_cifar import resnet20

# Names load_pretrained accepts, and the data set each was trained on.
MODEL_NAMES = ("mlpnet", "resnet20")
DATASETS = {"mlpnet": "mnist", "resnet20": "cifar10"}

# Every architecture of the package: name → constructor, and the input shape (C, H, W) it expects.
ARCHITECTURES = {"mlpnet": MLPNet, "resnet20": resnet20, "mobilenet_v1": mobilenet_v1, "resnet50": resnet50}
INPUT_SHAPES = {
    "mlpnet": (1, 28, 28),
    "resnet20": (3, 32, 32),
    "mobilenet_v1": (3, 224, 224),
    "resnet50": (3, 224, 224),
}

_URL = "https://github.com/mazumder-lab/CHITA/raw/main/checkpoints/"
_SHA256 = {
    # derived here: plain state dict of the original's fcN._layer.weight tensors (no public URL)
    "mlpnet_mnist_state_dict.pt": "48ca50819ef565bc51f20067bfcca414e8e878be4c4f2dab28cae770374f05f6",
    "mnist_25_epoch_93.97.ckpt": "56083559fe28b22bf9fac71134322d7c4fe55ea5f7d6eba30b4c300783900f12",
    "resnet20_cifar10.pth.tar": "e08b9b71ee33c3abad25588ed63999501673c02f7809364e27d965399e58bf8b",
}
_LOCAL_FILES = {  # name → files usable from a local folder, preferred first
    "mlpnet": ("mlpnet_mnist_state_dict.pt", "mnist_25_epoch_93.97.ckpt"),
    "resnet20": ("resnet20_cifar10.pth.tar",),
}
_DOWNLOAD_FILE = {"mlpnet": "mnist_25_epoch_93.97.ckpt", "resnet20": "resnet20_cifar10.pth.tar"}


def _check_file(path: Path) -> None:
    sha = file_hash(path)
    expected = _SHA256[path.name]
    if sha != expected:
        raise ValueError(
            f"checkpoint {path} is corrupted, truncated or not the published file: its SHA256 is {sha}, "
            f"expected {expected}. Delete it and provide a good copy (or let it be downloaded again)."
        )


def _cache_dir() -> Path:
    pooch = import_pooch()

    return Path(pooch.os_cache("chita_minimal")) / "checkpoints"


def _repo_checkpoint_dir() -> Path:
    return shared_dir("checkpoints")


def _find_checkpoint(name: str, root, download: bool) -> Path:
    """Path of a hash-checked checkpoint file for ``name``, or FileNotFoundError."""
    folders = candidate_folders(root, "CHITA_CHECKPOINT_DIR", _repo_checkpoint_dir(), _cache_dir())

    for folder in folders:
        for fname in _LOCAL_FILES[name]:
            if (folder / fname).is_file():
                _check_file(folder / fname)
                return folder / fname

    if download_allowed(download):
        fname = _DOWNLOAD_FILE[name]
        path = Path(retrieve(_URL + fname, f"sha256:{_SHA256[fname]}", fname, _cache_dir()))
        _check_file(path)
        return path

    why = "download=False" if not download else "CHITA_NO_DOWNLOAD is set"
    raise FileNotFoundError(
        f"no checkpoint for {name!r} found (looked for {', '.join(_LOCAL_FILES[name])}) in: "
        f"{'; '.join(str(f) for f in folders)}. Downloading was not tried ({why}). Put the file in a folder "
        f"and pass root= or set CHITA_CHECKPOINT_DIR, or allow the download "
        f"(download=True, CHITA_NO_DOWNLOAD unset) of {download_url(_URL + _DOWNLOAD_FILE[name])}."
    )


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model state dict stored in a (hash-checked) checkpoint file, keys as in this package."""
    if path.name == "mlpnet_mnist_state_dict.pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    if path.name == "mnist_25_epoch_93.97.ckpt":
        # The original also pickles the optimizer and scheduler *classes* (not instances);
        # allow exactly those two globals, nothing else.
        with torch.serialization.safe_globals([torch.optim.SGD, torch.optim.lr_scheduler.ExponentialLR]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        sd = ckpt["model_state_dict"]  # module.fcN._layer.weight, module.fcN._weight_mask (all ones)
        return {f"fc{i}.weight": sd[f"module.fc{i}._layer.weight"] * sd[f"module.fc{i}._weight_mask"]
                for i in (1, 2, 3)}
    if path.name == "resnet20_cifar10.pth.tar":
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    raise ValueError(f"unknown checkpoint file {path}")  # pragma: no cover


def load_pretrained(name: str, *, root=None, device=None, download: bool = True) -> nn.Module:
    """A pretrained dense model of the paper, in eval mode.

    Args:
        name: one of ``MODEL_NAMES`` ("mlpnet": MLPNet on MNIST; "resnet20": ResNet20 on CIFAR-10), or a
            language model: "smollm2-135m" (SmolLM2-135M-Instruct, see :mod:`chita_minimal.models.language`) or
            a Hugging Face hub name (needs the hub); its tokenizer: :func:`~chita_minimal.models.load_tokenizer`.
        root: folder holding the checkpoint file(s); see the module docstring for the
            lookup order when it is None.
        device: where to put the model (default CPU).
        download: whether a download may be tried when no local copy is found
            (``CHITA_NO_DOWNLOAD=1`` also turns it off).

    Returns:
        The model with the checkpoint's weights (strictly matched), in eval mode.
    """
    from chita_minimal.models import language

    if isinstance(name, str) and (name in language.LANGUAGE_MODELS or "/" in name):
        model = language.load_language_model(name, root=root, download=download)
        return model if device is None else model.to(device)
    if not isinstance(name, str) or name not in MODEL_NAMES:
        raise ValueError(f"name must be one of {MODEL_NAMES + language.LANGUAGE_MODELS} (or a Hugging Face hub "
                         f"name such as 'facebook/opt-125m'), got {name!r}")
    path = _find_checkpoint(name, root, download)
    model = ARCHITECTURES[name]()
    model.load_state_dict(_state_dict(path), strict=True)
    if device is not None:
        model = model.to(device)
    return model.eval()
