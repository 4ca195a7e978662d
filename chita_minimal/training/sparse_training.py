"""Sparsity during training, to compare with CHITA + fine-tuning at the same number of epochs.

    res = rigl(model, train, 0.9, epochs=10, lr=0.05, distribution="erk")      # Evci et al. 2020
    res = l0_train(model, train, 0.9, epochs=10, lr=0.05, lam=1e-4)          # Louizos et al. 2018
    res.masks, res.achieved, res.losses, res.stages, res.seconds    # a SparseTrainResult (a Report)

Both train ``model`` in place with SGD (momentum, Nesterov, weight decay, cosine learning rate
from ``lr`` to 0 over all steps, batches from a permutation drawn with ``seed`` + epoch: the
conventions of :func:`chita_minimal.network.finetune.train_epochs`), and both end at *exactly* the requested
sparsity: k = round((1 − s)·p) weights kept (:func:`chita_minimal.num_kept`), the others exactly 0.
The prunable set is ``names`` (default :func:`chita_minimal.network.params.prunable_names`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from chita_minimal.network import params
from chita_minimal.network.loop import EpochBatches, cosine_lr, forward_backward, running_sum, setup
from chita_minimal.report import Report
from chita_minimal.solver.problem import num_kept
from chita_minimal.utils import check_int as _int
from chita_minimal.utils import check_number, model_mode

DISTRIBUTIONS = ("uniform", "erk")
INITS = ("magnitude", "random")


@dataclass(kw_only=True)
class SparseTrainResult(Report):
    """What :func:`rigl`, :func:`l0_train` or :func:`~chita_minimal.training.gap.gap_train` did (a
    :class:`~chita_minimal.report.Report`; method "rigl", "l0" or "gap").

    target: the ``sparsity`` asked; achieved: the fraction of pruned weights over the prunable set
    (from the masks, = the requested one up to rounding of k); masks: name → bool tensor (True =
    kept, on the CPU); seconds: {"total"}; stages: RigL, one dict per mask update (step, fraction,
    regrown); L0, one dict per epoch (epoch, loss, penalty, gate_sparsity); GaP, one dict per phase.
    losses: mean training cross-entropy of each epoch (without any penalty); gate_sparsity: L0 only,
    the fraction of deterministic gates that are exactly 0 at the end, before the top-k step that
    sets the sparsity exactly. ``sparsity`` and ``history`` are the old names of ``achieved`` and
    ``stages``.
    """

    losses: list[float] = field(default_factory=list)
    gate_sparsity: float | None = None

    @property
    def sparsity(self) -> float:
        return self.achieved

    @property
    def history(self) -> list[dict]:
        return self.stages

    def _extra_lines(self) -> list[str]:
        loss = "–" if not self.losses else f"{self.losses[0]:.4f} → {self.losses[-1]:.4f}"
        gates = "" if self.gate_sparsity is None else f"; closed gates {self.gate_sparsity:.4f}"
        return [f"  {len(self.losses)} epoch(s), training loss {loss}; {len(self.stages)} stage(s){gates}"]


# -----------------------------------------------------------------------------
# layer-wise densities


def erk_densities(shapes, sparsity: float) -> list[float]:
    """Erdős–Rényi-Kernel densities (Evci et al. 2020, §3): d_l = min(1, ε·Σ_i n_i^l / Π_i n_i^l).

    For a conv weight (c_out, c_in, h, w) the ratio is (c_out + c_in + h + w)/(c_out·c_in·h·w),
    for a Linear (out, in) it is (out + in)/(out·in). ε is chosen so that Σ_l d_l·N_l = K =
    round((1 − s)·Σ_l N_l) (N_l = Π_i n_i^l): layers with ε·ratio > 1 are made dense, one at a
    time starting from the largest ratio, and ε is solved again on the rest, as in the paper's code.
    """
    numels = [math.prod(s) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, numels)]
    K = num_kept(sparsity, sum(numels))
    dense = set()
    while len(dense) < len(shapes):
        budget = K - sum(numels[i] for i in dense)
        eps = budget / sum(raw[i] * numels[i] for i in range(len(shapes)) if i not in dense)
        over = [i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1 + 1e-12]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        top = max(raw[i] for i in over)
        dense |= {i for i in over if raw[i] == top}
    return [1.0] * len(shapes)


def layer_counts(shapes, sparsity: float, distribution: str = "uniform") -> list[int]:
    """Weights kept per layer: the targets t_l = d_l·N_l ("uniform": d_l = 1 − s; "erk":
    :func:`erk_densities`) rounded by largest remainders, so that Σ_l k_l = round((1 − s)·Σ N_l)
    exactly and each k_l is floor(t_l) or ceil(t_l), with k_l ≤ N_l."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    numels = [math.prod(s) for s in shapes]
    K = num_kept(sparsity, sum(numels))
    dens = erk_densities(shapes, sparsity) if distribution == "erk" else [K / sum(numels)] * len(numels)
    target = [d * n for d, n in zip(dens, numels)]
    counts = [min(n, math.floor(t)) for t, n in zip(target, numels)]
    short = K - sum(counts)  # in [0, number of layers)
    order = sorted((i for i in range(len(numels)) if counts[i] < numels[i]),
                   key=lambda i: (-(target[i] - counts[i]), i))
    for i in order[:short]:
        counts[i] += 1
    assert sum(counts) == K, (counts, K)
    return counts


