"""ImageNet in the ImageFolder layout (read with Pillow) and the dense ImageNet checkpoints.

    train = imagenet.load("train")        # $CHITA_IMAGENET_DIR/train/<class>/<image>
    val = imagenet.load("val")            # $CHITA_IMAGENET_DIR/val/<class>/<image>
    model = imagenet.load_model("resnet50", "/path/to/resnet50-0676ba61.pth")

ImageNet cannot be downloaded automatically (its licence needs a login), so nothing here
downloads: point ``$CHITA_IMAGENET_DIR`` (or ``root=``) at a folder with ``train/`` and ``val/``,
each holding one sub-folder per class (the layout of torchvision's ImageFolder; class index =
position of the folder name in sorted order, which for the synset folders n01440764 … gives the
standard 1000 labels). Images are decoded on access: shorter side resized to ``resize``, centre
crop ``size``, scaled to [0, 1] and normalised with the ImageNet mean and std — the evaluation
transform of the dense checkpoints below. (No training augmentation: here images are used
for gradients, calibration and evaluation.)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from chita_minimal.models import mobilenet_v1, resnet50

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".webp")
SPLITS = ("train", "val")

# Dense checkpoints of the paper's ImageNet experiments. The CHITA authors (like WoodFisher and
# M-FAC before them) use the STR dense checkpoints (Kusupati et al. 2020, github.com/RAIVNLab/STR):
# MobileNetV1 71.95 % and ResNet50 77.01 % top-1. torchvision's ResNet50 (76.13 %) has the same
# layout. The file is read with weights_only=True and must match our architecture key for key.
# ``sha256_prefix``: the leading hex digits of the file's SHA256 where they are published (torchvision
# puts them in the file name); files without a published hash are loaded after the key/shape check only.
CHECKPOINTS = {
    "resnet50": {
        "url": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "sha256_prefix": "0676ba61",
        "top1": 76.13,
        "note": "torchvision ResNet50 (IMAGENET1K_V1); the STR checkpoint ResNet50-Dense.pth (77.01 %) loads too",
    },
    "mobilenet_v1": {
        "url": "https://github.com/RAIVNLab/STR (release files: MobileNetV1-Dense-STR.pth)",
        "sha256_prefix": None,
        "top1": 71.95,
        "note": "STR dense MobileNetV1 (keys prefixed 'module.', stored under 'state_dict')",
    },
}


def _root(root) -> Path:
    if root is None:
        env = os.environ.get("CHITA_IMAGENET_DIR")
        if not env:
            raise FileNotFoundError(
                "ImageNet not found: set the environment variable CHITA_IMAGENET_DIR (or pass root=) to a folder "
                "with train/ and val/ in the ImageFolder layout (one sub-folder per class). ImageNet is not "
                "downloaded automatically; get it from https://image-net.org (a free account is needed).")
        root = env
    return Path(root)


def preprocess(image, size: int = 224, resize: int = 256) -> torch.Tensor:
    """A PIL image → (3, size, size) float32: shorter side to ``resize``, centre crop, ImageNet normalisation."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = resize / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / np.float32(255.0)).permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


class ImageFolder(Dataset):
    """Images in ``root/<class>/<file>``; item i is (image (3, size, size) float32, label int64 tensor)."""

    def __init__(self, root, *, size: int = 224, resize: int = 256):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        if not (isinstance(size, int) and isinstance(resize, int) and 0 < size <= resize):
            raise ValueError(f"need ints 0 < size <= resize, got size={size!r}, resize={resize!r}")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
        self.samples = [(f, label) for label, c in enumerate(self.classes)
                        for f in sorted((root / c).iterdir()) if f.suffix.lower() in EXTENSIONS]
        if not self.samples:
            raise ValueError(f"{root} has class folders but no images ({', '.join(EXTENSIONS)})")
        self.root, self.size, self.resize = root, size, resize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as image:
            return preprocess(image, self.size, self.resize), torch.tensor(label)


def load(split: str, *, root=None, size: int = 224, resize: int = 256) -> ImageFolder:
    """The ``split`` ("train" or "val") of the ImageNet folder at ``root`` or ``$CHITA_IMAGENET_DIR``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = _root(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: the ImageNet folder must hold train/ and val/, "
                                "each with one sub-folder per class")
    return ImageFolder(folder, size=size, resize=resize)


ARCHITECTURES = {"resnet50": resnet50, "mobilenet_v1": mobilenet_v1}


def load_model(name: str, path, *, device=None) -> torch.nn.Module:
    """A dense ImageNet network from a checkpoint file (see :data:`CHECKPOINTS`), in eval mode.

    The file is read with ``torch.load(..., weights_only=True)``; a ``state_dict`` entry and a
    ``module.`` prefix (DataParallel) are unwrapped; keys and shapes must match exactly. When the
    checkpoint's SHA256 prefix is known it is checked first.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"name must be one of {tuple(ARCHITECTURES)}, got {name!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; get it from {CHECKPOINTS[name]['url']}")
    prefix = CHECKPOINTS[name]["sha256_prefix"]
    if prefix:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(prefix):
            raise ValueError(f"{path}: SHA256 {digest[:16]}… does not start with the published {prefix}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = ARCHITECTURES[name]()
    model.load_state_dict(state, strict=True)
    return (model.to(device) if device is not None else model).eval()
