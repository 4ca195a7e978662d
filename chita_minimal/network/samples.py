"""The data a user has, as the samples the gradients need: datasets, DataLoaders, iterables of batches;
(x, y) pairs, tuples of inputs, HF-style dicts; and the model output that the loss reads.

Accepted ``data``:

- an indexable dataset with a length (``TensorDataset``, a map-style ``Dataset``, a list of samples);
- a ``DataLoader`` over such a dataset: its dataset is used, so the samples (and X, for the same
  seed) are those of the dataset itself — the loader's batch size and order play no part;
- any other iterable of batches (a generator, a ``DataLoader`` over an ``IterableDataset``): the
  batches are split into samples and the first ``need`` samples are kept.

A sample is ``(inputs, target)`` — ``inputs`` a tensor, a tuple of tensors (the model is called
as ``model(*inputs)``) or a dict (``model(**inputs)``) — or a dict holding the target under
``"labels"`` (or ``"label"``) beside the model's keyword inputs, as Hugging Face datasets do.
The model's output goes through ``output_fn`` before the loss; the default takes ``.logits``,
``["logits"]`` or the first element of a tuple, and a plain tensor as it is.
"""

from __future__ import annotations

import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, IterableDataset

LABEL_KEYS = ("labels", "label")


class SampleList(Dataset):
    """Samples collected from an iterable of batches (an indexable dataset in memory)."""

    def __init__(self, samples: list):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def is_indexable(data) -> bool:
    return hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (IterableDataset, dict))


def as_dataset(data, need: int | None = None, *, arg: str = "dataset"):
    """An indexable dataset from ``data`` (see the module docstring); ``need``: samples wanted from an iterable."""
    if isinstance(data, DataLoader) and is_indexable(data.dataset):
        return data.dataset
    if is_indexable(data):
        return data
    if not hasattr(data, "__iter__") or isinstance(data, (str, bytes, torch.Tensor)):
        raise TypeError(f"{arg} must be an indexable dataset, a DataLoader or an iterable of batches, "
                        f"got {type(data).__name__}")
    samples = []
    for batch in data:
        samples.extend(unbatch(batch))
        if need is not None and len(samples) >= need:
            return SampleList(samples[:need])
    if not samples:
        raise ValueError(f"{arg} yielded no samples")
    return SampleList(samples)


def leading_size(tree) -> int:
    """Size of the first (batch) dimension of a tensor, or of the first leaf of a tuple / dict of them."""
    if isinstance(tree, torch.Tensor):
        return tree.shape[0]
    if isinstance(tree, dict):
        return leading_size(next(iter(tree.values())))
    if isinstance(tree, (tuple, list)):
        return leading_size(tree[0])
    raise TypeError(f"a batch must hold tensors, tuples or dicts of tensors, got {type(tree).__name__}")


def index(tree, i):
    """Entry ``i`` (an int or an index tensor) of every tensor leaf of a batch."""
    if isinstance(tree, torch.Tensor):
        return tree[i]
    if isinstance(tree, dict):
        return {k: index(v, i) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(index(v, i) for v in tree)
    raise TypeError(f"a batch must hold tensors, tuples or dicts of tensors, got {type(tree).__name__}")


def unbatch(batch) -> list:
    """The samples of one batch: entry i of every leaf (the batch dimension is the first)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and not isinstance(batch[0], (int, float)):
        n = leading_size(batch[0])
        return [(index(batch[0], i), index(batch[1], i)) for i in range(n)]
    if isinstance(batch, dict):
        return [index(batch, i) for i in range(leading_size(batch))]
    raise TypeError("a batch must be a pair (inputs, targets) or a dict with a 'labels' entry, "
                    f"got {type(batch).__name__}")


def split_sample(item):
    """(inputs, target) of one sample in any accepted form."""
    if isinstance(item, dict):
        key = next((k for k in LABEL_KEYS if k in item), None)
        if key is None:
            raise ValueError(f"a dict sample needs its target under one of {LABEL_KEYS}, got keys {sorted(item)}")
        return {k: v for k, v in item.items() if k != key}, item[key]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise ValueError(f"dataset items must be (x, y) pairs or dicts with a 'labels' entry, got {type(item).__name__}"
                     + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))


def stack(items: list):
    """Stack samples leaf by leaf into a batch (a new first dimension)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: stack([it[k] for it in items]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(stack([it[j] for it in items]) for j in range(len(first)))
    return torch.stack([torch.as_tensor(it) for it in items])


def apply(tree, fn):
    """``fn`` on every tensor leaf."""
    if isinstance(tree, dict):
        return {k: apply(v, fn) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(apply(v, fn) for v in tree)
    return fn(tree)


def call(model, inputs, params=None):
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)``; with ``params`` through ``functional_call``."""
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (tuple(inputs), {}) \
        if isinstance(inputs, (tuple, list)) else ((inputs,), {})
    if params is None:
        return model(*args, **kwargs)
    return functional_call(model, params, args, kwargs)


def logits_of(output):
    """The default ``output_fn``: a tensor as it is, else ``.logits``, ``["logits"]`` or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(output).__name__}; "
                    "pass output_fn=... to pick them")
