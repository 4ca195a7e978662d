"""Fine-tuning with the pruned weights held at zero (masks kept by :class:`~chita_minimal.network.params.MaskKeeper`).

    losses = train_epochs(model, train, epochs=2, lr=0.01, masks=report.masks)

Under ``torch.distributed`` training uses ``DistributedDataParallel`` (see :mod:`chita_minimal.scale.distributed`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from chita_minimal.network.loop import running_sum
from chita_minimal.network.params import MaskKeeper
from chita_minimal.scale import distributed

LR_SCHEDULES = ("cosine", "constant")


def train_epochs(model: nn.Module, dataset, epochs: int, *, lr: float, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = True, batch_size: int = 128, masks=None,
                 augment=None, lr_schedule: str = "cosine", lr_end: float = 0.0, seed: int = 0,
                 progress: bool = True) -> list[float]:
    """SGD on ``dataset`` (a TensorDataset) for ``epochs`` epochs; returns the mean loss of each epoch.

    ``masks`` (name → bool, True = kept) are held at zero throughout. ``augment(x, generator)``
    transforms each batch (e.g. :func:`chita_minimal.network.evaluate.cifar_augment`). The learning rate
    follows ``lr_schedule`` over all steps ("cosine" from ``lr`` to ``lr_end``, or "constant").
    Batches come from a permutation drawn with ``seed`` + epoch. Under a process group each rank
    takes an equal slice of every batch and the model is wrapped in DistributedDataParallel, so
    the gradient of each step is that of the whole batch, as with one process.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if not hasattr(dataset, "tensors") or len(dataset) == 0:
        raise TypeError("dataset must be a non-empty TensorDataset (inputs, labels)")
    rank, world = distributed.rank_and_world()
    if batch_size % world:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world})")
    if epochs == 0:
        return []
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov and momentum > 0)
    X, Y = dataset.tensors[0], dataset.tensors[1]
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    total = epochs * steps_per_epoch
    keeper = MaskKeeper(model, masks) if masks else None
    was_training = model.training
    model.train()
    losses = []
    step = 0
    try:
        for epoch in range(epochs):
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(len(dataset), generator=gen)
            run, seen = running_sum(device), 0  # on the device: no host sync per step
            bar = tqdm(range(0, len(order), batch_size), desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                       disable=not progress or rank != 0, leave=False)
            for start in bar:
                idx = order[start:start + batch_size]
                lo, hi = distributed.row_range(len(idx), rank, world)  # this rank's slice of the batch
                idx = idx[lo:hi]
                x, y = X[idx], Y[idx]
                if augment is not None:
                    x = augment(x, gen)
                x = x.to(device, dtype=dtype) if x.is_floating_point() else x.to(device)
                y = y.to(device)
                if lr_schedule == "cosine":
                    for group in opt.param_groups:
                        group["lr"] = lr_end + (lr - lr_end) * 0.5 * (1 + math.cos(math.pi * step / total))
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                opt.step()
                if keeper is not None:
                    keeper.apply()
                run += loss.detach().to(run.dtype) * len(idx)
                seen += len(idx)
                step += 1
                if not bar.disable and (step % 20 == 0 or start + batch_size >= len(order)):
                    bar.set_postfix(loss=f"{float(run) / max(seen, 1):.4f}")
            losses.append(float(run) / max(seen, 1))
    finally:
        if keeper is not None:
            keeper.remove()
        model.train(was_training)
    return losses
