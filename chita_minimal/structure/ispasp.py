"""I-SpaSP-style structured pruning by sparse signal recovery (Wolfe & Kyrillidis, "i-SpaSP:
Structured Neural Pruning via Sparse Signal Recovery", L4DC 2022).

Channel groups (see :func:`structured.channel_groups`) are pruned one at a time in forward
order. For one group with producer P and consumer C, on ``n_samples`` calibration inputs (forward
passes only, no gradients):

- the target Y = C(h) is the consumer's output *without bias* computed from the hidden
  activation h of the **dense** network (ResNet block: h = relu(bn1(conv1(x))); MLPNet: the
  hidden neurons after ReLU), flattened over samples, output channels and positions;
- h' is the same activation in the **partially pruned** network (earlier groups already
  pruned), so that the consumer learns to correct the errors made upstream;
- Z_c = C(h'_c) is the consumer applied to channel c of h' alone, so a support S with channel
  coefficients a gives the output Y_S = Σ_{c∈S} a_c Z_c (a = 1: weights unchanged).

Choosing S of size s is a sparse recovery problem, solved CoSaMP-style::

    S ← top-s ‖Z_c‖
    repeat `iterations` times:
        a ← argmin_a ‖Y − Σ_{c∈S} a_c Z_c‖²            (least squares on S)
        R ← Y − Σ_{c∈S} a_c Z_c;  score_c = |⟨Z_c, R⟩|   (R's correlation with every channel)
        T ← S ∪ top-2s(score);  a_T ← least squares on T
        S ← top-s of |a_c|·‖Z_c‖ over T;  stop when S does not change

Everything is computed from the Gram matrix G_cd = ⟨Z_c, Z_d⟩ (C×C), b_c = ⟨Z_c, Y⟩ and ‖Y‖²,
accumulated over mini-batches of samples, so no more than one batch of Z is ever held:
score = |b − G a|, ‖R‖² = ‖Y‖² − 2aᵀb + aᵀGa. Least squares solves the |T|×|T| Gram system
with a small relative ridge. The support with the lowest residual seen is returned.

After S is chosen the channels outside S are removed (their consumer columns zeroed, then
:func:`structured.shrink`). With ``refit=True`` the consumer's input column c ∈ S is also
scaled by the least-squares a_c, the per-channel rescaling that best matches Y (a ThiNet-like
least-squares refit, Luo et al. 2017; i-SpaSP itself only selects); with ``refit=False`` the
kept weights are unchanged. All groups keep the same fraction of their channels, the largest
one whose FLOP reduction stays within the budget.

    report = cm.shrink(model, calib, 0.5, "ispasp", n_samples=64)   # ≤ 50 % of the FLOPs removed
    report.model, report.keep, report.achieved, report.residuals["layer1.0.conv1"]
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from chita_minimal.network import fisher
from chita_minimal.structure.channels import (ChannelReport, FlopModel, _input_shape, channel_groups, flops,
                                              group_widths, shrink)
from chita_minimal.structure.graph import example_inputs_for
from chita_minimal.utils import check_fraction, check_int, deprecated, renamed

RIDGE = 1e-9  # relative ridge of the least-squares Gram systems (times the mean diagonal)


# -----------------------------------------------------------------------------
# sparse recovery on the Gram matrix


@dataclass
class Recovery:
    """The chosen support (C,) bool, its least-squares coefficients a (C,) (0 outside), the
    relative residual ‖Y − Σ_S a_c Z_c‖/‖Y‖ of the support after every iteration (first entry:
    the top-s-by-norm start) and the number of iterations run."""

    support: torch.Tensor
    coef: torch.Tensor
    residuals: list
    iterations: int


def _top(v: torch.Tensor, k: int, among: torch.Tensor | None = None) -> torch.Tensor:
    """(C,) bool mask of the k largest entries of v (only among ``among`` if given; ties: lower index)."""
    if among is not None:
        v = torch.where(among, v, torch.full_like(v, -math.inf))
    order = torch.sort(v, descending=True, stable=True).indices[:k]
    mask = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
    mask[order] = True
    return mask


def _least_squares(G: torch.Tensor, b: torch.Tensor, T: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_a ‖Y − Σ_{c∈T} a_c Z_c‖² + ridge·mean(diag G_TT)·‖a‖²: (C,), zero outside T."""
    idx = torch.nonzero(T).squeeze(1)
    A = G[idx][:, idx]
    scale = float(A.diagonal().mean())
    A = A + ridge * (scale if scale > 0 else 1.0) * torch.eye(len(idx), dtype=G.dtype, device=G.device)
    a = torch.zeros_like(b)
    a[idx] = torch.linalg.solve(A, b[idx])
    return a


