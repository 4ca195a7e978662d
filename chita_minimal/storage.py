"""Save and load pruned models: weights, masks and the report's metadata in one safetensors file.

    cm.save_pruned(model, report, "mlpnet_90.safetensors")                 # dense layout: as large as the dense model
    cm.save_pruned(model, report, "mlpnet_90.safetensors", sparse=True)    # kept values + bit masks only
    loaded = cm.load_pruned(lambda: cm.models.load_pretrained("mlpnet"), "mlpnet_90.safetensors")
    loaded.model, loaded.masks, loaded.keeper                               # keeper holds the zeros while fine-tuning

An unstructured sparse state dict is exactly as large, and the model exactly as fast, as the dense one:
the zeros are stored and multiplied like any other number. ``sparse=True`` stores each pruned
parameter as its kept values plus a packed bit mask (1 bit per weight), which is smaller once more
than about 1/33 of the fp32 weights are pruned; speed needs sparse kernels or removed structure
(:func:`chita_minimal.structure.channels.shrink`). A shrunk model is saved with the kept channel
indices (``keep=``) and rebuilt by shrinking the dense model from the factory again.

The file holds plain tensors (``safetensors`` never unpickles code) and string metadata: the format
version, the report (method, target, achieved, seconds, stages, and the family's own fields as JSON).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from chita_minimal.network.params import MaskKeeper

FORMAT = "chita_minimal.pruned/1"


def _json_safe(value):
    if isinstance(value, (torch.Tensor, nn.Module)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items() if not isinstance(v, (torch.Tensor, nn.Module))}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _report_metadata(report) -> dict:
    if report is None:
        return {}
    if not dataclasses.is_dataclass(report):
        raise TypeError(f"report must be a report object returned by a pruning call, got {type(report).__name__}")
    fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)
              if f.name != "masks" and not isinstance(getattr(report, f.name), nn.Module)}
    return {"type": type(report).__name__, **_json_safe(fields)}


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """bool (any shape) → uint8, 8 entries per byte (little bit order), padded with zeros."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (flat * weights).sum(1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, shape) -> torch.Tensor:
    n = math.prod(shape)
    bits = (packed.view(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:n].to(torch.bool).reshape(shape)


def save_pruned(model: nn.Module, report, path, *, masks: dict[str, torch.Tensor] | None = None,
                sparse: bool = False, keep: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s weights, its masks (``report.masks`` unless ``masks`` is given) and the report's
    metadata to ``path`` (safetensors). ``sparse=True``: masked parameters as kept values + packed bit
    masks. ``keep``: the kept-channel masks per group of a model shrunk by
    :func:`chita_minimal.structure.channels.shrink`, so that :func:`load_pruned` can rebuild it."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if masks is None:
        masks = getattr(report, "masks", None) or {}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    unknown = [n for n in masks if n not in state]
    if unknown:
        raise ValueError(f"masks name parameter(s) the model does not have: {', '.join(unknown)}")
    tensors, shapes, aliases, seen = {}, {}, {}, {}
    for name, value in state.items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape)) if value.numel() else None
        if key in seen and name not in masks:  # a tied weight (an LM head sharing the embedding): stored once
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        if name in masks:
            m = masks[name].detach().cpu().to(torch.bool)
            if m.shape != value.shape:
                raise ValueError(f"masks[{name!r}] has shape {tuple(m.shape)}, the parameter {tuple(value.shape)}")
            tensors[f"mask/{name}"] = _pack(m)
            shapes[name] = list(value.shape)
            if sparse:
                tensors[f"values/{name}"] = value[m].contiguous()
                continue
        tensors[f"state/{name}"] = value
    if keep is not None:
        for group, idx in keep.items():
            tensors[f"keep/{group}"] = torch.as_tensor(idx).cpu().contiguous()
    metadata = {"format": FORMAT, "report": json.dumps(_report_metadata(report)), "mask_shapes": json.dumps(shapes),
                "sparse": json.dumps(bool(sparse)), "aliases": json.dumps(aliases)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


@dataclass
class LoadedModel:
    """What :func:`load_pruned` returns: the model with the saved weights, its masks (True = kept), a
    :class:`~chita_minimal.network.params.MaskKeeper` holding the pruned weights at zero (None with
    ``attach_masks=False``), the report metadata as saved, and the kept channels of a shrunk model."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    keeper: MaskKeeper | None
    report: dict
    keep: dict[str, torch.Tensor] | None


def load_pruned(model_or_factory, path, *, attach_masks: bool = True, device=None,
                example_inputs=None) -> LoadedModel:
    """Restore a model written by :func:`save_pruned`.

    ``model_or_factory``: the dense architecture — a model (changed in place) or a function that
    returns one (e.g. ``lambda: cm.models.resnet20()``). A file saved with ``keep=`` is rebuilt by
    shrinking that model to the saved channels first (``example_inputs``: what the model is called
    with, needed for that by models other than the package's, see ``channels.shrink``).
    ``attach_masks``: re-attach the masks with a ``MaskKeeper`` for fine-tuning (call
    ``loaded.keeper.apply()`` after each optimizer step).
    """
    from safetensors import safe_open

    model = model_or_factory() if callable(model_or_factory) and not isinstance(model_or_factory, nn.Module) \
        else model_or_factory
    if not isinstance(model, nn.Module):
        raise TypeError("model_or_factory must be an nn.Module or a function returning one, "
                        f"got {type(model_or_factory).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pruned model at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} was not written by chita_minimal.save_pruned (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    keep = {k[len("keep/"):]: v for k, v in tensors.items() if k.startswith("keep/")} or None
    if keep is not None:
        from chita_minimal.structure.channels import shrink

        model = shrink(model, keep, example_inputs)
    shapes = json.loads(meta["mask_shapes"])
    masks = {name: _unpack(tensors[f"mask/{name}"], shape) for name, shape in shapes.items()}
    state = {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")}
    for name, m in masks.items():
        if f"values/{name}" in tensors:
            values = tensors[f"values/{name}"]
            full = torch.zeros(m.shape, dtype=values.dtype)
            full[m] = values
            state[name] = full
    for name, source in json.loads(meta.get("aliases", "{}")).items():  # tied weights stored once
        state[name] = state[source]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if device is not None:
        model.to(device)
    keeper = MaskKeeper(model, masks) if attach_masks and masks else None
    return LoadedModel(model=model, masks=masks, keeper=keeper, report=json.loads(meta.get("report", "{}")), keep=keep)
