"""Structured (channel) pruning that physically removes channels, and Group-CHITA.

A *channel group* is one prunable width of the network: channel c is output row c of its
producer layer(s) (and entry c of their BatchNorms) and input column c of its consumer layer(s).

- ResNet20 (:class:`ResNetCifar`), default: the inner channels of every BasicBlock, named after
  the producer, e.g. ``"layer1.0.conv1"`` (:class:`ChannelGroup`: producer ``conv1``, BatchNorm
  ``bn1``, consumer ``conv2``).
- ResNet20 with ``residual=True`` (opt-in), in addition: one residual *stream* per stage, the
  channels added together by the skip connections (:class:`ResidualGroup`), named
  ``"layer1.residual"``, ``"layer2.residual"``, ``"layer3.residual"``. A stream channel c is
  written by every producer of the stream and read by every consumer, so removing it from all
  of them at once keeps the additions ``bn2(conv2(·)) + shortcut`` consistent:

  ============  ==========================================  ==========================================
  stream        producers (rows c, BN entries c)            consumers (input columns c)
  ============  ==========================================  ==========================================
  layer1 (16)   stem ``conv1``/``bn1``, ``layer1.i.conv2``  ``layer1.i.conv1``, ``layer2.0.conv1``,
                /``bn2``                                    ``layer2.0.downsample.0``
  layer2 (32)   ``layer2.0.downsample.0``/``.1``,           ``layer2.i.conv1`` (i ≥ 1),
                ``layer2.i.conv2``/``bn2``                  ``layer3.0.conv1``, ``layer3.0.downsample.0``
  layer3 (64)   ``layer3.0.downsample.0``/``.1``,           ``layer3.i.conv1`` (i ≥ 1), ``fc``
                ``layer3.i.conv2``/``bn2``
  ============  ==========================================  ==========================================

  Residual groups come after the inner groups, so the first groups are always the default ones.
- MLPNet: the hidden neurons of ``fc1`` (consumer ``fc2``) and of ``fc2`` (consumer ``fc3``). It
  has no skip connections: ``residual=True`` returns the same two groups (no error), so code
  written for ResNet20 with ``residual=True`` runs unchanged on MLPNet.

Pieces::

    keep = {"layer1.0.conv1": mask16, ...}      # bool (channels,), True = kept; absent = all kept
    small = shrink(model, keep)                 # NEW dense model with smaller Conv2d/BN/Linear
    flops(small, (3, 32, 32)); param_bytes(small)
    keep, frac = select(model, l1_scores(model), 0.5)          # ≤ 50 % of the FLOPs removed
    keep, frac = select(model, l1_scores(model, residual=True), 0.5, residual=True)  # streams too
    small = shrink(model, keep)                 # accepts "layerK.residual" masks as they are
    report = group_chita_prune(model, data, 0.5, n_grads=128, l2=1e-3)   # a ChannelReport
    report.model, report.keep, report.achieved  # the small model, kept channels, FLOP fraction removed

Scores: L1 filter norms (Li et al., ICLR 2017), first-order Taylor importance (Molchanov et
al., CVPR 2019) and its OBD-style second-order (Fisher) counterpart (LeCun et al. 1990). For a
stream channel they sum over *all* its producer rows (stem, ``conv2`` of every block,
``downsample``), i.e. they include the filters feeding the skip connections.
Group-CHITA: problem (P) of CHITA (Benbaki et al., ICML 2023) under a group-L0 constraint,
solved by IHT with group projection and a line search, then backsolve on the chosen groups.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from chita_minimal.network import fisher
from chita_minimal.models.mlpnet import MLPNet
from chita_minimal.models.resnet_cifar import ResNetCifar
from chita_minimal.network.params import write_back
from chita_minimal.report import Report
from chita_minimal.solver.problem import Problem, ridge_on_support
from chita_minimal.utils import renamed

DEFAULT_INPUT_SHAPES = {ResNetCifar: (3, 32, 32), MLPNet: (1, 28, 28)}


# -----------------------------------------------------------------------------
# channel groups


@dataclass(frozen=True)
class ChannelGroup:
    """Module names of one prunable width: producer rows, optional BN entries, consumer input columns.

    ``producers``/``bns``/``consumers`` give the same names as tuples, like :class:`ResidualGroup`.
    """

    producer: str
    bn: str | None
    consumer: str

    @property
    def producers(self) -> tuple[str, ...]:
        return (self.producer,)

    @property
    def bns(self) -> tuple[str, ...]:
        return () if self.bn is None else (self.bn,)

    @property
    def consumers(self) -> tuple[str, ...]:
        return (self.consumer,)


@dataclass(frozen=True)
class ResidualGroup:
    """Module names of one residual stream: channel c is output row c of every producer (and entry c
    of every BN in ``bns``) and input column c of every consumer; all are removed together."""

    producers: tuple[str, ...]
    bns: tuple[str, ...]
    consumers: tuple[str, ...]


def _check_residual(residual) -> bool:
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
    return residual


def _residual_groups(model: ResNetCifar) -> dict[str, ResidualGroup]:
    """One :class:`ResidualGroup` per stage (see module docstring). A stream starts at the stem and
    at every ``downsample`` (1×1 conv + BN, the first block of stages 2 and 3) and ends at ``fc``."""
    out = {}
    name, prod, bns, cons = "layer1.residual", ["conv1"], ["bn1"], []
    for s in ("layer1", "layer2", "layer3"):
        for b, block in enumerate(getattr(model, s)):
            pre = f"{s}.{b}"
            cons.append(f"{pre}.conv1")
            if block.downsample is not None:  # the shortcut maps the old stream to a new one
                cons.append(f"{pre}.downsample.0")
                out[name] = ResidualGroup(tuple(prod), tuple(bns), tuple(cons))
                name, prod, bns, cons = f"{s}.residual", [f"{pre}.downsample.0"], [f"{pre}.downsample.1"], []
            prod.append(f"{pre}.conv2")
            bns.append(f"{pre}.bn2")
    cons.append("fc")
    out[name] = ResidualGroup(tuple(prod), tuple(bns), tuple(cons))
    return out


def channel_groups(model: nn.Module, *, residual: bool = False) -> dict[str, ChannelGroup | ResidualGroup]:
    """The prunable channel groups of a ResNetCifar or MLPNet, in forward order.

    ``residual=True`` appends ResNetCifar's residual streams (:class:`ResidualGroup`, one per stage,
    ``"layerK.residual"``) after the inner groups; MLPNet has none and returns its usual groups.
    """
    residual = _check_residual(residual)
    if isinstance(model, ResNetCifar):
        groups = {f"{s}.{b}.conv1": ChannelGroup(f"{s}.{b}.conv1", f"{s}.{b}.bn1", f"{s}.{b}.conv2")
                  for s in ("layer1", "layer2", "layer3") for b in range(len(getattr(model, s)))}
        if residual:
            groups.update(_residual_groups(model))
        return groups
    if isinstance(model, MLPNet):
        return {"fc1": ChannelGroup("fc1", None, "fc2"), "fc2": ChannelGroup("fc2", None, "fc3")}
    raise TypeError(f"structured pruning supports ResNetCifar and MLPNet, got {type(model).__name__}")


def group_widths(model: nn.Module, residual: bool = False) -> dict[str, int]:
    """Channels of each group (of :func:`channel_groups`), read off its first producer's weight."""
    return {name: model.get_submodule(gr.producers[0]).weight.shape[0]
            for name, gr in channel_groups(model, residual=residual).items()}


