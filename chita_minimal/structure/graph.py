"""Channel groups of any traceable network, from Torch-Pruning's dependency graph.

A *channel group* is one prunable width of a network: removing channel c of the group means
removing, in every member layer at once, the indices that carry that channel. Which layers are
coupled, and through which indices, is what Torch-Pruning's ``DependencyGraph`` computes: it
traces one forward pass of ``example_inputs`` through autograd, links every Conv/Linear/norm
layer to the operations around it (additions, concatenations, flattening, depthwise convs,
reshapes) and, asked for the *pruning group* of output channels ``idxs`` of a layer, returns
every (layer, dimension, indices) that must go with them; each index carries the root channel
it came from (``_HybridIndex.root_idx``). Removing a group's channels is ``group.prune()``.

This module adds, on top of that graph:

- :func:`channel_groups`: one :class:`ChannelGroup` per Torch-Pruning group rooted at a prunable
  output dimension, its members sorted into ``producers`` (layers whose output rows are the
  channels: Conv/Linear, and depthwise convs, see below), ``bns`` (BatchNorm, LayerNorm,
  GroupNorm, InstanceNorm entries), ``consumers`` (layers whose input columns read them) and
  ``others`` (anything else Torch-Pruning prunes along: PReLU, embeddings, grouped-conv inputs,
  plain parameters, ...), with a name and the channel → index maps where they are not the
  identity. Groups feeding the network output are left out (the last classifier's classes are
  not prunable), as are groups that would change the output width of a layer in ``ignored``.
- :func:`prune_channels`: remove channels of several groups from a model with Torch-Pruning.
- Names, orders and the default inputs of the package's models, so that ResNet20's and
  MLPNet's groups are exactly the ones the package always had.

**Channel numbering and index maps.** Channel c of a group is output row c of its first producer
(the group is rooted there). For every other member, ``group.channel_of(name)`` gives, for each
index of the member's pruned dimension (output rows for producers, norms and ``others``, input
columns for consumers), the group channel it carries (−1: not in this group). Only members for
which this is not the identity c ↦ c are stored in ``group.index``:

- flatten → Linear: the Linear's input columns c·HW … c·HW + HW − 1 all carry channel c;
- concatenation: a consumer after ``torch.cat`` reads channel c at column offset + c;
- depthwise conv (groups = in = out channels): filter c reads channel c and writes channel c,
  so it sits in the group of the channel that feeds it as a producer-like member: removing the
  channel deletes its row c and lowers its ``groups`` (Torch-Pruning does it). Its map is the
  identity.

Scores that are sums over a group's rows/columns (L1 norms, Taylor products, the coordinates of
:func:`chita_minimal.structure.channels.weight_groups`) use :meth:`ChannelGroup.to_channels` /
:meth:`ChannelGroup.indices_of`, i.e. they sum through these maps; a depthwise conv, being a
producer, adds its filter c to channel c's scores.

**Names and order.** A group is named after its first producer in data-flow order (members are
sorted by their depth in the traced graph, ties in forward-call order, so a shortcut's 1×1
projection, which reads the block input, comes before the block's own last conv). A group with
several dense producers joined by an addition (a residual *stream*) is named
``"<top-level module holding most of its producers>.residual"`` (producers directly on the model,
like a stem conv, count only if there are no others; ties: the first in data-flow order;
``".residual.2"``… if the name is taken).
Streams are returned only with ``residual=True``, after all other groups.

**Limits** (Torch-Pruning's): a concatenation flattened straight into a Linear layer is not
followed (put a layer, e.g. a 1×1 conv, between them); when the branches differ in width this is
detected and :func:`channel_groups` raises a ValueError, with equal widths the branches are wrongly
coupled. Grouped (non-depthwise) convolutions' inputs are listed in ``others`` and are not part of
scores or FLOP counts.

**Inputs.** Tracing needs ``example_inputs``: a batch as the model is called with it (a tensor,
a tuple of positional inputs or a dict of keyword inputs, as in
:func:`chita_minimal.network.samples.call`). The package's models have defaults
(:data:`DEFAULT_INPUT_SHAPES`, one zero image); others must pass them. Tracing runs on a copy of
the module tree that shares the weights (Torch-Pruning puts the traced model in eval mode, and
floating-point inputs are made to require grad so that frozen layers are traced too); the model
itself is not touched.
Groups are cached per model structure (module tree, hyper-parameters, parameter shapes) and
input shapes, so repeated calls do not trace again; group objects are shared: do not modify
their index tensors.
"""

