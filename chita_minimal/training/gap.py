"""GaP, scheduled grow-and-prune (Ma et al., "Effective Model Sparsification by Scheduled
Grow-and-Prune Methods", ICLR 2022): sparse training where one part of the network at a time is dense.

    res = gap_train(model, train, 0.9, epochs=10, lr=0.05, partitions=4)
    res.masks, res.achieved, res.losses, res.stages     # a SparseTrainResult; stages: one dict per phase
    partition_names(model, 4)                            # the contiguous layer partitions used

The prunable layers (``names``, default :func:`chita_minimal.network.params.prunable_names`) are cut
into ``partitions`` contiguous partitions of about equal parameter count. Every layer l keeps
k_l weights (:func:`chita_minimal.training.sparse_training.layer_counts` with ``distribution``
"uniform" or "erk" as for RigL: Σ_l k_l = round((1 − s)·p) exactly), first chosen by magnitude. Then, phase after phase, one partition
(cyclically 0, 1, …, P − 1, 0, …) is *grown*: all its weights train, the pruned ones starting
at 0; after ``steps_per_phase`` steps it is *pruned back* to k_l weights per layer by magnitude
and the next partition grows. The phases fill the first ``grow_end`` (default 80 %) of the
steps; the rest is all-sparse fine-tuning with the masks fixed. Optimisation follows
:mod:`chita_minimal.training.sparse_training` (SGD, momentum, Nesterov, weight decay, cosine learning
rate from ``lr`` to 0 over all steps, batches from a permutation seeded by ``seed`` + epoch).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from chita_minimal.network import params
from chita_minimal.network.loop import EpochBatches, cosine_lr, forward_backward, setup
from chita_minimal.training.sparse_training import DISTRIBUTIONS, SparseTrainResult, layer_counts
from chita_minimal.utils import check_int as _int
from chita_minimal.utils import check_number, model_mode


def partition_names(model: nn.Module, partitions: int, names=None) -> list[list[str]]:
    """Cut the prunable layers ``names`` (in their order) into ``partitions`` contiguous partitions.

    With c_i = number of weights of the first i layers and C = c_L, boundary j (j = 1 … P − 1)
    is the i nearest to j·C/P (ties: the smaller i) that leaves every partition ≥ 1 layer, so the
    partitions hold about C/P weights each. Every name is in exactly one partition.
    """
    names = params.resolve(model, names)
    partitions = _int("partitions", partitions)
    if partitions > len(names):
        raise ValueError(f"partitions must be <= the number of prunable layers ({len(names)}), got {partitions}")
    prms = dict(model.named_parameters())
    cum = [0]
    for n in names:
        cum.append(cum[-1] + prms[n].numel())
    bounds = [0]
    for j in range(1, partitions):
        target = j * cum[-1] / partitions
        lo, hi = bounds[-1] + 1, len(names) - (partitions - j)
        bounds.append(min(range(lo, hi + 1), key=lambda i: (abs(cum[i] - target), i)))
    bounds.append(len(names))
    return [names[a:b] for a, b in zip(bounds, bounds[1:])]


def _magnitude_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of w's shape keeping the k entries of largest |w|."""
    keep = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    keep[torch.topk(w.detach().abs().flatten(), k, sorted=False).indices] = True
    return keep.view_as(w)