def check_keep(model: nn.Module, keep, residual: bool = False) -> dict[str, torch.Tensor]:
    """Validated keep masks, one bool (channels,) per group (absent groups: all kept)."""
    widths = group_widths(model, residual)
    if not isinstance(keep, dict):
        raise TypeError(f"keep must be a dict group name -> bool mask, got {type(keep).__name__}")
    unknown = [name for name in keep if name not in widths]
    if unknown:
        raise ValueError(f"unknown channel group name(s) {unknown}; valid groups are {list(widths)}")
    out = {}
    for name, c in widths.items():
        m = keep.get(name)
        if m is None:
            m = torch.ones(c, dtype=torch.bool)
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != (c,):
            raise ValueError(f"keep[{name!r}] must be a bool tensor of shape ({c},)")
        if not bool(m.any()):
            raise ValueError(f"keep[{name!r}] keeps no channel; keep at least one per group")
        out[name] = m.cpu()
    return out


def check_fraction(fraction) -> float:
    """``fraction`` (of FLOPs to remove) as a float in (0, 1); TypeError/ValueError otherwise."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"fraction must be a number, got {type(fraction).__name__}")
    if not 0.0 < fraction < 1.0 or math.isnan(fraction):
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    return float(fraction)


# -----------------------------------------------------------------------------
# physical removal


def smaller_layer(m: nn.Module, out_idx, in_idx) -> nn.Module:
    """A copy of Conv2d / Linear / BatchNorm2d ``m`` keeping output rows out_idx and input columns in_idx."""
    kw = dict(device=m.weight.device, dtype=m.weight.dtype)
    if isinstance(m, nn.BatchNorm2d):
        new = nn.BatchNorm2d(len(out_idx), m.eps, m.momentum, m.affine, m.track_running_stats, **kw)
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            src = t.detach() if t.dim() == 0 else t.detach()[out_idx]
            getattr(new, name).data.copy_(src)
    else:
        W = m.weight.detach()[out_idx][:, in_idx]  # conv: (out, in/groups, kh, kw); linear: (out, in)
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise ValueError("grouped convolutions are not supported by shrink")
            new = nn.Conv2d(W.shape[1], W.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, 1,
                            m.bias is not None, m.padding_mode, **kw)
        else:
            new = nn.Linear(W.shape[1], W.shape[0], bias=m.bias is not None, **kw)
        new.weight.data.copy_(W)
        if m.bias is not None:
            new.bias.data.copy_(m.bias.detach()[out_idx])
    for name, prm in new.named_parameters(recurse=False):
        prm.requires_grad_(getattr(m, name).requires_grad)
    return new.train(m.training)


def shrink(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    """A NEW smaller dense model keeping only the channels ``keep[group]`` (True = kept); ``model`` is untouched.

    Removing channel c of a group deletes row c of the producer's weight (and bias), entry c
    of its BatchNorm (weight, bias, running_mean, running_var) and input column c of the
    consumer's weight. The channel is removed *entirely*: its BN bias, which in the dense
    model makes the channel a constant relu(β_c) fed to the consumer, goes too. Hence the
    small model equals the dense model whenever every removed channel contributes nothing to
    the consumer — its consumer column is zero, or its producer row *and* BN weight/bias are
    zero. Groups absent from ``keep`` keep all channels.

    ``keep`` may also hold residual streams (``"layerK.residual"``, see :func:`channel_groups`
    with ``residual=True``): channel c is then removed from every producer (rows, BN entries)
    and every consumer (input columns) of the stream, so the skip additions stay consistent.
    The small model equals the dense one when, for every removed stream channel, all producer
    rows and BN weights/biases are zero (the channel is then 0 at every addition), or all
    consumer columns are zero (nothing reads it). Streams absent from ``keep`` keep their width.
    Modes (train/eval) and ``requires_grad`` flags are copied.
    """
    groups = channel_groups(model, residual=True)  # accepts stream names; MLPNet: its usual groups
    keep = check_keep(model, keep, residual=True)
    out_sel, in_sel = {}, {}  # module name -> kept indices along dim 0 / dim 1
    for name, gr in groups.items():
        if isinstance(gr, ResidualGroup) and name not in keep:
            continue  # an untouched stream: its modules are not rebuilt
        idx = torch.nonzero(keep[name]).squeeze(1)
        for m in gr.producers + gr.bns:
            out_sel[m] = idx
        for m in gr.consumers:
            in_sel[m] = idx
    small = copy.deepcopy(model)
    for mname in set(out_sel) | set(in_sel):
        m = model.get_submodule(mname)
        full_out = torch.arange(m.weight.shape[0])
        full_in = torch.arange(m.weight.shape[1]) if m.weight.dim() > 1 else None
        new = smaller_layer(m, out_sel.get(mname, full_out), in_sel.get(mname, full_in))
        small.set_submodule(mname, new)
    return small


# -----------------------------------------------------------------------------
# cost


def layer_costs(model: nn.Module, input_shape) -> dict[str, tuple[int, int, int]]:
    """Per Conv2d/Linear module: (unit, in_channels, out_channels) with MACs = unit·in·out at batch 1.

    unit = out_h·out_w·kh·kw/groups for a Conv2d, the number of output rows for a Linear (1 for 2-D input).
    """
    costs, hooks = {}, []

    def hook(name):
        def fn(m, inp, out):
            if isinstance(m, nn.Conv2d):
                unit = out.shape[-2] * out.shape[-1] * m.kernel_size[0] * m.kernel_size[1] // m.groups
                costs[name] = (unit, m.in_channels, m.out_channels)
            else:
                costs[name] = (out.numel() // m.out_features, m.in_features, m.out_features)
        return fn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        dry_run(model, input_shape)
    finally:
        for h in hooks:
            h.remove()
    return costs


def dry_run(model: nn.Module, input_shape) -> None:
    """One forward pass of a zero batch of one input in eval mode, without gradients, every module's
    mode restored afterwards: what the forward hooks that read layer shapes need."""
    ref = next(model.parameters())
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=ref.dtype, device=ref.device))
    finally:
        for m, mode in modes:
            m.training = mode


def flops(model: nn.Module, input_shape) -> int:
    """Multiply-accumulates of all Conv2d (out_h·out_w·out_c·in_c/groups·kh·kw) and Linear (in·out)
    layers for ONE input of shape ``input_shape`` (without the batch dimension, e.g. (3, 32, 32)).

    Counted with forward hooks on a zero input (eval mode; modes restored). BN, ReLU, pooling
    and additions are not counted.
    """
    return sum(u * i * o for u, i, o in layer_costs(model, tuple(input_shape)).values())


def param_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (BN running statistics included)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# -----------------------------------------------------------------------------
# filter importance scores: dict group -> (channels,)


def l1_scores(model: nn.Module, *, residual: bool = False) -> dict[str, torch.Tensor]:
    """L1 norm of each producer filter ‖W_c‖₁ (Li et al., "Pruning Filters for Efficient ConvNets", 2017).

    A residual stream channel (``residual=True``) scores Σ_P ‖W_P[c]‖₁ over all its producers
    P (stem or ``downsample`` conv, ``conv2`` of every block of the stage): the L1 mass of all
    the filters that write the channel, the natural extension of the paper's per-filter norm
    (the paper prunes the first layer of a block only). Producers with larger fan-in weigh
    more; :func:`select` compares channels after dividing by the group mean, so only the
    ranking within a group matters.
    """
    return {name: sum(model.get_submodule(p).weight.detach().abs().flatten(1).sum(1) for p in gr.producers)
            for name, gr in channel_groups(model, residual=residual).items()}


def _channel_products(model, dataset, n_grads, batch_size, seed, residual=False) -> dict[str, torch.Tensor]:
    """z_ic = Σ_P g_i^P · w^P_c: gradient row i dotted with filter c of every producer P of the
    group (one for inner groups, all of a stream's), per group, shape (n_grads, channels)."""
    groups = channel_groups(model, residual=residual)
    names = [f"{p}.weight" for gr in groups.values() for p in gr.producers]
    s = fisher.gradients(model, dataset, n_grads, batch_size=batch_size, names=names, seed=seed, progress=False)
    out = {}
    for gname, gr in groups.items():
        z = 0
        for p in gr.producers:
            pname = f"{p}.weight"
            w = model.get_parameter(pname).detach()  # (C, ...)
            G = s.X[:, s.layout.span(pname)].view(s.n, w.shape[0], -1)  # (n, C, fan_in)
            z = z + (G * w.view(1, w.shape[0], -1)).sum(-1)  # (n, C)
        out[gname] = z
    return out


@renamed(n="n_grads")
def taylor_scores(model: nn.Module, dataset, n_grads: int, *, batch_size: int = 1, seed: int = 0,
                  residual: bool = False) -> dict[str, torch.Tensor]:
    """First-order Taylor importance (Molchanov et al., CVPR 2019): I_c = (1/n) Σ_i (g_i · w_c)².

    g_i = gradient of the loss of mini-batch i (per-sample with ``batch_size=1``) w.r.t. the
    producer filter c, w_c its weights: (g_i · w_c) is the first-order loss change of removing
    the filter on sample i, squared and averaged over the n = ``n_grads`` rows as in the paper
    (``n``: the deprecated old name of ``n_grads``).

    ``residual=True`` adds the residual streams; for a stream channel w_c is the concatenation
    of row c of *every* producer (stem / ``downsample`` and each block's ``conv2``, i.e. the
    filters feeding the skip connections), so g_i · w_c = Σ_P g_i^P · w^P_c = ∂L_i/∂m_c, the
    derivative w.r.t. a gate m_c (at 1) scaling channel c at the output of all producer convs.
    """
    return {k: (z ** 2).mean(0)
            for k, z in _channel_products(model, dataset, n_grads, batch_size, seed, residual).items()}


@renamed(n="n_grads")
def taylor2_scores(model: nn.Module, dataset, n_grads: int, *, batch_size: int = 1, seed: int = 0,
                   residual: bool = False) -> dict[str, torch.Tensor]:
    """OBD-style second-order importance: ½ w_cᵀ F_cc w_c = ½ (1/n) Σ_i (g_i · w_c)².

    F = (1/n) Σ g_i g_iᵀ is the empirical Fisher of CHITA's (P) restricted to the filter's
    weights, i.e. the group's quadratic term ½‖X_c w_c‖²/n (LeCun et al. 1990 use the Hessian
    diagonal; this keeps the full within-filter block). Computed from the same rows, it is
    exactly half of :func:`taylor_scores` (same ranking): the empirical Fisher quadratic *is*
    the mean squared first-order term. It differs when X differs (batch_size, seed, n_grads;
    ``n`` is the deprecated old name of ``n_grads``).
    ``residual=True``: as in :func:`taylor_scores`, w_c spans all producer rows of a stream
    channel (F_cc is then the block of all those coordinates, cross-producer terms included).
    """
    return {k: 0.5 * (z ** 2).mean(0)
            for k, z in _channel_products(model, dataset, n_grads, batch_size, seed, residual).items()}


# -----------------------------------------------------------------------------
# selection under a FLOP budget


class FlopModel:
    """FLOPs of any keep configuration from the dense per-layer costs (exact for these models).

    A layer's MACs are unit·in·out (see :func:`layer_costs`); a group's count replaces ``out``
    of all its producers and ``in`` of all its consumers. A module may consume one group and
    produce another (``layer2.0.conv1`` reads stream 1, writes an inner group), so both change.
    """

    def __init__(self, model, input_shape, residual=False):
        self.costs = layer_costs(model, tuple(input_shape))
        self.groups = channel_groups(model, residual=residual)
        self.total = sum(u * i * o for u, i, o in self.costs.values())

    def __call__(self, counts: dict[str, int]) -> int:
        cin = {m: counts[g] for g, gr in self.groups.items() for m in gr.consumers}
        cout = {m: counts[g] for g, gr in self.groups.items() for m in gr.producers}
        return sum(u * cin.get(m, i) * cout.get(m, o) for m, (u, i, o) in self.costs.items())


def select(model: nn.Module, scores: dict[str, torch.Tensor], fraction: float, input_shape=None, *,
           residual: bool = False):
    """Keep masks removing a FLOP fraction close to, and never above, ``fraction`` (global greedy).

    Scores are normalised per group by their mean (Molchanov et al. 2019 normalise per layer
    too), then channels are visited from the lowest normalised score up: a channel is removed
    if its group keeps ≥ 1 channel and the removed FLOP fraction stays ≤ ``fraction``;
    otherwise it is skipped and the next one tried, so at the end no further channel removal
    fits in the budget (greedy, not the closest possible fraction). FLOPs are computed exactly from per-layer costs and the
    final fraction is measured with :func:`flops` on ``shrink(model, keep)``.
    ``residual=True``: the residual streams are candidates too (``scores`` must then hold them,
    e.g. ``l1_scores(model, residual=True)``); removing one stream channel lowers the cost of
    every producer and consumer of the stream, which the exact FLOP model accounts for.
    Returns (keep, achieved_fraction).
    """
    fraction = check_fraction(fraction)
    groups = channel_groups(model, residual=residual)
    input_shape = DEFAULT_INPUT_SHAPES[type(model)] if input_shape is None else tuple(input_shape)
    if not isinstance(scores, dict):
        raise TypeError(f"scores must be a dict group name -> tensor, got {type(scores).__name__}")
    unknown = [k for k in scores if k not in groups]
    if unknown:
        raise ValueError(f"unknown channel group name(s) {unknown}; valid groups are {list(groups)}")
    widths = group_widths(model, residual)
    missing = [k for k in groups if k not in scores]
    if missing:
        raise ValueError(f"scores lack channel group(s) {missing}")
    cost = FlopModel(model, input_shape, residual)
    cands = []  # (normalised score, group order, channel)
    for gi, (name, c) in enumerate(widths.items()):
        s = scores[name].detach().double().cpu().reshape(-1)
        if s.numel() != c:
            raise ValueError(f"scores[{name!r}] has {s.numel()} entries, the group has {c} channels")
        mean = float(s.mean())
        s = s / mean if mean > 0 else torch.ones_like(s)
        cands += [(float(s[ch]), gi, ch) for ch in range(c)]
    names = list(widths)
    keep = {name: torch.ones(c, dtype=torch.bool) for name, c in widths.items()}
    counts = dict(widths)
    budget = fraction * cost.total
    for _, gi, ch in sorted(cands):
        name = names[gi]
        if counts[name] <= 1:
            continue
        counts[name] -= 1
        if cost.total - cost(counts) <= budget:
            keep[name][ch] = False
        else:
            counts[name] += 1
    achieved = 1.0 - flops(shrink(model, keep), input_shape) / cost.total
    return keep, achieved


# -----------------------------------------------------------------------------
# Group-CHITA: (P) with a group-L0 constraint


@dataclass
class GroupResult:
    """w (p,), its support (p,) bool, kept groups (G,) bool, f after every iteration, iterations."""

    w: torch.Tensor = field(repr=False)
    support: torch.Tensor = field(repr=False)
    kept: torch.Tensor
    trace: list
    iterations: int


class _GroupProjection:
    """Keep the g groups of largest ‖u_G‖₂ (per budget class); zero every coordinate of a dropped group.

    Groups may overlap (MLPNet: fc2 weights belong to an fc1 neuron and an fc2 neuron); a
    coordinate then survives only if all its groups are kept, and coordinates in no group are
    free. For a partition this is the exact Euclidean projection onto the group-L0 set.
    """

    def __init__(self, p, groups, g, classes, device):
        self.G = len(groups)
        if self.G == 0:
            raise ValueError("groups is empty")
        idx = [torch.as_tensor(ix, dtype=torch.long).reshape(-1) for ix in groups]
        if any(ix.numel() == 0 for ix in idx):
            raise ValueError("every group must hold at least one coordinate")
        self.idx = torch.cat(idx).to(device)  # (Σ|G|,)
        if int(self.idx.min()) < 0 or int(self.idx.max()) >= p:
            raise ValueError(f"group indices must lie in [0, {p})")
        self.gid = torch.repeat_interleave(torch.arange(self.G), torch.tensor([len(ix) for ix in idx])).to(device)
        classes = [0] * self.G if classes is None else list(classes)
        g = [g] if isinstance(g, int) and not isinstance(g, bool) else list(g)
        if len(classes) != self.G or any(not 0 <= c < len(g) for c in classes):
            raise ValueError("classes must give, for every group, an index into the budget list g")
        self.members = [torch.tensor([i for i, c in enumerate(classes) if c == k], dtype=torch.long)
                        for k in range(len(g))]
        for k, (gk, mem) in enumerate(zip(g, self.members)):
            if isinstance(gk, bool) or not isinstance(gk, int) or not 1 <= gk <= len(mem):
                raise ValueError(f"g must keep between 1 and {len(mem)} groups (budget class {k}), got {gk}")
        self.g, self.p = g, p

    def norms(self, u: torch.Tensor) -> torch.Tensor:
        """(G,) ‖u_G‖₂ on the CPU."""
        return torch.zeros(self.G, dtype=u.dtype, device=u.device).index_add_(0, self.gid, u[self.idx] ** 2).sqrt().cpu()

    def kept(self, u: torch.Tensor) -> torch.Tensor:
        """(G,) bool: the top-g groups by ‖u_G‖₂ in every class (ties: lower group index)."""
        norms = self.norms(u)
        kept = torch.zeros(self.G, dtype=torch.bool)
        for gk, mem in zip(self.g, self.members):
            order = sorted(mem.tolist(), key=lambda i: (-float(norms[i]), i))
            kept[order[:gk]] = True
        return kept

    def support(self, kept: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(self.p, dtype=torch.bool, device=self.idx.device)
        mask[self.idx[~kept.to(self.idx.device)[self.gid]]] = False
        return mask

    def __call__(self, u):
        kept = self.kept(u)
        mask = self.support(kept)
        return torch.where(mask, u, torch.zeros_like(u)), mask, kept


def group_iht(problem: Problem, groups, g, w0: torch.Tensor | None = None, *, classes=None,
              max_iter: int = 200, tol: float = 1e-9, ridge_new: int = 3, swap_rounds: int = 10,
              swap_candidates: int = 3) -> GroupResult:
    """Group-CHITA: min f(w) of (P) s.t. at most ``g`` whole groups are nonzero.

    ``groups``: list of index tensors (coordinates of each group); ``g``: groups kept, or a
    list of budgets with ``classes[j]`` = budget index of group j (e.g. one budget per layer).
    Start: ``w0`` projected, default the group backsolve point (ridge on the groups of largest
    ‖w̄_G‖: CHITA-BSO, Alg 5, with group magnitude). Each IHT iteration, with gradient ∇f(w):

    - support exploration: P_g(w − τ∇f) for τ = 1/L (the majorisation step) and the grid
      τ_full·2^j, j = −3…8 (τ_full = exact step along the unrestricted −∇f); the
      ``ridge_new`` first new group supports met on the grid are also ridge-solved;
    - exact step on the current support S: w + τ*d, d = −∇f_S, τ* = ‖d‖²/(‖Xd‖² + 2λ‖d‖²);

    the best candidate is taken only if it lowers f, so f never increases. On stagnation
    (relative decrease < tol) the ridge solution on the current support is tried once
    (``ridge_on_support``); the run stops when that brings nothing new. Then a swap local
    search (``swap_rounds`` rounds): per budget class, the ``swap_candidates`` kept groups of
    least ‖w_G‖ × the dropped groups of largest ‖∇_G f‖, each swap ridge-solved, best
    improving swap taken. The result is the exact ridge solution on its final group support.
    """
    proj = _GroupProjection(problem.p, groups, g, classes, problem.device)
    if w0 is None:
        w, mask, kept = proj(problem.w_bar)
        w = ridge_on_support(problem, mask)
    else:
        w, mask, kept = proj(w0)
    r = problem.residual(w)
    f = problem.objective(w, r)
    trace, refit = [f], None
    inv_L = 1.0 / problem.lipschitz()
    it = 0
    for it in range(1, max_iter + 1):
        grad = problem.gradient(w, r)
        best = (w, mask, kept, r, f)
        # support exploration: projected steps on a geometric grid around the exact step τ_full
        gg = float(torch.dot(grad, grad))
        Xg = problem.matvec(grad)
        tau_full = gg / (problem.rdot(Xg, Xg) + 2 * problem.lam * gg) if gg > 0 else 0.0
        seen = {}
        taus = [inv_L] + ([tau_full * 2.0 ** j for j in range(-3, 9)] if tau_full > 0 else [])
        for tau in taus:
            w_c, m_c, k_c = proj(w - tau * grad)
            r_c = problem.residual(w_c)
            f_c = problem.objective(w_c, r_c)
            if f_c < best[4]:
                best = (w_c, m_c, k_c, r_c, f_c)
            key = tuple(k_c.tolist())
            if ridge_new and not torch.equal(k_c, kept) and key not in seen:
                seen[key] = (m_c, k_c)
        for m_c, k_c in list(seen.values())[:ridge_new]:  # new supports, solved exactly on
            w_c = ridge_on_support(problem, m_c)
            r_c = problem.residual(w_c)
            f_c = problem.objective(w_c, r_c)
            if f_c < best[4]:
                best = (w_c, m_c, k_c, r_c, f_c)
        # exact step on the current support
        d = torch.where(mask, -grad, torch.zeros_like(grad))
        dd = float(torch.dot(d, d))
        if dd > 0:
            Xd = problem.matvec(d)
            t = dd / (problem.rdot(Xd, Xd) + 2 * problem.lam * dd)
            w_c, r_c = w + t * d, r - t * Xd
            f_c = problem.objective(w_c, r_c)
            if f_c < best[4]:
                best = (w_c, mask, kept, r_c, f_c)
        if f - best[4] <= tol * max(abs(f), 1e-30):
            if refit is not None and torch.equal(refit, mask):
                break
            refit = mask.clone()
            w_r = ridge_on_support(problem, mask)
            r_r = problem.residual(w_r)
            f_r = problem.objective(w_r, r_r)
            if f_r < best[4]:
                best = (w_r, mask, kept, r_r, f_r)
            elif best[4] >= f:
                break
        w, mask, kept, r, f = best
        trace.append(f)
    if refit is None or not torch.equal(refit, mask):  # backsolve on the final support
        w_r = ridge_on_support(problem, mask)
        f_r = problem.objective(w_r)
        if f_r <= f:
            w, f = w_r, f_r
            trace.append(f)
    for _ in range(swap_rounds):  # local search: best single swap kept ↔ dropped, ridge-solved
        g_norm, w_norm = proj.norms(problem.gradient(w)), proj.norms(w)
        best = None
        for mem in proj.members:
            ins = sorted((i for i in mem.tolist() if not kept[i]), key=lambda i: (-float(g_norm[i]), i))
            outs = sorted((i for i in mem.tolist() if kept[i]), key=lambda i: (float(w_norm[i]), i))
            for i in outs[:swap_candidates]:
                for j in ins[:swap_candidates]:
                    k_c = kept.clone()
                    k_c[i], k_c[j] = False, True
                    m_c = proj.support(k_c)
                    w_c = ridge_on_support(problem, m_c)
                    f_c = problem.objective(w_c)
                    if f_c < (f if best is None else best[3]):
                        best = (w_c, m_c, k_c, f_c)
        if best is None or f - best[3] <= tol * max(abs(f), 1e-30):
            break
        w, mask, kept, f = best
        trace.append(f)
    w = torch.where(mask, w, torch.zeros_like(w))
    return GroupResult(w, mask, kept, trace, it)


def weight_groups(model: nn.Module, lay, *, residual: bool = False) -> tuple[list[torch.Tensor], list[str]]:
    """Coordinates (in the layout ``lay``) of every channel: producer row c and consumer column c
    (for a residual stream, ``residual=True``: row c of every producer, column c of every consumer).

    Returns (index tensors, one per channel in group order, the group name of each).
    """
    def pos(name):  # flat positions of parameter ``name``, shaped like it
        P = f"{name}.weight"
        return torch.arange(lay.span(P).start, lay.span(P).stop).view(lay.shapes[lay.names.index(P)])

    idx, owner = [], []
    for name, gr in channel_groups(model, residual=residual).items():
        rows, cols = [pos(m) for m in gr.producers], [pos(m) for m in gr.consumers]
        for c in range(rows[0].shape[0]):
            idx.append(torch.cat([r[c].reshape(-1) for r in rows] + [q[:, c].reshape(-1) for q in cols]))
            owner.append(name)
    return idx, owner


@dataclass(kw_only=True)
class ChannelReport(Report):
    """What a channel-pruning entry point did (a :class:`~chita_minimal.report.Report`): channels removed for real.

    target: the FLOP ``fraction`` asked to be removed; achieved: the FLOP fraction removed,
    1 − flops_pruned/flops_dense, measured with :func:`flops` on ``model``; masks: {} (the kept
    channels are ``keep``, one mask per channel group rather than per parameter); seconds: {"total"};
    stages: [] unless the family says otherwise. model: the small network, ``shrink(…, keep)``;
    keep: group → bool (channels,) on the CPU, True = kept; flops_dense, flops_pruned: MACs for one
    input (:func:`flops`). ``flop_fraction`` is the old name of ``achieved``.
    """

    model: nn.Module | None = field(repr=False)
    keep: dict[str, torch.Tensor] = field(repr=False)
    flops_dense: int
    flops_pruned: int

    @property
    def flop_fraction(self) -> float:
        return self.achieved

    def _extra_lines(self) -> list[str]:
        lines = []
        if self.keep:
            w = max(len("group"), *(len(g) for g in self.keep))
            lines.append(f"  {'group':<{w}}  {'channels kept':>13}  {'of':>6}")
            for g, m in self.keep.items():
                lines.append(f"  {g:<{w}}  {int(m.sum()):>13}  {m.numel():>6}")
        lines.append(f"  FLOPs (MACs for one input) {self.flops_dense:,} → {self.flops_pruned:,}")
        return lines


@dataclass(kw_only=True)
class StructuredReport(ChannelReport):
    """What :func:`group_chita_prune` did: a :class:`ChannelReport` (method "group-chita") plus
    bytes_dense / bytes_pruned (:func:`param_bytes` of the dense and the small model),
    objective_start (f of (P) at the group backsolve start), objective (f at the end) and the
    IHT iterations."""

    bytes_dense: int
    bytes_pruned: int
    objective_start: float
    objective: float
    iterations: int

    def _extra_lines(self) -> list[str]:
        return super()._extra_lines() + [
            f"  bytes {self.bytes_dense:,} → {self.bytes_pruned:,}; objective of (P) {self.objective_start:.6g} → "
            f"{self.objective:.6g} in {self.iterations} IHT iteration(s)"]


@renamed(n="n_grads")
def group_chita_prune(model: nn.Module, dataset, fraction: float, *, n_grads: int, l2: float = 1e-3,
                      batch_size: int = 1, seed: int = 0, scores=None, input_shape=None,
                      max_iter: int = 100, tol: float = 1e-9, swap_rounds: int = 10,
                      residual: bool = False) -> StructuredReport:
    """Group-CHITA channel pruning of a ResNetCifar or MLPNet to remove ≤ ``fraction`` of the FLOPs.

    1. Channel counts per group: :func:`select` on ``scores`` (default :func:`l1_scores`), so the
       FLOP budget is met; Group-CHITA then chooses *which* channels, with one budget per group
       (FLOPs depend only on the per-group counts, so the budget still holds).
    2. X (``n_grads`` rows of ``batch_size`` samples) = ``fisher.gradients`` restricted to the
       producer and consumer weights of all groups;
       a channel's variables are its producer row and consumer input column, so dropping the
       group removes the channel (and makes its BN bias irrelevant).
    3. :func:`group_iht` on (P) with λ = l2·n_grads/2, then write back into ``model`` (in place: pruned
       channels exactly zero, kept weights updated by the backsolve).

    ``residual=True`` prunes the residual streams too (default scores ``l1_scores(model,
    residual=True)``): a stream channel's variables are row c of all its producers and column c
    of all its consumers; groups then overlap (a block's ``conv2`` row belongs to a stream
    channel, its column to an inner channel), which :func:`group_iht` handles.

    Returns a :class:`StructuredReport` whose ``model`` is ``shrink(model, keep)``: the small model
    computes the same function as the written-back ``model``. ``n`` is the deprecated old name of
    ``n_grads``.
    """
    t0 = time.perf_counter()
    fraction = check_fraction(fraction)
    groups = channel_groups(model, residual=residual)  # TypeError for other models
    input_shape = DEFAULT_INPUT_SHAPES[type(model)] if input_shape is None else tuple(input_shape)
    if scores is None:
        scores = l1_scores(model, residual=residual)
    plan, _ = select(model, scores, fraction, input_shape, residual=residual)
    names = []
    for gr in groups.values():
        for pname in [f"{m}.weight" for m in gr.producers + gr.consumers]:
            if pname not in names:
                names.append(pname)
    sample = fisher.gradients(model, dataset, n_grads, batch_size=batch_size, names=names, seed=seed, progress=False)
    lay = sample.layout
    w_bar = torch.cat([model.get_parameter(p).detach().reshape(-1) for p in lay.names]).to(sample.X)
    problem = Problem(sample.X, w_bar, l2)
    idx, owner = weight_groups(model, lay, residual=residual)
    order = list(groups)
    classes = [order.index(o) for o in owner]
    budgets = [int(plan[name].sum()) for name in order]
    res = group_iht(problem, idx, budgets, classes=classes, max_iter=max_iter, tol=tol, swap_rounds=swap_rounds)
    write_back(model, lay, res.w)
    keep, j = {}, 0
    for name in order:
        c = plan[name].numel()
        keep[name] = res.kept[j:j + c].clone()
        j += c
    small = shrink(model, keep)
    f_dense, f_small = flops(model, input_shape), flops(small, input_shape)
    return StructuredReport(method="group-chita", target=fraction, achieved=1.0 - f_small / f_dense,
                            seconds={"total": time.perf_counter() - t0}, model=small, keep=keep, flops_dense=f_dense,
                            flops_pruned=f_small, bytes_dense=param_bytes(model), bytes_pruned=param_bytes(small),
                            objective_start=res.trace[0], objective=res.trace[-1], iterations=res.iterations)
