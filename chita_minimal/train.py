"""Fine-tuning and gradual pruning: prune, fine-tune with the masks fixed, repeat (the paper's §5, Zhu & Gupta 2017).

    result = gradual(model, train, 0.9, method="chita-block", stages=5, epochs_per_stage=2,
                     eval_data=test, checkpoint="runs/resnet20_chita")

Stage t prunes the current network to the t-th sparsity of a schedule (default the cubic
``poly`` schedule of Zhu & Gupta), keeping every weight pruned earlier at zero, then trains
it with SGD for ``epochs_per_stage`` epochs while :class:`~chita_minimal.params.MaskKeeper`
holds the pruned weights at zero. With ``checkpoint`` a file is written after every stage,
and a rerun with the same arguments resumes after the last finished stage. Under
``torch.distributed`` the gradients and solves are sharded (see :mod:`chita_minimal.distributed`)
and fine-tuning uses ``DistributedDataParallel``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import distributed
from .evaluate import evaluate
from .params import MaskKeeper
from .prune import prune
from .schedules import schedule as make_schedule

LR_SCHEDULES = ("cosine", "constant")


def train_epochs(model: nn.Module, dataset, epochs: int, *, lr: float, momentum: float = 0.9,
                 weight_decay: float = 5e-4, nesterov: bool = True, batch_size: int = 128, masks=None,
                 augment=None, lr_schedule: str = "cosine", lr_end: float = 0.0, seed: int = 0,
                 progress: bool = True) -> list[float]:
    """SGD on ``dataset`` (a TensorDataset) for ``epochs`` epochs; returns the mean loss of each epoch.

    ``masks`` (name → bool, True = kept) are held at zero throughout. ``augment(x, generator)``
    transforms each batch (e.g. :func:`chita_minimal.evaluate.cifar_augment`). The learning rate
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
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    was_training = model.training
    model.train()
    losses = []
    step = 0
    try:
        for epoch in range(epochs):
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(len(dataset), generator=gen)
            # the running loss stays on the device (no host sync per step); float64 as a Python float would be
            run, seen = torch.zeros((), dtype=acc_dtype, device=device), 0
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
                run += loss.detach().to(acc_dtype) * len(idx)
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


@dataclass
class GradualResult:
    """What :func:`gradual` did: one dict per stage in ``history`` (sparsity, method, accuracies,
    epochs, seconds, resumed), the final ``masks``, and the total wall time of this call."""

    history: list[dict]
    masks: dict[str, torch.Tensor] = field(repr=False)
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float | None:
        return self.history[-1].get("accuracy") if self.history else None


def gradual(model: nn.Module, train, sparsity: float, *, method: str = "chita-block", stages: int = 5,
            schedule: str = "poly", base: float = 0.0, epochs_per_stage: int = 1, final_epochs: int = 0,
            lr: float = 0.01, lr_end: float = 0.0, batch_size: int = 128, momentum: float = 0.9,
            weight_decay: float = 5e-4, augment=None, n_grads: int = 1000, l2: float = 1e-3,
            prune_options: dict | None = None, eval_data=None, checkpoint=None, seed: int = 0,
            progress: bool = True) -> GradualResult:
    """Prune ``model`` gradually to ``sparsity`` with fine-tuning between the pruning steps.

    Args:
        method: the pruning step (any :func:`chita_minimal.prune` method; "chita-block" is the
            paper's choice for large networks, "mp" gives gradual magnitude pruning).
        stages, schedule, base: the sparsity targets, :func:`chita_minimal.schedule`
            (default: Zhu & Gupta's cubic schedule from ``base`` = 0). ``stages=1`` is
            one-shot pruning followed by fine-tuning.
        epochs_per_stage: SGD epochs after each pruning step; ``final_epochs`` more after the last.
        lr, lr_end, batch_size, momentum, weight_decay, augment: fine-tuning (see :func:`train_epochs`;
            the cosine schedule restarts at ``lr`` in every stage).
        n_grads, l2, prune_options: passed to :func:`chita_minimal.prune` (seed + stage as its seed).
        eval_data: if given, accuracy after pruning and after fine-tuning is recorded per stage.
        checkpoint: a directory; ``gradual.pt`` there holds the model, masks and history after
            each stage, and a rerun with the same arguments resumes from it.
    """
    if method == "chita++":
        raise ValueError("method 'chita++' is itself multi-stage; use its stage solver, e.g. method='chita-block'")
    targets = make_schedule(schedule, sparsity, stages, base)
    config = dict(sparsity=float(sparsity), method=method, stages=stages, schedule=schedule, base=float(base),
                  epochs_per_stage=epochs_per_stage, final_epochs=final_epochs, lr=float(lr), lr_end=float(lr_end),
                  batch_size=batch_size, momentum=float(momentum), weight_decay=float(weight_decay),
                  n_grads=n_grads, l2=float(l2), seed=seed)
    rank, _ = distributed.rank_and_world()
    path = None if checkpoint is None else Path(checkpoint) / "gradual.pt"
    history, masks, first = [], None, 0
    if path is not None and path.exists():
        state = torch.load(path, weights_only=True, map_location=next(model.parameters()).device)
        changed = [k for k in config if state["config"].get(k) != config[k]]
        if changed:
            raise ValueError(f"checkpoint {path} was written with different arguments: "
                             + ", ".join(f"{k} = {state['config'].get(k)!r} there, {config[k]!r} now" for k in changed)
                             + "; use another checkpoint directory or delete the file")
        model.load_state_dict(state["model"])
        history, masks = state["history"], state["masks"]
        first = len(history)
        for h in history:
            h["resumed"] = True
    t_all = time.perf_counter()
    for t in range(first, stages):
        t0 = time.perf_counter()
        report = prune(model, train, targets[t], method, n_grads=n_grads, l2=l2, seed=seed + t, keep_pruned=True,
                       **(prune_options or {}))
        masks = report.masks
        row = dict(stage=t, sparsity=targets[t], method=method, achieved_sparsity=report.achieved_sparsity,
                   prune_seconds=report.seconds["total"], resumed=False)
        if eval_data is not None:
            row["accuracy_pruned"] = 100 * evaluate(model, eval_data)
        epochs = epochs_per_stage + (final_epochs if t == stages - 1 else 0)
        losses = train_epochs(model, train, epochs, lr=lr, lr_end=lr_end, batch_size=batch_size, momentum=momentum,
                              weight_decay=weight_decay, masks=masks, augment=augment, seed=seed + 7919 * (t + 1),
                              progress=progress)
        row.update(epochs=epochs, train_loss=losses[-1] if losses else None, seconds=time.perf_counter() - t0)
        if eval_data is not None:
            row["accuracy"] = 100 * evaluate(model, eval_data)
        history.append(row)
        if path is not None and rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(dict(config=config, model=model.state_dict(), masks=masks, history=history), tmp)
            os.replace(tmp, path)  # atomic: an interruption never leaves a half-written checkpoint
    return GradualResult(history=history, masks=masks or {}, seconds=time.perf_counter() - t_all)