from __future__ import annotations

import copy
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch_pruning as tp
from torch import nn

from chita_minimal.models.mlpnet import MLPNet
from chita_minimal.models.mobilenet import MobileNetV1
from chita_minimal.models.resnet50 import ResNet50
from chita_minimal.models.resnet_cifar import ResNetCifar
from chita_minimal.structure.heads import HeadAttention
from chita_minimal.network import samples

#: One input (without the batch dimension) of the package's models, used when no example input is given.
DEFAULT_INPUT_SHAPES = {ResNetCifar: (3, 32, 32), MLPNet: (1, 28, 28), MobileNetV1: (3, 224, 224),
                        ResNet50: (3, 224, 224)}

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class MissingExampleInputs(ValueError, TypeError):
    """No example input for a model without a default one. A ValueError (also a TypeError, which
    models other than ResNetCifar and MLPNet raised before groups were traced)."""


# -----------------------------------------------------------------------------
# the group container


@dataclass(frozen=True)
class ChannelGroup:
    """Module names of one prunable width, in data-flow order, and its channel → index maps.

    producers: layers whose output row c is channel c (Conv/Linear; depthwise convs too);
    bns: norm layers with an entry per channel; consumers: layers whose input columns read the
    channels; others: further members Torch-Pruning prunes (not used by scores or FLOP counts);
    channels: the width; index: member name → (size of its pruned dimension,) channel of each
    index (−1: not in the group), only for members whose map is not the identity; residual:
    True for a stream (several producers joined by an addition).

    Equality compares the member names only. ``ChannelGroup("fc1", None, "fc2")`` is the group
    with one producer, no norm and one consumer (strings are single members, None none).
    """

    producers: tuple[str, ...]
    bns: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    others: tuple[str, ...] = ()
    channels: int | None = field(default=None, compare=False)
    index: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    residual: bool = field(default=False, compare=False)

    def __post_init__(self):
        for f in ("producers", "bns", "consumers", "others"):
            v = getattr(self, f)
            object.__setattr__(self, f, () if v is None else (v,) if isinstance(v, str) else tuple(v))

    # single-member views, for code written for one producer / norm / consumer per group
    def _single(self, role: str, allow_none: bool = False):
        names = getattr(self, role)
        if allow_none and not names:
            return None
        if len(names) != 1 or names[0] in self.index:
            raise ValueError(f"group of {self.producers[0]!r} has {role} {list(names)}"
                             + (" with a non-identity channel map" if len(names) == 1 else "")
                             + f"; this needs exactly one with channel c at index c: use .{role} and .channel_of")
        return names[0]

    @property
    def producer(self) -> str:
        """The only producer (ValueError if there are several or its map is not the identity)."""
        return self._single("producers")

    @property
    def bn(self) -> str | None:
        """The only norm layer, None if there is none (ValueError if there are several)."""
        return self._single("bns", allow_none=True)

    @property
    def consumer(self) -> str:
        """The only consumer (ValueError if there are several or its map is not the identity)."""
        return self._single("consumers")

    def channel_of(self, name: str) -> torch.Tensor:
        """(size,) group channel carried by each index of member ``name``'s pruned dimension (−1: none)."""
        return self.index[name] if name in self.index else torch.arange(self.channels)

    def indices_of(self, name: str, c: int) -> torch.Tensor:
        """Indices of member ``name``'s pruned dimension that carry channel ``c`` (``[c]`` for identity maps)."""
        if name not in self.index:
            return torch.tensor([c])
        return torch.nonzero(self.index[name] == c).squeeze(1)

    def to_channels(self, name: str, values: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum ``values`` (indexed along ``dim`` like member ``name``'s pruned dimension) per group channel.

        Identity map: ``values`` itself. Otherwise the entries of each channel are added (a flatten
        consumer's HW columns), entries of no channel are dropped; the result has ``channels`` along ``dim``.
        """
        if name not in self.index:
            return values
        chan = self.index[name].to(values.device)
        inside = chan >= 0
        shape = list(values.shape)
        shape[dim] = self.channels
        out = torch.zeros(shape, dtype=values.dtype, device=values.device)
        return out.index_add_(dim, chan[inside], values.index_select(dim, torch.nonzero(inside).squeeze(1)))

    def from_channels(self, name: str, values: torch.Tensor, fill) -> torch.Tensor:
        """The inverse spread of :meth:`to_channels`: per-channel ``values`` (channels,) placed on member ``name``'s
        pruned dimension (each index gets its channel's value, indices of no channel get ``fill``)."""
        owner = self.channel_of(name).to(values.device)
        return torch.where(owner >= 0, values[owner.clamp_min(0)], torch.full((), fill, dtype=values.dtype,
                                                                            device=values.device))


#: The old name of a residual stream's container: the same class (``residual`` is True for streams).
ResidualGroup = ChannelGroup


# -----------------------------------------------------------------------------
# inputs


def default_input_shape(model: nn.Module):
    """One input's shape (no batch) of a package model, None for other models.

    Subclasses get their parent's, except MLPNet's, which read (fc1.in_features,): MLPNet flattens
    its input, so a narrower subclass takes flat vectors of its own width.
    """
    if type(model) not in DEFAULT_INPUT_SHAPES and isinstance(model, MLPNet):
        return (model.fc1.in_features,)
    for cls in type(model).__mro__:
        if cls in DEFAULT_INPUT_SHAPES:
            return DEFAULT_INPUT_SHAPES[cls]
    return None


def missing_inputs(model: nn.Module, input_shape: bool = False) -> MissingExampleInputs:
    """The error for a model without a default input (``input_shape``: the function also takes one)."""
    alt = " or input_shape=... (one input's shape, without the batch)" if input_shape else ""
    return MissingExampleInputs(
        f"no default input for {type(model).__name__}: pass example_inputs=... (a batch the model can be "
        f"called with, e.g. torch.zeros(1, 3, 32, 32)){alt}; defaults exist only for the package's models "
        f"(ResNetCifar and MLPNet, MobileNetV1, ResNet50)")


def example_inputs_for(model: nn.Module, example_inputs=None, input_shape=None):
    """``example_inputs`` if given, else one zero input of ``input_shape`` or of the model's default shape
    (dtype and device of its parameters); :class:`MissingExampleInputs` if there is neither."""
    if example_inputs is not None:
        return example_inputs
    shape = input_shape if input_shape is not None else default_input_shape(model)
    if shape is None:
        raise missing_inputs(model)
    ref = next(model.parameters(), None)
    kw = {} if ref is None else dict(dtype=ref.dtype, device=ref.device)
    return torch.zeros(1, *shape, **kw)


def _requiring_grad(x):
    """A floating-point tensor as a fresh leaf that requires grad (so that layers with frozen weights are
    traced too: Torch-Pruning follows autograd); anything else as it is."""
    return x.detach().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


# -----------------------------------------------------------------------------
# tracing


def trace(model: nn.Module, example_inputs):
    """Torch-Pruning's DependencyGraph of ``model`` (traced in place: use a copy), plus the forward-call
    order of its modules and the output tensors' autograd nodes."""
    order, outputs = {}, []

    def record(mod, inputs, output):  # returns None: the output is left as it is
        order.setdefault(mod, len(order))

    hooks = [m.register_forward_hook(record) for m in model.modules()]

    def forward(m, x):
        out = samples.call(m, x)
        outputs.extend(t.grad_fn for t in _tensors(out) if t.grad_fn is not None)
        return out

    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, samples.apply(example_inputs, _requiring_grad),
                                                       forward_fn=forward, verbose=False)
    finally:
        for h in hooks:
            h.remove()
    return dg, order, set(outputs)


def _depths(dg) -> dict:
    """Longest path from a source, per node of the traced graph (Kahn's algorithm)."""
    nodes = list(dg.module2node.values())
    ins = {n: set(n.inputs) for n in nodes}
    outs = {n: set(n.outputs) for n in nodes}
    left = {n: len(ins[n]) for n in nodes}
    depth = {n: 0 for n in nodes}
    ready = [n for n in nodes if left[n] == 0]
    while ready:
        n = ready.pop()
        for o in outs[n]:
            depth[o] = max(depth[o], depth[n] + 1)
            left[o] -= 1
            if left[o] == 0:
                ready.append(o)
    return depth


def _output_layers(dg, out_grad_fns) -> set:
    """The Conv/Linear layers whose outputs reach the model output through parameter-free ops or norms."""
    stack = [n for n in dg.module2node.values() if n.grad_fn in out_grad_fns]
    seen, found = set(), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if isinstance(n.module, (nn.Linear, *_CONVS)):
            found.add(n.module)
        else:
            stack.extend(n.inputs)
    return found


def _attention_inner(model: nn.Module) -> set:
    """The q/k/v projections of every :class:`chita_minimal.structure.heads.HeadAttention`: the attention's inner
    width is cut into heads, so it is removed a whole head at a time (``structure.heads``), never channel-wise."""
    return {getattr(m, a) for m in model.modules() if isinstance(m, HeadAttention) for a in ("q", "k", "v")}


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONVS) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _role(m, out: bool) -> str:
    if isinstance(m, _NORMS):
        return "bns"
    if is_depthwise(m) or (out and isinstance(m, (nn.Linear, *_CONVS))):
        return "producers"
    if not out and (isinstance(m, nn.Linear) or (isinstance(m, _CONVS) and m.groups == 1)):
        return "consumers"
    return "others"


def _is_addition(node) -> bool:
    """An addition/subtraction of two traced tensors (an operation node, not a layer)."""
    fn = node.grad_fn
    return (not isinstance(node.module, (nn.Parameter, *_NORMS, nn.Linear, *_CONVS)) and hasattr(fn, "name")
            and fn.name().startswith(("AddBackward", "SubBackward")) and len(set(node.inputs)) > 1)


def _check_coverage(groups) -> None:
    """Every producer's output rows must be split among the groups (each row in one group; layers of
    unprunable groups in none), and no consumer column may carry two channels. Torch-Pruning cannot
    always follow a concatenation (e.g. one flattened straight into a Linear layer): it then maps
    channels to the wrong rows or columns, which this catches."""
    rows, cols = {}, {}
    for gr in groups:
        for side, names in ((rows, gr.producers), (cols, gr.consumers)):
            for m in names:
                chan = gr.channel_of(m)
                side[m] = side.get(m, torch.zeros(len(chan), dtype=torch.long)) + (chan >= 0)
    bad = [m for m, n in rows.items() if int(n.max()) > 1 or int(n.min()) == 0]
    bad += [m for m, n in cols.items() if int(n.max()) > 1]
    if bad:
        raise ValueError(f"Torch-Pruning could not tell which channels of {bad} belong together (a concatenation "
                         "or reshape it cannot follow, such as torch.cat flattened straight into a Linear layer); "
                         "the channel groups of this model are not available")


class _Graph:
    """The channel groups of a traced model copy (see the module docstring), in data-flow order."""

    def __init__(self, model: nn.Module, example_inputs, ignored=()):
        self.model = model
        self.dg, call, outs = trace(model, example_inputs)
        self.names = {m: n for n, m in model.named_modules()}
        self.params = {p: n for n, p in model.named_parameters()}
        depth = _depths(self.dg)
        self.key = {m: (depth[node], call.get(m, len(call))) for m, node in self.dg.module2node.items()}
        skip = _output_layers(self.dg, outs) | {model.get_submodule(n) for n in ignored} | _attention_inner(model)
        found = []
        for tpg in self.dg.get_all_groups(ignored_layers=list(skip), root_module_types=(nn.Linear, *_CONVS)):
            gr = self._group(tpg)
            if gr is not None:
                found.append(gr)
        found.sort(key=lambda g: self.key[model.get_submodule(g.producers[0])])
        _check_coverage(found)
        self.groups = {}
        for gr in [g for g in found if not g.residual] + [g for g in found if g.residual]:
            self.groups[self._name(gr)] = gr

    def _members(self, tpg):
        members, has_add = {"producers": [], "bns": [], "consumers": [], "others": []}, False
        for item in tpg:
            m, out = item.dep.target.module, self.dg.is_out_channel_pruning_fn(item.dep.handler)
            has_add |= _is_addition(item.dep.target)
            if isinstance(m, nn.Parameter) and m in self.params:
                members["others"].append((m, self.params[m], out, item))
            elif m in self.names:  # a layer (Torch-Pruning's operation nodes are not named)
                members[_role(m, out)].append((m, self.names[m], out, item))
        for role in members:
            members[role].sort(key=lambda e: self.key.get(e[0], (0, 0)))
        return members, has_add

    def _group(self, tpg) -> ChannelGroup | None:
        members, has_add = self._members(tpg)
        dense = [e for e in members["producers"] if not is_depthwise(e[0])]
        if not dense:
            return None  # only depthwise convs: the channels come from the network input
        root = dense[0][0]
        if tpg[0].dep.target.module is not root:  # re-root at the first producer: channel c = its row c
            pruner = self.dg.get_pruner_of_module(root)
            tpg = self.dg.get_pruning_group(root, pruner.prune_out_channels, list(range(pruner.get_out_channels(root))))
            members, has_add = self._members(tpg)
        C = self.dg.get_out_channels(root)
        index = {}
        for entries in members.values():
            for m, name, out, item in entries:
                size = self.dg.get_out_channels(m) if out else self.dg.get_in_channels(m)
                idxs, roots = list(item.idxs), list(item.root_idxs)
                if size is None or (size == C and idxs == roots == list(range(C))):
                    continue
                chan = torch.full((size,), -1, dtype=torch.long)
                chan[torch.tensor(idxs, dtype=torch.long)] = torch.tensor(roots, dtype=torch.long)
                index[name] = chan
        names = {role: tuple(e[1] for e in entries) for role, entries in members.items()}
        return ChannelGroup(**names, channels=C, index=index, residual=has_add and len(dense) > 1)

    def _name(self, gr: ChannelGroup) -> str:
        if not gr.residual:
            return gr.producers[0]
        nested = [p for p in gr.producers if "." in p] or gr.producers  # the stem conv1 is not a stage
        top = Counter(p.split(".")[0] for p in nested).most_common(1)[0][0]
        name, k = f"{top}.residual", 1
        while name in self.groups:
            k += 1
            name = f"{top}.residual.{k}"
        return name


# -----------------------------------------------------------------------------
# cache and public functions


_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64
_SIMPLE = (bool, int, float, str, type(None))


def _hashable(v):
    if isinstance(v, _SIMPLE):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(x, _SIMPLE) for x in v):
        return tuple(v)
    if callable(v) and not isinstance(v, nn.Module):
        return getattr(v, "__qualname__", type(v).__qualname__)
    return type(v).__qualname__


def _signature(model: nn.Module):
    """Module tree, classes, hyper-parameters and parameter/buffer shapes: what the traced graph depends on."""
    sig = [type(model)]
    for name, m in model.named_modules():
        attrs = tuple(sorted((k, _hashable(v)) for k, v in vars(m).items()
                             if not k.startswith("_") and k != "training"))
        tensors = tuple((k, tuple(t.shape)) for d in (m._parameters, m._buffers) for k, t in d.items() if t is not None)
        sig.append((name, type(m), attrs, tensors))
    return tuple(sig)


def _inputs_key(x):
    if isinstance(x, torch.Tensor):
        return ("t", tuple(x.shape), x.dtype, x.device.type)
    if isinstance(x, (tuple, list)):
        return ("s", tuple(_inputs_key(v) for v in x))
    if isinstance(x, dict):
        return ("d", tuple((k, _inputs_key(v)) for k, v in x.items()))
    if isinstance(x, _SIMPLE):
        return ("v", x)
    raise TypeError  # not cached


def _ignored_names(model: nn.Module, ignored) -> tuple[str, ...]:
    if ignored is None:
        return ()
    if isinstance(ignored, (str, nn.Module)):
        ignored = [ignored]
    names = {m: n for n, m in model.named_modules()}
    out = []
    for x in ignored:
        if isinstance(x, nn.Module):
            if x not in names:
                raise ValueError(f"ignored module {type(x).__name__} is not part of the model")
            x = names[x]
        if not isinstance(x, str):
            raise TypeError(f"ignored must hold module names or modules, got {type(x).__name__}")
        model.get_submodule(x)  # AttributeError for unknown names
        out.append(x)
    return tuple(sorted(set(out)))


def check_residual(residual) -> bool:
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
    return residual


def all_groups(model: nn.Module, example_inputs=None, ignored=None) -> dict[str, ChannelGroup]:
    """Every group, streams included (after the others), cached per model structure and input shapes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    example_inputs = example_inputs_for(model, example_inputs)
    ignored = _ignored_names(model, ignored)
    try:
        key = (_signature(model), _inputs_key(example_inputs), ignored)
    except TypeError:
        key = None
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        return dict(_CACHE[key])
    shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    groups = _Graph(copy.deepcopy(model, shared), example_inputs, ignored).groups  # a copy sharing the weights
    if key is not None:
        _CACHE[key] = groups
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return dict(groups)


def channel_groups(model: nn.Module, example_inputs=None, *, residual: bool = False,
                   ignored=None) -> dict[str, ChannelGroup]:
    """The prunable channel groups of ``model``, in data-flow order (see the module docstring).

    ``example_inputs``: what the model is called with for tracing (default: one zero input of
    the package models' shape; required for other models). ``residual=True`` appends the residual
    streams after the other groups. ``ignored``: modules (or names) whose output width must stay;
    the layers producing the network output are always kept.

    ResNetCifar: ``"layerK.i.conv1"`` (producer ``conv1``, BN ``bn1``, consumer ``conv2``) and the
    streams ``"layer1.residual"`` … ``"layer3.residual"``; MLPNet: ``"fc1"``, ``"fc2"`` (no streams).
    """
    residual = check_residual(residual)
    groups = all_groups(model, example_inputs, ignored)
    return groups if residual else {k: g for k, g in groups.items() if not g.residual}


def prune_channels(model: nn.Module, groups: Mapping[str, ChannelGroup], drop: Mapping[str, torch.Tensor],
                   example_inputs) -> None:
    """Remove channels ``drop[name]`` (index tensors) of ``groups`` from ``model``, in place, with Torch-Pruning.

    Traces ``model`` once and, per group, prunes ``DG.get_pruning_group(first producer, output channels,
    drop)``: rows of the producers and norms, columns of the consumers (through the index maps), depthwise
    convs' filters and groups. Torch-Pruning replaces the pruned parameters; modes and ``requires_grad``
    flags are restored here.
    """
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    dg = trace(model, example_inputs)[0]
    for name, idx in drop.items():
        if len(idx) == 0:
            continue
        root = model.get_submodule(groups[name].producers[0])
        pruner = dg.get_pruner_of_module(root)
        dg.get_pruning_group(root, pruner.prune_out_channels, [int(i) for i in idx]).prune()
    for n, m in model.named_modules():
        m.training = modes[n]
    for n, p in model.named_parameters():
        p.requires_grad_(grads.get(n, True))
