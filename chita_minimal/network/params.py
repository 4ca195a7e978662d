"""Which parameters are prunable, how they map to one flat vector, and masks.

CHITA works on one flat weight vector w̄ ∈ R^p: the prunable parameters of the
network (by default every linear map: the ``.weight`` of every Conv1d/2d/3d and Linear module and
the input projections of MultiheadAttention; biases, norms and embeddings stay dense) concatenated in a fixed order. A
:class:`Layout` records that order, so that

    w_bar = flatten(model, lay)          # (p,)
    ... solve (P) on tensors only ...
    write_back(model, lay, w)            # the pruned weights go back in place

and, for fine-tuning after pruning, :func:`masks_from` / :class:`MaskKeeper` keep
the pruned weights at exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# -----------------------------------------------------------------------------
# which parameters


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def prunable_names(model: nn.Module, *, embeddings: bool = False) -> list[str]:
    """Default prunable set: every linear map's weight — the ``.weight`` of every Conv1d/2d/3d and
    Linear module, GPT-2's ``Conv1D`` (a linear map stored in × out), and the input projections of
    ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight`` when the key/value sizes differ;
    its ``out_proj`` is a Linear). Token embeddings and a language model's head (``get_output_embeddings()``,
    tied to the embedding or not) stay dense unless ``embeddings=True``: a pruned embedding row removes a token,
    and LLM pruning methods leave both dense.

    Names are as in ``model.named_parameters()`` and come in that order. A weight
    shared by several modules appears once (under its first name).
    """
    from chita_minimal.network.language import embedding_weights, is_conv1d

    _check_model(model)
    ids = set()
    for m in model.modules():
        if isinstance(m, _PRUNABLE_TYPES) or is_conv1d(m) or (embeddings and isinstance(m, nn.Embedding)):
            if isinstance(m.weight, nn.Parameter):
                ids.add(id(m.weight))
        elif isinstance(m, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if isinstance(getattr(m, attr, None), nn.Parameter):
                    ids.add(id(getattr(m, attr)))
    if not embeddings:
        ids -= embedding_weights(model)
    return [name for name, prm in model.named_parameters() if id(prm) in ids]


def dense_parameters(model: nn.Module, names) -> dict[str, int]:
    """The parameters outside ``names`` (left dense by a pruning call), name → number of entries."""
    chosen = set(names)
    return {name: prm.numel() for name, prm in model.named_parameters() if name not in chosen}


def owners(model: nn.Module, names=None) -> dict[str, tuple[nn.Module | None, str]]:
    """For each of the :func:`resolve`-d parameter names, the module holding it and its attribute:
    "layer1.0.conv1.weight" → (the conv module, "weight")."""
    mods = dict(model.named_modules())
    out = {}
    for name in resolve(model, names):
        owner, _, attr = name.rpartition(".")
        out[name] = (mods.get(owner), attr)
    return out


def resolve(model: nn.Module, names=None) -> list[str]:
    """Validate a list of parameter names to prune; ``None`` means :func:`prunable_names`.

    Any real parameter of the model may be named (e.g. a bias, if you want to prune
    it); unknown names and duplicates are errors. The given order is kept, since it
    fixes the column order of X and w̄.
    """
    _check_model(model)
    default = prunable_names(model)
    if names is None:
        if not default:
            raise ValueError(f"model {type(model).__name__} has no prunable parameters "
                             "(no Conv1d/2d/3d, Linear or MultiheadAttention weights); pass names explicitly")
        return default
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"names must be a list or tuple of parameter names, got {type(names).__name__}")
    names = list(names)
    if not names:
        raise ValueError("names is empty: give at least one parameter name (or None for the default set)")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"names must contain str, got {type(name).__name__}: {name!r}")
    known = dict(model.named_parameters())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown parameter name(s) in names: {unknown}; "
                         f"valid prunable names are {default} "
                         "(any other name from model.named_parameters() is accepted too)")
    seen, dups = set(), []
    for name in names:
        if name in seen and name not in dups:
            dups.append(name)
        seen.add(name)
    if dups:
        raise ValueError(f"duplicate parameter name(s) in names: {dups}")
    return names


# -----------------------------------------------------------------------------
# flat vector <-> parameters


@dataclass(frozen=True)
class Layout:
    """Where each prunable parameter lives in the flat vector w ∈ R^p.

    Parameter ``names[i]`` (shape ``shapes[i]``) occupies
    ``w[offsets[i] : offsets[i] + numels[i]]``, flattened in row-major order.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]
    offsets: tuple[int, ...]
    p: int  # total number of entries
    transposed: tuple[bool, ...] = ()  # per parameter: a linear map stored in × out (GPT-2's Conv1D); () = none

    def __len__(self) -> int:
        return len(self.names)

    def span(self, name: str) -> slice:
        """The slice of the flat vector that holds parameter ``name``."""
        if name not in self.names:
            raise ValueError(f"name {name!r} is not in the layout; layout names are {list(self.names)}")
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i] + self.numels[i])


def layout(model: nn.Module, names=None) -> Layout:
    """The :class:`Layout` of the parameters ``names`` (validated by :func:`resolve`)."""
    names = resolve(model, names)
    prms = dict(model.named_parameters())
    shapes = tuple(prms[n].shape for n in names)
    numels = tuple(prms[n].numel() for n in names)
    offsets, o = [], 0
    for k in numels:
        offsets.append(o)
        o += k
    return Layout(tuple(names), shapes, numels, tuple(offsets), o, transposed_weights(model, names))


