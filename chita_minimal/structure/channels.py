"""Structured (channel) pruning that physically removes channels, and Group-CHITA.

A *channel group* is one prunable width of the network: channel c is output row c of its
producer layer(s) (and entry c of their norm layers) and the input column(s) of its consumer
layer(s) that read it. Groups come from Torch-Pruning's dependency graph
(:mod:`chita_minimal.structure.graph`: :func:`channel_groups`, :class:`ChannelGroup`), so any
model Torch-Pruning can trace works, given ``example_inputs`` (defaults exist for the package's
models, :data:`DEFAULT_INPUT_SHAPES`). On the package's CIFAR/MNIST models they are:

- ResNet20 (:class:`ResNetCifar`), default: the inner channels of every BasicBlock, named after
  the producer, e.g. ``"layer1.0.conv1"`` (producer ``conv1``, BatchNorm ``bn1``, consumer ``conv2``).
- ResNet20 with ``residual=True`` (opt-in), in addition: one residual *stream* per stage, the
  channels added together by the skip connections, named ``"layer1.residual"``,
  ``"layer2.residual"``, ``"layer3.residual"``. A stream channel c is written by every producer
  of the stream and read by every consumer, so removing it from all of them at once keeps the
  additions ``bn2(conv2(·)) + shortcut`` consistent:

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
- Other models (MobileNetV1, ResNet50, your own): one group per coupled width, named after its
  first producer (streams: ``"<stage>.residual"``); a depthwise conv belongs to the group of the
  channels it filters, as a producer; flatten → Linear heads and concatenations read channels
  through index maps (see :mod:`~chita_minimal.structure.graph`).

Pieces::

    keep = {"layer1.0.conv1": mask16, ...}      # bool (channels,), True = kept; absent = all kept
    small = shrink(model, keep)                 # NEW dense model with smaller layers
    flops(small, (3, 32, 32)); param_bytes(small)
    keep, frac = select(model, l1_scores(model), 0.5)          # ≤ 50 % of the FLOPs removed
    keep, frac = select(model, l1_scores(model, residual=True), 0.5, residual=True)  # streams too
    small = shrink(model, keep)                 # accepts "layerK.residual" masks as they are
    report = cm.shrink(model, data, 0.5, "group-chita", n_grads=128, l2=1e-3)   # a StructuredReport
    report.model, report.keep, report.achieved  # the small model, kept channels, FLOP fraction removed
    # any other model: pass what it is called with (or input_shape=, where a function has one)
    x = torch.zeros(1, 3, 64, 64)
    keep, frac = select(net, l1_scores(net, example_inputs=x), 0.5, (3, 64, 64))
    small = shrink(net, keep, example_inputs=x)

Scores: L1 filter norms (Li et al., ICLR 2017), first-order Taylor importance (Molchanov et
al., CVPR 2019) and its OBD-style second-order (Fisher) counterpart (LeCun et al. 1990). They
sum over *all* the producer rows of a channel (for a stream: stem, ``conv2`` of every block,
``downsample``, i.e. the filters feeding the skip connections; for a MobileNet group: the
pointwise filter and the depthwise filter of the channel), through the group's index maps.
Group-CHITA: problem (P) of CHITA (Benbaki et al., ICML 2023) under a group-L0 constraint,
solved by IHT with group projection and a line search, then backsolve on the chosen groups.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader

from chita_minimal.network import fisher, samples
from chita_minimal.network.params import write_back
from chita_minimal.report import Report
from chita_minimal.solver.problem import Problem, ridge_on_support
from chita_minimal.structure.graph import (all_groups, channel_groups, default_input_shape, example_inputs_for,
                                           missing_inputs, prune_channels)
from chita_minimal.structure.graph import DEFAULT_INPUT_SHAPES, ChannelGroup, ResidualGroup  # noqa: F401 (re-exported)
from chita_minimal.structure.graph import MissingExampleInputs  # noqa: F401 (re-exported)
from chita_minimal.utils import check_choice, check_fraction, deprecated, renamed


# -----------------------------------------------------------------------------
# channel groups (built in chita_minimal.structure.graph)


def group_widths(model: nn.Module, residual: bool = False, *, example_inputs=None) -> dict[str, int]:
    """Channels of each group (of :func:`channel_groups`)."""
    return {name: gr.channels for name, gr in channel_groups(model, example_inputs, residual=residual).items()}


def check_keep(model: nn.Module, keep, residual: bool = False, *, example_inputs=None,
               groups=None) -> dict[str, torch.Tensor]:
    """Validated keep masks, one bool (channels,) per group (absent groups: all kept); ``groups``: the model's
    channel groups when the caller has them (no second trace)."""
    widths = group_widths(model, residual, example_inputs=example_inputs) if groups is None else \
        {name: gr.channels for name, gr in groups.items()}
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


def _input_shape(model: nn.Module, input_shape=None, example_inputs=None) -> tuple:
    """One input's shape for FLOP counting: ``input_shape``, else that of a single-tensor
    ``example_inputs``, else the model's default (:class:`MissingExampleInputs` if none)."""
    if input_shape is not None:
        return tuple(input_shape)
    if isinstance(example_inputs, torch.Tensor):
        return tuple(example_inputs.shape[1:])
    shape = default_input_shape(model)
    if shape is None:
        raise missing_inputs(model, input_shape=True)
    return shape