def relative_residual(G: torch.Tensor, b: torch.Tensor, yy: float, a: torch.Tensor) -> float:
    """‖Y − Σ_c a_c Z_c‖/‖Y‖ from the Gram data: ‖R‖² = ‖Y‖² − 2aᵀb + aᵀGa (0 when Y = 0)."""
    if yy <= 0:
        return 0.0
    rr = yy - 2 * float(a @ b) + float(a @ (G @ a))
    return math.sqrt(max(rr, 0.0) / yy)


def recover(G: torch.Tensor, b: torch.Tensor, yy: float, s: int, *, iterations: int = 10,
            ridge: float = RIDGE) -> Recovery:
    """CoSaMP-style choice of s of the C columns Z_c to approximate Y (see the module docstring).

    G: (C, C) Gram ⟨Z_c, Z_d⟩, b: (C,) ⟨Z_c, Y⟩, yy: ‖Y‖². With s = C every channel is kept
    with a = 1 (nothing removed, weights unchanged). Otherwise the support of least residual
    among the start and every iterate is returned, so it is never worse than the top-s-by-norm
    start.
    """
    C = G.shape[0]
    s = check_int("s", s)
    if s > C:
        raise ValueError(f"s must be <= the number of channels {C}, got {s}")
    check_int("iterations", iterations, 0)
    if s == C:
        a = torch.ones_like(b)
        return Recovery(torch.ones(C, dtype=torch.bool, device=G.device), a, [relative_residual(G, b, yy, a)], 0)
    norms = G.diagonal().clamp_min(0).sqrt()  # ‖Z_c‖
    S = _top(norms, s)
    a = _least_squares(G, b, S, ridge)
    best = (relative_residual(G, b, yy, a), S, a)
    residuals, it = [best[0]], 0
    for it in range(1, iterations + 1):
        score = (b - G @ a).abs()  # |⟨Z_c, R⟩|
        T = S | _top(score, min(2 * s, C))
        a_T = _least_squares(G, b, T, ridge)
        S_new = _top(a_T.abs() * norms, s, among=T)
        if torch.equal(S_new, S):
            break
        S = S_new
        a = _least_squares(G, b, S, ridge)
        residuals.append(relative_residual(G, b, yy, a))
        if residuals[-1] < best[0]:
            best = (residuals[-1], S, a)
    return Recovery(best[1], best[2], residuals, it)


# -----------------------------------------------------------------------------
# the consumer's pieces Z_c, target Y, their Gram data


def _consumer_input(model: nn.Module, consumer: str, x: torch.Tensor) -> torch.Tensor:
    """The input of module ``consumer`` when ``model`` runs on x (the hidden activation h)."""
    seen = []
    hook = model.get_submodule(consumer).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    return seen[0]


