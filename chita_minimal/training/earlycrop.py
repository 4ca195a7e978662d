"""EarlyCroP-style early pruning (Rachwan et al., "Winning the Lottery Ahead of Time: Efficient
Early Network Pruning", ICML 2022) with a gradient-flow-preservation saliency.

    res = earlycrop_train(model, train, 0.9, epochs=10, lr=0.05, check_every=50)   # unstructured
    res.prune_step, res.masks, res.achieved, res.losses, res.stages              # stages: one dict per check
    res = earlycrop_train(model, train, 0.5, epochs=10, lr=0.05, structured=True)  # ≤ 50 % of FLOPs removed
    res.keep, res.achieved, res.model                           # channel masks, FLOP fraction removed, shrunk model

Saliency (the "gradient flow" family of GraSP, Wang et al. 2020, in the absolute form of
Lubana & Dick 2021): with g = ∇_θ L(θ) on one batch, θ the prunable weights (every other
parameter held fixed),

    Hg = ∇_θ (½‖g‖²)  (a Hessian-gradient product, by double backprop),   S_j = |θ_j · (Hg)_j|.

Removing θ_j (Δθ = −θ_j e_j) changes ½‖g‖² by −θ_j (Hg)_j to first order: S_j is how much the
gradient flow would change; the weights of least S are pruned. The network trains dense; every
``check_every`` steps the mask of the current S is computed and the network is pruned as soon as
two consecutive masks agree (IoU ≥ ``stability``), or at ``max_dense_epochs`` at the latest; it
then trains sparse with the masks fixed, so the total is ``epochs`` epochs either way. S is
always computed on the same fixed batch of ``saliency_samples`` training examples (as GraSP
and SNIP score on a fixed batch): consecutive masks then differ only because θ moved, not
because the batch changed (a fresh batch per check adds sampling noise to the IoU).
Optimisation follows :mod:`chita_minimal.training.sparse_training` (SGD, momentum, Nesterov, weight decay,
cosine learning rate from ``lr`` to 0 over all steps, batches seeded by ``seed`` + epoch).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from chita_minimal.network import params
from chita_minimal.network.loop import EpochBatches, cosine_lr, forward_backward, setup
from chita_minimal.solver.problem import num_kept
from chita_minimal.training.sparse_training import SparseTrainResult
from chita_minimal.structure.channels import channel_groups, flops, select, shrink, weight_groups
from chita_minimal.structure.graph import example_inputs_for
from chita_minimal.utils import check_int as _int
from chita_minimal.utils import check_number, model_mode


@dataclass(kw_only=True)
class EarlyCropResult(SparseTrainResult):
    """A :class:`~chita_minimal.training.sparse_training.SparseTrainResult` (method "earlycrop") plus:

    prune_step: optimizer steps taken dense before pruning (0 = pruned at initialisation);
    steps: all optimizer steps (= epochs × batches per epoch). stages: one dict per check
    (step, epoch, iou with the previous check's mask or None, pruned). target: the ``sparsity``
    argument. Unstructured, achieved: the fraction of pruned weights. Structured mode: achieved
    (= ``flop_fraction``): the FLOPs removed, measured with :func:`structured.flops` on ``model``;
    keep: channel group → bool (channels,), True = kept, as :func:`structured.shrink` wants;
    model (= ``small``): ``shrink(model, keep)``, the trained network with the channels removed
    (it computes what the masked input model computes in eval mode); ``masks`` are then the
    producer rows / consumer columns of the removed channels, ``sparsity`` their weight fraction.
    ``small`` and ``flop_fraction`` are the old names of ``model`` and (structured) ``achieved``.
    """

    prune_step: int = 0
    steps: int = 0
    keep: dict | None = field(default=None, repr=False)
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def sparsity(self) -> float:
        """The fraction of the prunable weights removed (from the masks; = ``achieved`` unstructured)."""
        if self.keep is None:
            return self.achieved
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1 - kept / sum(m.numel() for m in self.masks.values())

    @property
    def flop_fraction(self) -> float | None:
        return None if self.keep is None else self.achieved

    @property
    def small(self) -> nn.Module | None:
        return self.model

    def _extra_lines(self) -> list[str]:
        lines = super()._extra_lines() + [f"  pruned after {self.prune_step} of {self.steps} steps"]
        if self.keep is not None:
            kept = ", ".join(f"{g} {int(m.sum())}/{m.numel()}" for g, m in self.keep.items())
            lines.append(f"  channels kept: {kept}; weight sparsity {self.sparsity:.4f}")
        return lines


# -----------------------------------------------------------------------------
# saliency


def hessian_gradient(loss: torch.Tensor, weights) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(g, Hg) for a scalar ``loss`` and a list of tensors ``weights`` (shapes kept).

    g = ∇_w loss with a graph, then Hg = ∇_w (½ Σ ‖g_i‖²) = H g, H = ∇²_w loss (one double
    backprop; no Hessian is formed). Weights that do not reach ½‖g‖² get Hg = 0.
    """
    g = torch.autograd.grad(loss, weights, create_graph=True)
    half = 0.5 * sum((gi * gi).sum() for gi in g)
    hg = torch.autograd.grad(half, weights, allow_unused=True, materialize_grads=True)
    return [gi.detach() for gi in g], list(hg)


def saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
    """S = |θ ⊙ Hg| per prunable parameter (name → tensor of its shape) on the batch (x, y).

    L = mean cross-entropy of ``model(x)`` in the model's current mode (in train mode BatchNorm
    normalises with the batch statistics, as in a training step), θ = the ``names`` parameters.
    No side effect: the buffers (BatchNorm running statistics) are restored afterwards and no
    ``.grad`` is written.
    """
    names = params.resolve(model, names)
    prms = dict(model.named_parameters())
    ws = [prms[n] for n in names]
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        _, hg = hessian_gradient(F.cross_entropy(model(x), y), ws)
    finally:
        with torch.no_grad():
            for b, v in zip(model.buffers(), saved):
                b.copy_(v)
    return {n: (w.detach() * h).abs() for n, w, h in zip(names, ws, hg)}


# -----------------------------------------------------------------------------
# masks from the saliency


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two flat bool masks (1 when both are empty)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def _global_topk(S: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    flat = torch.cat([s.flatten() for s in S.values()])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    out, o = {}, 0
    for n, s in S.items():
        out[n] = keep[o:o + s.numel()].view_as(s)
        o += s.numel()
    return out


def _channel_masks(model, S, fraction, input_shape, example_inputs=None):
    """Structured selection: channel scores Σ S over each channel's rows of every producer and columns of every
    consumer (:func:`structured.weight_groups`, through the groups' index maps), :func:`structured.select` under
    the FLOP budget. Returns (keep, weight masks with the removed rows/columns False)."""
    lay = params.layout(model, list(S))
    flat = torch.cat([S[n].flatten() for n in lay.names])
    idx, owner = weight_groups(model, lay, example_inputs=example_inputs)
    gid = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor([len(ix) for ix in idx])).to(flat.device)
    per_channel = torch.zeros(len(idx), dtype=flat.dtype, device=flat.device).index_add_(
        0, gid, flat[torch.cat(idx).to(flat.device)])
    groups = channel_groups(model, example_inputs)
    scores, j = {}, 0
    for name in groups:
        c = owner.count(name)
        scores[name] = per_channel[j:j + c]
        j += c
    keep, _ = select(model, scores, fraction, input_shape, example_inputs=example_inputs)
    masks = {n: torch.ones_like(s, dtype=torch.bool) for n, s in S.items()}
    for name, gr in groups.items():
        for c in (~keep[name]).nonzero().squeeze(1).tolist():
            for m in gr.producers:
                masks[f"{m}.weight"][gr.indices_of(m, c).to(flat.device)] = False
            for m in gr.consumers:
                masks[f"{m}.weight"][:, gr.indices_of(m, c).to(flat.device)] = False
    return keep, masks


# -----------------------------------------------------------------------------
# training


def earlycrop_train(model: nn.Module, train_dataset, sparsity: float, epochs: int, *, lr: float,
                    structured: bool = False, check_every: int = 50, stability: float = 0.9,
                    max_dense_epochs: float | None = None, saliency_samples: int | None = None,
                    batch_size: int = 128, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = True,
                    names=None, device=None, seed: int = 0, progress: bool = False) -> EarlyCropResult:
    """Train ``model`` in place: dense until the saliency mask is stable, then sparse; ``epochs`` in total.

    ``sparsity``: unstructured, the fraction of the prunable weights removed (global top-k of S,
    exactly k = round((1 − s)·p) kept); ``structured=True`` (any traceable model), the fraction
    of FLOPs to remove at most, in (0, 1): channels are scored by Σ S over their producer row
    and consumer column and selected by :func:`structured.select` (FLOPs for one input of the
    dataset's shape).

    Checks happen before the update of steps t = 0, c, 2c, … (c = ``check_every``) at the
    weights after t updates: S = :func:`saliency` (train mode, no side effect) on a fixed batch
    of ``saliency_samples`` (default ``batch_size``) examples drawn once with ``seed``. The check
    at t gives mask m_t and IoU(m_t, m_prev) = |m_t ∩ m_prev| / |m_t ∪ m_prev| (kept weights, or
    kept channels when structured); the model is pruned with m_t at the first check with
    IoU ≥ ``stability``, or at the check forced at step D = ⌊max_dense_epochs × batches per
    epoch⌋ (default max_dense_epochs = epochs/4; it must be < epochs). ``check_every=0`` prunes
    at initialisation (step 0). Step t's update already uses the masks (masked gradients and
    weights zeroed at every step, the pruned weights' momentum cleared); training goes on to
    ``epochs`` epochs, i.e. epochs × ⌈len(train_dataset)/batch_size⌉ steps in all.
    Returns an :class:`EarlyCropResult`.
    """
    names, device = setup(model, train_dataset, sparsity, epochs, lr, batch_size, names, device)
    _int("check_every", check_every, low=0)
    stability = check_number("stability", stability, 0, 1, low_open=True)
    max_dense_epochs = epochs / 4 if max_dense_epochs is None else max_dense_epochs
    check_number("max_dense_epochs", max_dense_epochs, 0, epochs, high_open=True)
    saliency_samples = min(batch_size if saliency_samples is None else _int("saliency_samples", saliency_samples),
                           len(train_dataset))
    check_number("momentum", momentum, 0, 1, high_open=True)
    check_number("weight_decay", weight_decay, 0)
    if not isinstance(structured, bool):
        raise TypeError(f"structured must be a bool, got {type(structured).__name__}")
    input_shape = tuple(train_dataset.tensors[0].shape[1:])
    example_inputs = None
    if structured:
        example_inputs = example_inputs_for(model, None, input_shape)
        groups = channel_groups(model, example_inputs)
        need = [f"{m}.weight" for gr in groups.values() for m in gr.producers + gr.consumers]
        missing = sorted(set(need) - set(names))
        if missing:
            raise ValueError(f"names must contain the producer and consumer weights of every channel group "
                             f"for structured=True; missing {missing}")
        if not 0 < sparsity < 1:
            raise ValueError(f"sparsity (the FLOP fraction removed) must lie in (0, 1) for structured=True, "
                             f"got {sparsity}")
    t0 = time.perf_counter()
    prms = dict(model.named_parameters())
    ws = {n: prms[n] for n in names}
    p_total = sum(w.numel() for w in ws.values())
    k = num_kept(sparsity, p_total)
    steps = math.ceil(len(train_dataset) / batch_size)
    total = epochs * steps
    deadline = int(max_dense_epochs * steps)
    dtype = next(iter(ws.values())).dtype
    pick = torch.randperm(len(train_dataset), generator=torch.Generator().manual_seed(seed))[:saliency_samples]
    xs, ys = train_dataset.tensors[0][pick], train_dataset.tensors[1][pick].to(device)  # the fixed saliency batch
    xs = xs.to(device, dtype=dtype) if xs.is_floating_point() else xs.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov and momentum > 0)

    def mask_of(S):
        """(flat mask compared by IoU, keep or None, weight masks)."""
        if structured:
            keep, masks = _channel_masks(model, S, sparsity, input_shape, example_inputs)
            return torch.cat(list(keep.values())), keep, masks
        masks = _global_topk(S, k)
        return torch.cat([m.flatten() for m in masks.values()]), None, masks

    losses, history, step = [], [], 0
    masks, keep, prev, prune_step = None, None, None, None
    with model_mode(model, training=True):
        for epoch in range(epochs):
            batches = EpochBatches(train_dataset, batch_size, seed, epoch, device, dtype,
                                   f"earlycrop {epoch + 1}/{epochs}", progress)
            for x, y in batches:
                if masks is None and (check_every == 0 or step == deadline or step % check_every == 0):
                    flat, keep_now, masks_now = mask_of(saliency(model, xs, ys, names))
                    iou = None if prev is None else _iou(prev, flat)
                    pruned = check_every == 0 or step == deadline or (iou is not None and iou >= stability)
                    history.append(dict(step=step, epoch=epoch, iou=iou, pruned=pruned))
                    prev = flat
                    if pruned:
                        masks, keep, prune_step = masks_now, keep_now, step
                        with torch.no_grad():
                            for n, w in ws.items():
                                w.masked_fill_(~masks[n], 0)
                                buf = opt.state[w].get("momentum_buffer")
                                if buf is not None:
                                    buf.masked_fill_(~masks[n], 0)
                loss = forward_backward(model, opt, x, y, cosine_lr(lr, step, total))
                if masks is not None:
                    for n, w in ws.items():
                        w.grad.masked_fill_(~masks[n], 0)
                opt.step()
                if masks is not None:
                    params.apply_masks(model, masks)
                step += 1
                batches.add(loss, len(y))
            losses.append(batches.mean)
    kept = sum(int(m.sum()) for m in masks.values())
    seconds = {"total": time.perf_counter() - t0}  # training and pruning; removing the channels is not timed
    achieved, small = 1 - kept / p_total, None
    if structured:
        keep = {g: m.cpu() for g, m in keep.items()}
        small = shrink(model, keep, example_inputs)
        achieved = 1 - flops(small, input_shape) / flops(model, input_shape)
    return EarlyCropResult(method="earlycrop", target=sparsity, achieved=achieved,
                           masks={n: m.cpu() for n, m in masks.items()}, seconds=seconds, stages=history,
                           losses=losses, prune_step=prune_step, steps=total, keep=keep if structured else None,
                           model=small)