# -----------------------------------------------------------------------------
# physical removal


def shrink(model: nn.Module, keep: dict[str, torch.Tensor], example_inputs=None) -> nn.Module:
    """A NEW smaller dense model keeping only the channels ``keep[group]`` (True = kept); ``model`` is untouched.

    Removing channel c of a group deletes row c of every producer's weight (and bias), entry c
    of every norm layer (weight, bias, running_mean, running_var) and the input columns of every
    consumer that read channel c (one column, or the HW columns of a flatten → Linear head);
    a depthwise conv of the group loses filter c and one group. The channel is removed
    *entirely*: its BN bias, which in the dense model makes the channel a constant relu(β_c)
    fed to the consumer, goes too. Hence the small model equals the dense model whenever every
    removed channel contributes nothing to the consumers — their columns are zero, or the
    producer rows *and* BN weight/bias are zero. Groups absent from ``keep`` keep all channels.

    ``keep`` may also hold residual streams (``"layerK.residual"``, see :func:`channel_groups`
    with ``residual=True``): channel c is then removed from every producer (rows, BN entries)
    and every consumer (input columns) of the stream, so the skip additions stay consistent.
    The small model equals the dense one when, for every removed stream channel, all producer
    rows and BN weights/biases are zero (the channel is then 0 at every addition), or all
    consumer columns are zero (nothing reads it). Streams absent from ``keep`` keep their width.

    Works on any model Torch-Pruning can trace (``example_inputs`` as for :func:`channel_groups`):
    the model is deep-copied, the copy traced, and each group's dropped channels removed by
    Torch-Pruning (:func:`graph.prune_channels`). Modes (train/eval) and ``requires_grad`` flags
    are kept.
    """
    example_inputs = example_inputs_for(model, example_inputs)
    groups = all_groups(model, example_inputs)  # stream names too; MLPNet: its usual groups
    masks = check_keep(model, keep, residual=True, example_inputs=example_inputs)
    drop = {name: torch.nonzero(~masks[name]).squeeze(1) for name in keep}
    small = copy.deepcopy(model)
    prune_channels(small, groups, drop, example_inputs)
    return small


# -----------------------------------------------------------------------------
# cost