# -----------------------------------------------------------------------------
# RigL


def _drop_and_grow(w: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor, fraction: float):
    """One RigL update of one layer: the new mask and the newly grown entries (both bool, w's shape).

    Drops d = floor(fraction·k) active weights of smallest |w|, then grows the d entries of largest
    |∇L| among those not kept after the drop (a just-dropped weight may come back unchanged).
    """
    k = int(keep.sum())
    d = int(fraction * k)
    if d == 0:
        return keep, torch.zeros_like(keep)
    flat_keep = keep.flatten()
    score = torch.where(flat_keep, w.detach().abs().flatten(), torch.tensor(-1.0, device=w.device, dtype=w.dtype))
    stay = torch.zeros_like(flat_keep)
    stay[torch.topk(score, k - d, sorted=False).indices] = True
    grow_score = torch.where(stay, torch.tensor(-1.0, device=w.device, dtype=grad.dtype), grad.abs().flatten())
    new = stay.clone()
    new[torch.topk(grow_score, d, sorted=False).indices] = True
    return new.view_as(keep), (new & ~flat_keep).view_as(keep)


def rigl(model: nn.Module, train_dataset, sparsity: float, epochs: int, *, lr: float, batch_size: int = 128,
         momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = True, delta_t: int = 100,
         alpha: float = 0.3, t_end: float = 0.75, distribution: str = "uniform", init: str = "magnitude",
         names=None, device=None, seed: int = 0, progress: bool = False) -> SparseTrainResult:
    """RigL, "Rigging the Lottery" (Evci et al. 2020): sparse training with drop-and-grow mask updates.

    Each layer l keeps k_l weights from start to end (:func:`layer_counts`, ``distribution``
    "uniform" or "erk"). The first mask is the top-k_l |w| of each layer (``init="magnitude"``,
    the natural start from a dense pretrained model; from a random init it is a random-like mask)
    or a random one (``init="random"``, as in the paper; weights outside it are zeroed). Training is
    SGD with the mask kept (masked gradients and weights are zeroed at every step). After every
    step t with t % ΔT = 0 and t < T_end = t_end·T (T = epochs × batches), each layer drops

        f(t) = α/2 · (1 + cos(π t / T_end))

    of its active weights, those of smallest |θ| (after the step), and grows as many inactive ones,
    those of largest |∇_θ L_t| (the dense gradient of the step's batch, needed only at these steps):

        θ ← TopK(|θ| ⊙ m, k − d),   m ← that ∪ TopK(|∇L_t| on the rest, d),   d = ⌊f(t)·k_l⌋.

    Grown weights start at 0 with zero momentum, so every layer has exactly k_l weights all the time.
    The model is trained in place; ``device`` (default: the model's) moves it there first.
    """
    names, device = setup(model, train_dataset, sparsity, epochs, lr, batch_size, names, device)
    delta_t = _int("delta_t", delta_t)
    alpha = check_number("alpha", alpha, 0, 1, low_open=True)
    t_end = check_number("t_end", t_end, 0, 1, low_open=True)
    check_number("momentum", momentum, 0, 1, high_open=True)
    check_number("weight_decay", weight_decay, 0)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    t0 = time.perf_counter()
    prms = dict(model.named_parameters())
    ws = [prms[n] for n in names]
    counts = layer_counts([tuple(w.shape) for w in ws], sparsity, distribution)
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, w, k in zip(names, ws, counts):
        score = w.detach().abs().flatten() if init == "magnitude" else torch.rand(w.numel(), generator=gen).to(w.device)
        keep = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        keep[torch.topk(score, k, sorted=False).indices] = True
        masks[name] = keep.view_as(w)
    params.apply_masks(model, masks)

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov and momentum > 0)
    total = epochs * math.ceil(len(train_dataset) / batch_size)
    dtype = ws[0].dtype
    losses, history, step = [], [], 0
    with model_mode(model, training=True):
        for epoch in range(epochs):
            batches = EpochBatches(train_dataset, batch_size, seed, epoch, device, dtype, f"rigl {epoch + 1}/{epochs}",
                                   progress)
            for x, y in batches:
                loss = forward_backward(model, opt, x, y, cosine_lr(lr, step, total))
                step += 1
                update = step % delta_t == 0 and step < t_end * total
                dense = {n: w.grad.detach().clone() for n, w in zip(names, ws)} if update else None
                for n, w in zip(names, ws):
                    w.grad.masked_fill_(~masks[n], 0)
                opt.step()
                params.apply_masks(model, masks)
                if update:
                    fraction = alpha / 2 * (1 + math.cos(math.pi * step / (t_end * total)))
                    regrown = 0
                    with torch.no_grad():
                        for n, w in zip(names, ws):
                            masks[n], grown = _drop_and_grow(w, dense[n], masks[n], fraction)
                            w.masked_fill_(~masks[n] | grown, 0)  # grown weights start at 0 ...
                            buf = opt.state[w].get("momentum_buffer")
                            if buf is not None:
                                buf.masked_fill_(grown, 0)  # ... with no momentum
                            regrown += int(grown.sum())
                    history.append(dict(step=step, fraction=fraction, regrown=regrown))
                batches.add(loss, len(y))
            losses.append(batches.mean)
    p = sum(w.numel() for w in ws)
    kept = sum(int(m.sum()) for m in masks.values())
    return SparseTrainResult(method="rigl", target=sparsity, achieved=1 - kept / p,
                             masks={n: m.cpu() for n, m in masks.items()}, seconds={"total": time.perf_counter() - t0},
                             stages=history, losses=losses)