def _apply(C: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Y = C(h) without bias, flattened to (B, F)."""
    if isinstance(C, nn.Conv2d):
        return F.conv2d(h, C.weight, None, C.stride, C.padding, C.dilation).flatten(1)
    return F.linear(h, C.weight).flatten(1)


def _pieces(C: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Z (B, channels, F): Z[:, c] = C applied to channel c of h alone (no bias), so Σ_c Z_c = C(h)."""
    W = C.weight  # conv: (out, channels, kh, kw); linear: (out, channels)
    out, ch = W.shape[:2]
    if isinstance(C, nn.Conv2d):
        if C.groups != 1 or C.padding_mode != "zeros":
            raise ValueError("I-SpaSP supports plain convolutions (groups=1, zero padding) as consumers")
        Wg = W.transpose(0, 1).reshape(ch * out, 1, *W.shape[2:])  # group c holds the filters W[:, c]
        Z = F.conv2d(h, Wg, None, C.stride, C.padding, C.dilation, groups=ch)  # (B, ch·out, H, W)
        return Z.view(h.shape[0], ch, -1)
    return h.unsqueeze(2) * W.T.unsqueeze(0)  # (B, ch, out)


def _gram(ref: nn.Module, work: nn.Module, group, x: torch.Tensor, batch_size: int):
    """G (C×C), b (C,), ‖Y'‖² in float64 for one channel group, summed over all its consumers k: Y_k = C_k(h_dense)
    from ``ref``; Z_kc = C_k applied to the columns of channel c alone (through the group's index map, e.g. the HW
    columns of a flatten → Linear head) of ``work``'s h'; Y'_k = Y_k minus the part of C_k(h') from columns of no
    channel of the group (held fixed)."""
    ch = group.channels
    G = torch.zeros(ch, ch, dtype=torch.float64, device=x.device)
    b = torch.zeros(ch, dtype=torch.float64, device=x.device)
    yy = torch.zeros((), dtype=torch.float64, device=x.device)
    for consumer in group.consumers:
        C, C_dense = work.get_submodule(consumer), ref.get_submodule(consumer)
        owner = group.channel_of(consumer).to(x.device)  # (in,) channel of each input column, −1: none
        M = (owner[None, :] == torch.arange(ch, device=x.device)[:, None]).double()  # (C, in)
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size]
            Y = _apply(C_dense, _consumer_input(ref, consumer, xb)).double()  # (B, F)
            pieces = _pieces(C, _consumer_input(work, consumer, xb)).double()  # (B, in, F)
            Z = torch.einsum("cj,bjf->bcf", M, pieces)
            Y = Y - (pieces.sum(1) - Z.sum(1))  # the columns of no group channel stay as they are
            G += torch.einsum("bcf,bdf->cd", Z, Z)
            b += torch.einsum("bcf,bf->c", Z, Y)
            yy += (Y * Y).sum()
    return G, b, float(yy)


# -----------------------------------------------------------------------------
# budget and driver


def uniform_counts(model: nn.Module, fraction: float, input_shape=None, *, residual: bool = False,
                   example_inputs=None, budget: str = "flops") -> dict[str, int]:
    """Channels kept per group with one shared removal ratio r, the largest whose FLOP reduction is ≤ fraction.

    k_g(r) = max(1, round((1 − r)·C_g)) decreases with r, so the removed FLOP fraction grows with
    r; r is found by bisection (60 halvings) on exact per-layer FLOP counts.
    """
    fraction = check_fraction("fraction", fraction)
    input_shape = _input_shape(model, input_shape, example_inputs)
    example_inputs = example_inputs_for(model, example_inputs, input_shape)
    cost = FlopModel(model, input_shape, residual, example_inputs=example_inputs, budget=budget)
    widths = group_widths(model, residual, example_inputs=example_inputs)

    def counts(r):
        return {g: max(1, min(c, math.floor((1 - r) * c + 0.5))) for g, c in widths.items()}

    def removed(r):
        return 1 - cost(counts(r)) / cost.total

    if removed(1.0) <= fraction:
        return counts(1.0)
    lo, hi = 0.0, 1.0  # removed(lo) <= fraction < removed(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if removed(mid) <= fraction else (lo, mid)
    return counts(lo)


@dataclass(kw_only=True)
class ISpaSPReport(ChannelReport):
    """What :func:`ispasp` (``cm.shrink(..., method="ispasp")``) did: a :class:`~chita_minimal.structure.channels.ChannelReport`
    (method "ispasp"; ``model`` the small model, ``keep`` group → bool (C,) kept channels) plus

    scales: group → (C,) factor applied to the consumer's input columns (a_c with refit, 1 without;
    0 = removed); residuals: group → relative residual of the support after every iteration
    (least-squares a); final_residual: group → relative residual ‖Y − C(h'·scales)‖/‖Y‖ of the
    weights actually used.
    """

    scales: dict = field(repr=False)
    residuals: dict = field(repr=False)
    final_residual: dict

    def _extra_lines(self) -> list[str]:
        res = ", ".join(f"{g} {r:.4f}" for g, r in self.final_residual.items())
        return super()._extra_lines() + [f"  relative residual per group: {res}"]