def layer_costs(model: nn.Module, input_shape) -> dict[str, tuple[int, int, int]]:
    """Per Conv2d/Linear module: (unit, in, out_channels) with MACs = unit·in·out at batch 1.

    Conv2d: unit = out_h·out_w·kh·kw and in = in_channels/groups, the input channels each filter
    reads (1 for a depthwise conv); Linear: unit = the number of output rows (1 for 2-D input),
    in = in_features.
    """
    costs, hooks = {}, []

    def hook(name):
        def fn(m, inp, out):
            if isinstance(m, nn.Conv2d):
                unit = out.shape[-2] * out.shape[-1] * m.kernel_size[0] * m.kernel_size[1]
                costs[name] = (unit, m.in_channels // m.groups, m.out_channels)
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


BUDGETS = ("flops", "params")


def budget_costs(model: nn.Module, input_shape, budget: str = "flops") -> dict[str, tuple[int, int, int]]:
    """:func:`layer_costs` for a budget: "flops" (multiply-adds, unit·in·out) or "params" (the weights of the
    Conv2d/Linear layers, unit = kh·kw for a conv and 1 for a Linear), both of the form unit·in·out, so that
    :class:`FlopModel` counts either for any keep configuration."""
    check_choice("budget", budget, BUDGETS)
    costs = layer_costs(model, tuple(input_shape))
    if budget == "params":
        costs = {m: (model.get_submodule(m).weight.numel() // (i * o), i, o) for m, (_, i, o) in costs.items()}
    return costs


def weight_count(model: nn.Module, input_shape) -> int:
    """Weights of the Conv2d/Linear layers the forward pass runs (the "params" budget; biases and norms aside)."""
    return sum(u * i * o for u, i, o in budget_costs(model, input_shape, "params").values())


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


def l1_scores(model: nn.Module, *, residual: bool = False, example_inputs=None) -> dict[str, torch.Tensor]:
    """L1 norm of each producer filter ‖W_c‖₁ (Li et al., "Pruning Filters for Efficient ConvNets", 2017).

    A channel with several producers scores Σ_P ‖W_P[c]‖₁ over all of them: for a residual
    stream (``residual=True``) the stem or ``downsample`` conv and ``conv2`` of every block of the
    stage, for a MobileNet group the pointwise filter c and the depthwise filter c — the L1 mass
    of all the filters that write the channel, the natural extension of the paper's per-filter
    norm (the paper prunes the first layer of a block only). Producers with larger fan-in weigh
    more; :func:`select` compares channels after dividing by the group mean, so only the
    ranking within a group matters. Rows are summed per channel through the group's index maps
    (:meth:`ChannelGroup.to_channels`). ``example_inputs``: as for :func:`channel_groups`.
    """
    return {name: sum(gr.to_channels(p, model.get_submodule(p).weight.detach().abs().flatten(1).sum(1))
                      for p in gr.producers)
            for name, gr in channel_groups(model, example_inputs, residual=residual).items()}


def _sample_inputs(model, dataset, example_inputs):
    """Example inputs for tracing: given, the model's default, else the first input of an indexable
    dataset (a batch of one); None otherwise (:func:`channel_groups` then says what is missing)."""
    if example_inputs is not None or default_input_shape(model) is not None:
        return example_inputs
    data = dataset.dataset if isinstance(dataset, DataLoader) else dataset
    if not samples.is_indexable(data) or len(data) == 0:
        return None
    return samples.stack([samples.split_sample(data[0])[0]])


def _channel_products(model, dataset, n_grads, batch_size, seed, residual=False,
                      example_inputs=None, loss_fn=None, output_fn=None) -> dict[str, torch.Tensor]:
    """z_ic = Σ_P g_i^P · w^P_c: gradient row i dotted with filter c of every producer P of the
    group (one for inner groups, all of a stream's), per group, shape (n_grads, channels)."""
    groups = channel_groups(model, _sample_inputs(model, dataset, example_inputs), residual=residual)
    names = [f"{p}.weight" for gr in groups.values() for p in gr.producers]
    s = fisher.gradients(model, dataset, n_grads, batch_size=batch_size, names=names, seed=seed, progress=False,
                         loss_fn=loss_fn, output_fn=output_fn)
    out = {}
    for gname, gr in groups.items():
        z = 0
        for p in gr.producers:
            pname = f"{p}.weight"
            w = model.get_parameter(pname).detach()  # (rows, ...)
            G = s.X[:, s.layout.span(pname)].view(s.n, w.shape[0], -1)  # (n, rows, fan_in)
            z = z + gr.to_channels(p, (G * w.view(1, w.shape[0], -1)).sum(-1), dim=1)  # (n, C)
        out[gname] = z
    return out


@renamed(n="n_grads")
def taylor_scores(model: nn.Module, dataset, n_grads: int, *, batch_size: int = 1, seed: int = 0,
                  residual: bool = False, example_inputs=None, loss_fn=None,
                  output_fn=None) -> dict[str, torch.Tensor]:
    """First-order Taylor importance (Molchanov et al., CVPR 2019): I_c = (1/n) Σ_i (g_i · w_c)².

    g_i = gradient of the loss of mini-batch i (per-sample with ``batch_size=1``) w.r.t. the
    producer filter c, w_c its weights: (g_i · w_c) is the first-order loss change of removing
    the filter on sample i, squared and averaged over the n = ``n_grads`` rows as in the paper
    (``n``: the deprecated old name of ``n_grads``).

    ``residual=True`` adds the residual streams; for a stream channel w_c is the concatenation
    of row c of *every* producer (stem / ``downsample`` and each block's ``conv2``, i.e. the
    filters feeding the skip connections), so g_i · w_c = Σ_P g_i^P · w^P_c = ∂L_i/∂m_c, the
    derivative w.r.t. a gate m_c (at 1) scaling channel c at the output of all producer convs.
    The same holds for any group with several producers (a MobileNet group: the pointwise and
    the depthwise filter c). ``example_inputs``: as for :func:`channel_groups`; for models
    without a default, the dataset's first input is used. ``dataset``, ``loss_fn``, ``output_fn``: as for
    :func:`chita_minimal.prune` (a dataset, a DataLoader or batches; the loss of the model's output).
    """
    products = _channel_products(model, dataset, n_grads, batch_size, seed, residual, example_inputs, loss_fn,
                                 output_fn)
    return {k: (z ** 2).mean(0) for k, z in products.items()}


@renamed(n="n_grads")
def taylor2_scores(model: nn.Module, dataset, n_grads: int, *, batch_size: int = 1, seed: int = 0,
                   residual: bool = False, example_inputs=None) -> dict[str, torch.Tensor]:
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
            for k, z in _channel_products(model, dataset, n_grads, batch_size, seed, residual, example_inputs).items()}


# -----------------------------------------------------------------------------
# selection under a FLOP budget


class FlopModel:
    """FLOPs of any keep configuration from the dense per-layer costs (exact for these models).

    A layer's MACs are unit·in·out (see :func:`layer_costs`). Keeping n of a group's C channels
    removes (C − n)·k/C of ``out`` of each producer and of ``in`` of each consumer, k being the
    member's indices in the group (k = C for identity maps: ``out`` becomes n; a flatten → Linear
    consumer loses HW columns per channel). A depthwise conv is a producer only (its ``in`` is
    1 per filter), so its MACs scale with n. A module may consume one group and produce another
    (``layer2.0.conv1`` reads stream 1, writes an inner group), so both change.
    ``example_inputs`` (for tracing) default to one zero input of ``input_shape``.
    """

    def __init__(self, model, input_shape, residual=False, *, example_inputs=None, budget: str = "flops"):
        self.costs = budget_costs(model, tuple(input_shape), budget)  # "params": weights instead of MACs
        self.groups = channel_groups(model, example_inputs_for(model, example_inputs, input_shape), residual=residual)
        self.total = sum(u * i * o for u, i, o in self.costs.values())
        self._in, self._out = {}, {}  # module -> [(group, C, k)]
        for g, gr in self.groups.items():
            for side, names in ((self._out, gr.producers), (self._in, gr.consumers)):
                for m in names:
                    k = int((gr.channel_of(m) >= 0).sum())
                    side.setdefault(m, []).append((g, gr.channels, k))

    def __call__(self, counts: dict[str, int]) -> int:
        def width(side, m, dense):
            return dense - sum((C - counts[g]) * k // C for g, C, k in side.get(m, ()))

        return sum(u * width(self._in, m, i) * width(self._out, m, o) for m, (u, i, o) in self.costs.items())


def select(model: nn.Module, scores: dict[str, torch.Tensor], fraction: float, input_shape=None, *,
           residual: bool = False, example_inputs=None, budget: str = "flops"):
    """Keep masks removing a FLOP fraction close to, and never above, ``fraction`` (global greedy).
    ``budget="params"``: a fraction of the Conv2d/Linear weights instead (:func:`weight_count`).

    Scores are normalised per group by their mean (Molchanov et al. 2019 normalise per layer
    too), then channels are visited from the lowest normalised score up: a channel is removed
    if its group keeps ≥ 1 channel and the removed FLOP fraction stays ≤ ``fraction``;
    otherwise it is skipped and the next one tried, so at the end no further channel removal
    fits in the budget (greedy, not the closest possible fraction). FLOPs are computed exactly from per-layer costs and the
    final fraction is measured with :func:`flops` on ``shrink(model, keep)``.
    ``residual=True``: the residual streams are candidates too (``scores`` must then hold them,
    e.g. ``l1_scores(model, residual=True)``); removing one stream channel lowers the cost of
    every producer and consumer of the stream, which the exact FLOP model accounts for.
    ``input_shape``: one input for the FLOP count (default: the package model's, or that of
    ``example_inputs``); ``example_inputs`` for tracing default to a zero input of ``input_shape``.
    Returns (keep, achieved_fraction).
    """
    fraction = check_fraction("fraction", fraction)
    input_shape = _input_shape(model, input_shape, example_inputs)
    example_inputs = example_inputs_for(model, example_inputs, input_shape)
    groups = channel_groups(model, example_inputs, residual=residual)
    if not isinstance(scores, dict):
        raise TypeError(f"scores must be a dict group name -> tensor, got {type(scores).__name__}")
    unknown = [k for k in scores if k not in groups]
    if unknown:
        raise ValueError(f"unknown channel group name(s) {unknown}; valid groups are {list(groups)}")
    widths = {name: gr.channels for name, gr in groups.items()}
    missing = [k for k in groups if k not in scores]
    if missing:
        raise ValueError(f"scores lack channel group(s) {missing}")
    cost = FlopModel(model, input_shape, residual, example_inputs=example_inputs, budget=budget)
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
    allowed = fraction * cost.total
    for _, gi, ch in sorted(cands):
        name = names[gi]
        if counts[name] <= 1:
            continue
        counts[name] -= 1
        if cost.total - cost(counts) <= allowed:
            keep[name][ch] = False
        else:
            counts[name] += 1
    measure = flops if budget == "flops" else weight_count
    achieved = 1.0 - measure(shrink(model, keep, example_inputs), input_shape) / cost.total
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


def weight_groups(model: nn.Module, lay, *, residual: bool = False,
                  example_inputs=None) -> tuple[list[torch.Tensor], list[str]]:
    """Coordinates (in the layout ``lay``) of every channel: producer row c and consumer column c
    (for a residual stream, ``residual=True``: row c of every producer, column c of every consumer;
    through the index maps: the HW columns of a flatten → Linear consumer, a depthwise filter c).

    Returns (index tensors, one per channel in group order, the group name of each).
    """
    def pos(name):  # flat positions of parameter ``name``, shaped like it
        P = f"{name}.weight"
        return torch.arange(lay.span(P).start, lay.span(P).stop).view(lay.shapes[lay.names.index(P)])

    idx, owner = [], []
    for name, gr in channel_groups(model, example_inputs, residual=residual).items():
        rows, cols = {m: pos(m) for m in gr.producers}, {m: pos(m) for m in gr.consumers}
        for c in range(gr.channels):
            idx.append(torch.cat([r[gr.indices_of(m, c)].reshape(-1) for m, r in rows.items()]
                                 + [q[:, gr.indices_of(m, c)].reshape(-1) for m, q in cols.items()]))
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
    """What :func:`group_chita` (``cm.shrink(..., method="group-chita")``) did: a :class:`ChannelReport` (method "group-chita") plus
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


def group_chita(model: nn.Module, dataset, fraction: float, *, n_grads: int, l2: float = 1e-3,
                batch_size: int = 1, seed: int = 0, scores=None, input_shape=None,
                max_iter: int = 100, tol: float = 1e-9, swap_rounds: int = 10,
                residual: bool = False, example_inputs=None, budget: str = "flops") -> StructuredReport:
    """Group-CHITA channel pruning of a network to remove ≤ ``fraction`` of the FLOPs (``budget="params"``: of
    the Conv2d/Linear weights).

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
    computes the same function as the written-back ``model``. Models other than the package's need
    ``input_shape`` (one input, for FLOPs and tracing) or ``example_inputs`` (see :func:`channel_groups`).
    ``cm.shrink(model, data, fraction, method="group-chita", ...)`` runs it on a copy.
    """
    t0 = time.perf_counter()
    fraction = check_fraction("fraction", fraction)
    input_shape = _input_shape(model, input_shape, example_inputs)
    example_inputs = example_inputs_for(model, example_inputs, input_shape)
    groups = channel_groups(model, example_inputs, residual=residual)
    if scores is None:
        scores = l1_scores(model, residual=residual, example_inputs=example_inputs)
    plan, _ = select(model, scores, fraction, input_shape, residual=residual, example_inputs=example_inputs,
                     budget=budget)
    names = []
    for gr in groups.values():
        for pname in [f"{m}.weight" for m in gr.producers + gr.consumers]:
            if pname not in names:
                names.append(pname)
    sample = fisher.gradients(model, dataset, n_grads, batch_size=batch_size, names=names, seed=seed, progress=False)
    lay = sample.layout
    w_bar = torch.cat([model.get_parameter(p).detach().reshape(-1) for p in lay.names]).to(sample.X)
    problem = Problem(sample.X, w_bar, l2)
    idx, owner = weight_groups(model, lay, residual=residual, example_inputs=example_inputs)
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
    small = shrink(model, keep, example_inputs)
    f_dense, f_small = flops(model, input_shape), flops(small, input_shape)
    return StructuredReport(method="group-chita", target=fraction, achieved=1.0 - f_small / f_dense,
                            seconds={"total": time.perf_counter() - t0}, model=small, keep=keep, flops_dense=f_dense,
                            flops_pruned=f_small, bytes_dense=param_bytes(model), bytes_pruned=param_bytes(small),
                            objective_start=res.trace[0], objective=res.trace[-1], iterations=res.iterations)


# the per-family entry point before cm.shrink (deprecated; ``n``: the older name of ``n_grads``)
group_chita_prune = renamed(n="n_grads")(deprecated(
    group_chita, "group_chita_prune", "cm.shrink(model, data, fraction, method='group-chita', n_grads=...), which "
    "returns the same report and leaves the model given untouched"))
