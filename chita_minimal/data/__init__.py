"""Data: MNIST and CIFAR-10 readers (``load``, ``split``, ``subset``), the ImageNet folder reader, and the
lookup of local files (configured folder → ``../shared`` → hash-checked download).

| module | what |
|---|---|
| ``datasets`` | MNIST idx / CIFAR-10 pickles as ``TensorDataset``; splits and subsets |
| ``imagenet`` | ImageNet ``ImageFolder`` reader (``$CHITA_IMAGENET_DIR``) and dense checkpoint loader |
| ``text`` | WikiText-2 (tokenized) and token windows for language models |
| ``files`` | where files are looked for, hashing, downloads with pooch |
"""

from chita_minimal.data.datasets import DATASETS, NORMALIZATIONS, SPLITS, load, split, subset
from chita_minimal.utils import lazy_submodules

__getattr__ = lazy_submodules(__name__, ("datasets", "imagenet", "files", "text"))

__all__ = ["DATASETS", "NORMALIZATIONS", "SPLITS", "load", "split", "subset"]