# -----------------------------------------------------------------------------
# L0 regularisation with hard-concrete gates


def l0_train(model: nn.Module, train_dataset, sparsity: float, epochs: int, *, lr: float, lam: float,
             batch_size: int = 128, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = True,
             gate_lr: float = 0.05, log_alpha_init: float = 3.0, beta: float = 2 / 3, gamma: float = -0.1,
             zeta: float = 1.1, names=None, device=None, seed: int = 0, progress: bool = False) -> SparseTrainResult:
    """L0 regularisation with hard-concrete gates (Louizos, Welling & Kingma 2018), then exact top-k.

    Every prunable weight θ_j gets a gate z_j; the network uses θ ⊙ z (via
    ``torch.func.functional_call``, so the model code is untouched). In training z is the
    stretched, clipped binary-concrete sample (eq. 9–10 of the paper)

        u ~ U(0, 1),  s = σ((log u − log(1 − u) + log α_j)/β),  z = min(1, max(0, s·(ζ − γ) + γ)),

    and the loss is the mean cross-entropy plus ``lam`` times the expected L0 norm (eq. 12)

        lam · Σ_j P(z_j ≠ 0) = lam · Σ_j σ(log α_j − β log(−γ/ζ))

    (the paper writes λ/N with N training samples: their λ is lam·N). θ is trained by SGD like
    :func:`chita_minimal.network.finetune.train_epochs`; log α (started at ``log_alpha_init``, i.e. gates
    open) by Adam with learning rate ``gate_lr``. At the end the deterministic gate
    ẑ = min(1, max(0, σ(log α)·(ζ − γ) + γ)) is used: ``gate_sparsity`` is the fraction of
    ẑ_j = 0. Since L0 does not hit a given sparsity, the mask keeps the k = round((1 − s)·p)
    weights of largest gate value (global; ranked by log α, which orders ẑ and breaks the ties
    at ẑ = 1, then by |θ ẑ|), and the model gets θ ⊙ ẑ ⊙ mask. If more than p − k gates are
    closed (lam too large) some kept weights are 0 too.
    """
    names, device = setup(model, train_dataset, sparsity, epochs, lr, batch_size, names, device)
    lam = check_number("lam", lam, 0)
    beta = check_number("beta", beta, 0, low_open=True)
    gamma = check_number("gamma", gamma, high=0, high_open=True)
    zeta = check_number("zeta", zeta, 1, low_open=True)
    check_number("gate_lr", gate_lr, 0, low_open=True)
    check_number("log_alpha_init", log_alpha_init)
    check_number("momentum", momentum, 0, 1, high_open=True)
    check_number("weight_decay", weight_decay, 0)
    t0 = time.perf_counter()
    prms = dict(model.named_parameters())
    ws = [prms[n] for n in names]
    log_alpha = [torch.full_like(w, log_alpha_init, requires_grad=True) for w in ws]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov and momentum > 0)
    gate_opt = torch.optim.Adam(log_alpha, lr=gate_lr)
    shift = beta * math.log(-gamma / zeta)
    gen = torch.Generator(device=device).manual_seed(seed)
    total = epochs * math.ceil(len(train_dataset) / batch_size)

    def deterministic(la):
        return (torch.sigmoid(la) * (zeta - gamma) + gamma).clamp(0, 1)

    losses, history, step = [], [], 0
    with model_mode(model, training=True):
        for epoch in range(epochs):
            pen = running_sum(device)
            batches = EpochBatches(train_dataset, batch_size, seed, epoch, device, ws[0].dtype,
                                   f"l0 {epoch + 1}/{epochs}", progress)
            for x, y in batches:
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(lr, step, total)
                gated = {}
                for n, w, la in zip(names, ws, log_alpha):
                    u = torch.rand(w.shape, generator=gen, device=device, dtype=w.dtype).clamp(1e-6, 1 - 1e-6)
                    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / beta)
                    gated[n] = w * (s * (zeta - gamma) + gamma).clamp(0, 1)
                ce = F.cross_entropy(functional_call(model, gated, (x,)), y)
                penalty = sum(torch.sigmoid(la - shift).sum() for la in log_alpha)
                opt.zero_grad(set_to_none=True)
                gate_opt.zero_grad(set_to_none=True)
                (ce + lam * penalty).backward()
                opt.step()
                gate_opt.step()
                step += 1
                batches.add(ce, len(y))
                pen += penalty.detach().to(pen.dtype) * len(y)
            losses.append(batches.mean)
            with torch.no_grad():
                closed = sum(int((deterministic(la) == 0).sum()) for la in log_alpha)
            history.append(dict(epoch=epoch, loss=batches.mean, penalty=float(pen) / batches.seen,
                                gate_sparsity=closed / sum(w.numel() for w in ws)))

    with torch.no_grad():
        z = [deterministic(la) for la in log_alpha]
        p = sum(w.numel() for w in ws)
        gate_sparsity = sum(int((zi == 0).sum()) for zi in z) / p
        k = num_kept(sparsity, p)
        la_flat = torch.cat([la.flatten() for la in log_alpha])
        mag = torch.cat([(w * zi).abs().flatten() for w, zi in zip(ws, z)])
        order = torch.sort(mag, descending=True, stable=True).indices  # ties in log α by |θ ẑ|
        order = order[torch.sort(la_flat[order], descending=True, stable=True).indices]
        keep = torch.zeros(p, dtype=torch.bool, device=la_flat.device)
        keep[order[:k]] = True
        masks, o = {}, 0
        for n, w, zi in zip(names, ws, z):
            masks[n] = keep[o:o + w.numel()].view_as(w)
            w.mul_(zi).masked_fill_(~masks[n], 0)
            o += w.numel()
    return SparseTrainResult(method="l0", target=sparsity, achieved=1 - k / p,
                             masks={n: m.cpu() for n, m in masks.items()}, seconds={"total": time.perf_counter() - t0},
                             stages=history, losses=losses, gate_sparsity=gate_sparsity)