def gap_train(model: nn.Module, train_dataset, sparsity: float, epochs: int, *, lr: float, partitions: int = 4,
              steps_per_phase: int | None = None, grow_end: float = 0.8, distribution: str = "uniform",
              batch_size: int = 128,
              momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = True, names=None, device=None,
              seed: int = 0, callback=None, progress: bool = False) -> SparseTrainResult:
    """GaP sparse training of ``model`` in place to exactly ``sparsity`` (method "gap").

    With T = epochs × ⌈len(train_dataset)/batch_size⌉ steps and S = ``steps_per_phase``, phase
    j = 0 … J − 1, J = ⌊grow_end·T / S⌋, covers steps [jS, (j + 1)S) and grows partition
    j mod P (P = ``partitions``, see :func:`partition_names`): its masks are all True, its
    pruned weights re-enter at 0 with zero momentum, while every other layer keeps its k_l
    weights (masked gradients and weights zeroed at every step). After step (j + 1)S the grown
    layers are pruned back, m_l = TopK(|θ_l|, k_l). Default S = ⌊grow_end·T / P⌋: one cycle,
    every partition grown once; a smaller S gives several cycles. J ≥ P is required so that
    every partition grows at least once. Steps ≥ J·S are all-sparse fine-tuning.

    ``history``: one dict per phase: phase, partition, layers (its names), start and step (the
    step after which it was pruned back), changed = fraction of the partition's kept weights
    that were not kept before it grew. ``callback(step, masks, grown)``, if given, is called
    after every step (masks: the live name → bool dict, do not modify; grown: the index of the
    dense partition, or None when all are sparse).
    """
    names, device = setup(model, train_dataset, sparsity, epochs, lr, batch_size, names, device)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    groups = partition_names(model, partitions, names)
    grow_end = check_number("grow_end", grow_end, 0, 1, low_open=True)
    check_number("momentum", momentum, 0, 1, high_open=True)
    check_number("weight_decay", weight_decay, 0)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    steps = math.ceil(len(train_dataset) / batch_size)
    total = epochs * steps
    grow_steps = int(grow_end * total)
    if steps_per_phase is None:
        steps_per_phase = grow_steps // partitions
        if steps_per_phase < 1:
            raise ValueError(f"{total} steps (grow_end·T = {grow_steps}) are too few to grow {partitions} "
                             "partitions once; train longer or use fewer partitions")
    _int("steps_per_phase", steps_per_phase)
    n_phases = grow_steps // steps_per_phase
    if n_phases < partitions:
        raise ValueError(f"steps_per_phase = {steps_per_phase} allows only {n_phases} phases in the first "
                         f"{grow_steps} steps (grow_end·T), fewer than partitions = {partitions}")

    t0 = time.perf_counter()
    prms = dict(model.named_parameters())
    ws = {n: prms[n] for n in names}
    counts = dict(zip(names, layer_counts([tuple(w.shape) for w in ws.values()], sparsity, distribution)))
    masks = {n: _magnitude_mask(w, counts[n]) for n, w in ws.items()}
    params.apply_masks(model, masks)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov and momentum > 0)
    before = {}  # masks of the grown partition before it grew

    def grow(j):
        with torch.no_grad():
            for n in groups[j]:
                before[n] = masks[n]
                masks[n] = torch.ones_like(masks[n])
                buf = opt.state[ws[n]].get("momentum_buffer")
                if buf is not None:
                    buf.masked_fill_(~before[n], 0)  # grown weights are 0 (masked) and get no momentum

    def prune_back(j):
        new_kept, kept = 0, 0
        with torch.no_grad():
            for n in groups[j]:
                masks[n] = _magnitude_mask(ws[n], counts[n])
                ws[n].masked_fill_(~masks[n], 0)
                new_kept += int((masks[n] & ~before.pop(n)).sum())
                kept += counts[n]
        return new_kept / max(kept, 1)

    dtype = next(iter(ws.values())).dtype
    losses, history, step, phase = [], [], 0, 0
    grow(0)
    with model_mode(model, training=True):
        for epoch in range(epochs):
            batches = EpochBatches(train_dataset, batch_size, seed, epoch, device, dtype, f"gap {epoch + 1}/{epochs}",
                                   progress)
            for x, y in batches:
                loss = forward_backward(model, opt, x, y, cosine_lr(lr, step, total))
                for n, w in ws.items():
                    w.grad.masked_fill_(~masks[n], 0)
                opt.step()
                params.apply_masks(model, masks)
                step += 1
                if phase < n_phases and step == (phase + 1) * steps_per_phase:
                    j = phase % partitions
                    changed = prune_back(j)
                    history.append(dict(phase=phase, partition=j, layers=list(groups[j]),
                                        start=phase * steps_per_phase, step=step, changed=changed))
                    phase += 1
                    if phase < n_phases:
                        grow(phase % partitions)
                if callback is not None:
                    callback(step, masks, phase % partitions if phase < n_phases else None)
                batches.add(loss, len(y))
            losses.append(batches.mean)
    p = sum(w.numel() for w in ws.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return SparseTrainResult(method="gap", target=sparsity, achieved=1 - kept / p,
                             masks={n: m.cpu() for n, m in masks.items()}, seconds={"total": time.perf_counter() - t0},
                             stages=history, losses=losses)