def _samples(model: nn.Module, dataset, n: int, seed: int) -> torch.Tensor:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"dataset must be indexable with a length (e.g. a TensorDataset), got {type(dataset).__name__}")
    if len(dataset) < n:
        raise ValueError(f"dataset has {len(dataset)} samples but n_samples = {n} are needed")
    ref = next(model.parameters())
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].view(n, 1)
    x, _ = fisher.load_samples(dataset, idx, ref.device, ref.dtype)  # (n, 1, ...)
    return x.flatten(0, 1)


def ispasp(model: nn.Module, dataset, fraction: float, *, n_samples: int = 64, iterations: int = 10,
           refit: bool = True, seed: int = 0, batch_size: int = 16, input_shape=None, residual: bool = False,
           example_inputs=None, budget: str = "flops") -> ISpaSPReport:
    """I-SpaSP channel pruning of any traceable model removing ≤ ``fraction`` of the FLOPs.

    1. Counts: :func:`uniform_counts` (same keep ratio in every group, budget never exceeded).
    2. For every group in forward order, on ``n_samples`` samples drawn with ``seed`` (eval mode, BN
       running statistics, ``batch_size`` samples at a time): Gram data of Z_c = C(h'_c) and
       Y = C(h_dense) summed over the group's consumers (:func:`_gram`), support by :func:`recover` with
       ``iterations``; every consumer's columns of the removed channels are zeroed in the working copy (and, with
       ``refit``, those of the kept ones scaled by the least-squares a_c) before the next group.
    3. ``shrink`` of the working copy. ``model`` itself is not modified.

    ``residual``, ``example_inputs`` (models other than the package's), ``input_shape``, ``budget``: as for
    :func:`~chita_minimal.structure.channels.select`. Consumers must be plain convolutions or linear maps.
    Returns an :class:`ISpaSPReport` whose ``model`` is the small model (``n_samples``: forward passes only, no
    gradients, hence not ``n_grads``). ``cm.shrink(model, data, fraction, method="ispasp", ...)`` runs it.
    """
    t0 = time.perf_counter()
    fraction = check_fraction("fraction", fraction)
    input_shape = _input_shape(model, input_shape, example_inputs)
    example_inputs = example_inputs_for(model, example_inputs, input_shape)
    groups = channel_groups(model, example_inputs, residual=residual)
    n_samples = check_int("n_samples", n_samples)
    iterations = check_int("iterations", iterations, 0)
    batch_size = check_int("batch_size", batch_size)
    check_int("seed", seed, None)
    if not isinstance(refit, bool):
        raise TypeError(f"refit must be a bool, got {type(refit).__name__}")
    counts = uniform_counts(model, fraction, input_shape, residual=residual, example_inputs=example_inputs,
                            budget=budget)
    x = _samples(model, dataset, n_samples, seed)
    ref, work = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    keep, scales, residuals, final = {}, {}, {}, {}
    with torch.no_grad():
        for name, gr in groups.items():
            G, b, yy = _gram(ref, work, gr, x, batch_size)
            rec = recover(G, b, yy, counts[name], iterations=iterations)
            a = rec.coef if refit else rec.support.to(G.dtype)
            for consumer in gr.consumers:  # scale (or zero) the columns of every channel in every consumer
                W = work.get_submodule(consumer).weight  # (out, in, ...)
                factor = gr.from_channels(consumer, a.to(W), 1.0)
                W.mul_(factor.view(1, -1, *[1] * (W.dim() - 2)))
            keep[name], scales[name] = rec.support.cpu(), a.cpu()
            residuals[name], final[name] = rec.residuals, relative_residual(G, b, yy, a)
    for m, mode in zip(work.modules(), [m.training for m in model.modules()]):
        m.training = mode
    small = shrink(work, keep, example_inputs)
    f_dense, f_small = flops(model, input_shape), flops(small, input_shape)
    return ISpaSPReport(method="ispasp", target=fraction, achieved=1.0 - f_small / f_dense,
                        seconds={"total": time.perf_counter() - t0}, model=small, keep=keep, flops_dense=f_dense,
                        flops_pruned=f_small, scales=scales, residuals=residuals, final_residual=final)


# the per-family entry point before cm.shrink (deprecated; ``n``: the older name of ``n_samples``)
ispasp_prune = renamed(n="n_samples")(deprecated(
    ispasp, "ispasp_prune", "cm.shrink(model, data, fraction, method='ispasp', n_samples=...), which returns the "
    "same report"))