def transposed_weights(model: nn.Module, names) -> tuple[bool, ...]:
    """Per name, whether it is the weight of a linear map stored in × out (GPT-2's ``Conv1D``), whose rows in the
    usual sense (one output's weights) are its columns."""
    from chita_minimal.network.language import is_conv1d

    owner = {}
    for m in model.modules():
        if is_conv1d(m) and isinstance(getattr(m, "weight", None), nn.Parameter):
            owner[id(m.weight)] = True
    prms = dict(model.named_parameters())
    return tuple(bool(owner.get(id(prms[n]), False)) for n in names)


def _check_layout(lay) -> None:
    if not isinstance(lay, Layout):
        raise TypeError(f"layout must be a Layout (from params.layout), got {type(lay).__name__}")


def _layout_params(model: nn.Module, lay: Layout) -> list[nn.Parameter]:
    """The model's parameters in layout order, checked against the layout's shapes."""
    _check_model(model)
    _check_layout(lay)
    prms = dict(model.named_parameters())
    out = []
    for name, shape in zip(lay.names, lay.shapes):
        if name not in prms:
            raise ValueError(f"layout parameter {name!r} is not a parameter of the model")
        if prms[name].shape != shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(prms[name].shape)} "
                             f"but the layout says {tuple(shape)}")
        out.append(prms[name])
    return out


def _check_flat(w, lay: Layout, arg: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 1 or w.numel() != lay.p:
        raise ValueError(f"{arg} must have shape ({lay.p},) to match the layout, got {tuple(w.shape)}")


def flatten(model: nn.Module, lay: Layout) -> torch.Tensor:
    """Detached copy of the layout's parameters concatenated into one vector, shape (p,)."""
    prms = _layout_params(model, lay)
    dtypes = {p.dtype for p in prms}
    devices = {p.device for p in prms}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"layout parameters must share one dtype and device to be flattened, "
                         f"got dtypes {sorted(map(str, dtypes))} and devices {sorted(map(str, devices))}")
    return torch.cat([p.detach().reshape(-1) for p in prms]).clone()  # (p,)


def write_back(model: nn.Module, lay: Layout, w: torch.Tensor) -> None:
    """Copy the flat vector ``w`` (p,) into the model's parameters, in place.

    Parameters keep their identity (optimizers holding them stay valid); ``w`` is
    cast to each parameter's dtype and device.
    """
    prms = _layout_params(model, lay)
    _check_flat(w, lay)
    with torch.no_grad():
        for prm, o, k in zip(prms, lay.offsets, lay.numels):
            prm.copy_(w[o:o + k].view(prm.shape))


def split(lay: Layout, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cut the flat vector ``w`` (p,) into per-parameter tensors (views of ``w``)."""
    _check_layout(lay)
    _check_flat(w, lay)
    return {name: w[o:o + k].view(shape)
            for name, shape, o, k in zip(lay.names, lay.shapes, lay.offsets, lay.numels)}


def per_layer_sparsity(lay: Layout, w: torch.Tensor) -> dict[str, float]:
    """Fraction of exactly-zero entries of each parameter in the flat vector ``w`` (p,)."""
    return {name: float((t == 0).sum().item()) / t.numel() for name, t in split(lay, w).items()}


# -----------------------------------------------------------------------------
# masks for fine-tuning


def masks_from(lay: Layout, support: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-parameter boolean masks (True = kept) from a flat support vector (p,) of bool."""
    _check_layout(lay)
    _check_flat(support, lay, "support")
    if support.dtype != torch.bool:
        raise TypeError(f"support must be a bool tensor, got dtype {support.dtype} "
                        "(use w != 0 to get the support of a weight vector)")
    return {name: t.clone() for name, t in split(lay, support).items()}


def _check_masks(model: nn.Module, masks) -> dict[str, nn.Parameter]:
    """The parameters the masks refer to, after checking names, shapes and dtypes."""
    _check_model(model)
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict name -> bool tensor, got {type(masks).__name__}")
    prms = dict(model.named_parameters())
    unknown = [name for name in masks if name not in prms]
    if unknown:
        raise ValueError(f"masks refer to unknown parameter(s) {unknown}")
    for name, m in masks.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a bool tensor")
        if m.shape != prms[name].shape:
            raise ValueError(f"masks[{name!r}] has shape {tuple(m.shape)}, "
                             f"parameter has shape {tuple(prms[name].shape)}")
    return {name: prms[name] for name in masks}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero, in place, every parameter entry whose mask is False."""
    prms = _check_masks(model, masks)
    with torch.no_grad():
        for name, prm in prms.items():
            prm.masked_fill_(~masks[name].to(prm.device), 0)


class MaskKeeper:
    """Keeps pruned weights at exactly zero while a model is fine-tuned.

    On creation it zeroes the masked weights and registers a gradient hook on each
    masked parameter that zeroes the masked gradient entries. Gradients alone are
    not enough: momentum buffers filled before pruning, or optimizers such as Adam,
    can still move a zero weight, so call :meth:`apply` after every
    ``optimizer.step()``::

        keeper = MaskKeeper(model, masks)          # masks from masks_from(...)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()        # masked grads are zero
            opt.step()
            keeper.apply()                         # re-zero what the step moved
        keeper.remove()                            # or: with MaskKeeper(...) as keeper:

    Used as a context manager it removes its hooks on exit.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        prms = _check_masks(model, masks)
        self.model = model
        self.masks = {name: m.to(prms[name].device) for name, m in masks.items()}
        self._handles = []
        for name, prm in prms.items():
            keep = self.masks[name]
            self._handles.append(prm.register_hook(lambda g, keep=keep: g.masked_fill(~keep, 0)))
        self.apply()

    def apply(self) -> None:
        """Zero the masked weights again (call after ``optimizer.step()``)."""
        apply_masks(self.model, self.masks)

    def remove(self) -> None:
        """Remove the gradient hooks (the weights keep their current values)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "MaskKeeper":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
