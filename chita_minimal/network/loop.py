"""The SGD loop shared by the sparse-training methods (RigL, L0, GaP, EarlyCroP) and SMCP.

Their conventions are those of :func:`chita_minimal.network.finetune.train_epochs`: SGD on a
TensorDataset, batches from a permutation drawn with ``seed`` + epoch, cross-entropy loss and a
cosine learning rate from ``lr`` to 0 over all steps. Each method masks the gradients of its own
between :func:`forward_backward` and ``opt.step()``. The loop around it is the same for all (``model_mode`` from
:mod:`chita_minimal.utils`)::

    with model_mode(model, training=True):
        for epoch in range(epochs):
            batches = EpochBatches(dataset, batch_size, seed, epoch, device, dtype, f"rigl {epoch + 1}/{epochs}")
            for x, y in batches:
                loss = forward_backward(model, opt, x, y, cosine_lr(lr, step, total))
                ...                                   # the method's own masking, opt.step(), its schedule
                batches.add(loss, len(y))
            losses.append(batches.mean)
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from chita_minimal.network import params
from chita_minimal.solver.problem import num_kept
from chita_minimal.utils import check_int, check_number


def setup(model, dataset, sparsity, epochs, lr, batch_size, names, device):
    """Validate the shared arguments; returns (names, device). Moves the model if ``device`` is given."""
    if not isinstance(model, nn.Module) or next(model.parameters(), None) is None:
        raise TypeError(f"model must be a torch.nn.Module with parameters, got {type(model).__name__}")
    if not isinstance(dataset, torch.utils.data.TensorDataset):
        raise TypeError(f"dataset must be a TensorDataset (inputs, labels), got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    num_kept(sparsity, 1)  # TypeError / ValueError unless 0 <= sparsity < 1
    check_int("epochs", epochs)
    check_number("lr", lr, 0, low_open=True)
    check_int("batch_size", batch_size)
    names = params.resolve(model, names)
    if device is not None:
        model.to(device)
    return names, next(model.parameters()).device


def epoch_batches(dataset, batch_size, seed, epoch, device, dtype):
    """(x, y) batches of one epoch, in a permutation drawn with seed and epoch (as train_epochs)."""
    X, Y = dataset.tensors[0], dataset.tensors[1]
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x = X[idx]
        yield (x.to(device, dtype=dtype) if x.is_floating_point() else x.to(device)), Y[idx].to(device)


def running_sum(device) -> torch.Tensor:
    """A zero on ``device`` to sum per-batch losses into without a host sync per step: float64 (the sum a Python
    float would give), float32 on MPS (no float64)."""
    device = torch.device(device)
    return torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)


class EpochBatches:
    """The batches of one epoch (:func:`epoch_batches`) behind a progress bar (``progress``) that shows the running
    mean of the losses given to :meth:`add` (every 20 batches and at the last); ``mean`` is that mean over the
    epoch's samples. The sum stays on the device: reading ``mean`` is the one host sync."""

    def __init__(self, dataset, batch_size, seed, epoch, device, dtype, desc: str, progress: bool = False):
        self.total, self.seen, self.batches = running_sum(device), 0, 0
        self.bar = tqdm(epoch_batches(dataset, batch_size, seed, epoch, device, dtype), desc=desc, leave=False,
                        total=math.ceil(len(dataset) / batch_size), disable=not progress)

    def __iter__(self):
        return iter(self.bar)

    def add(self, loss: torch.Tensor, n: int) -> None:
        """Count a batch of ``n`` samples with mean loss ``loss``."""
        self.total += loss.detach().to(self.total.dtype) * n
        self.seen += n
        self.batches += 1
        if not self.bar.disable and (self.batches % 20 == 0 or self.batches == self.bar.total):
            self.bar.set_postfix(loss=f"{self.mean:.4f}")

    @property
    def mean(self) -> float:
        return float(self.total) / self.seen


def cosine_lr(lr, step, total):
    """The learning rate at ``step`` of ``total``: cosine from ``lr`` down to 0."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / total))


def forward_backward(model, opt, x, y, lr):
    """The first half of an SGD step: set the learning rate ``lr`` on every group, clear the
    gradients, cross-entropy forward and backward. Returns the loss; the caller masks the
    gradients and calls ``opt.step()``."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss
