"""The one calibration driver of every layer-wise method: decoder block by decoder block, on pruned inputs.

    masks, info = prune_blocks(model, windows, method, sparsity=0.5)        # or pattern=(2, 4)

A layer-wise method only says how to prune one weight matrix W (out × in) given a statistic of its inputs
(``method.statistic``: "gram" → H = XᵀX/N, "norms" → the squared input norms ‖X_j‖²/N, None → nothing) —
see :class:`chita_minimal.methods.layer_method.LayerMethod`. This module does the rest, once for all methods:

1. the inputs of the first decoder block are captured on the calibration windows (one forward of the
   embeddings, stopped at the block; its keyword arguments — masks, rotary embeddings — are kept);
2. for each block i in order, on its inputs (the outputs of the already pruned blocks < i), stage after stage of
   the block's forward pass (:func:`layer_stages` — Llama: q/k/v, then o, then gate/up, then down): hooks on the
   stage's maps accumulate the statistic while the block runs up to them, and the stage is pruned, so that every
   map is calibrated on the outputs of the pruned maps before it in its block too (GPTQ's "true sequential";
   ``true_sequential=False``: every map of the block on one pass of the block before it is pruned); the pruned
   block runs again and its outputs become block i + 1's inputs.

Memory: one block's activations for the calibration windows (n × T × hidden, twice) and the statistics of
one block's layers (d × d each; layers that read the same input share one Gram). Nothing n × p.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from chita_minimal.network.language import (decoder_blocks, is_conv1d, is_linear, set_weight_matrix, stack_windows,
                                            weight_matrix)
from chita_minimal.solver.layer import layer_error as reconstruction_error
from chita_minimal.solver.problem import num_kept


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the first decoder block."""


def block_layers(model: nn.Module, names=None) -> list[dict[str, nn.Module]]:
    """Per decoder block, {weight name: linear module} of its Linear / Conv1D maps, in execution order of
    definition; only those in ``names`` when given (ValueError for a name outside the decoder blocks)."""
    prefix, blocks = decoder_blocks(model)
    out = []
    for i, block in enumerate(blocks):
        out.append({f"{prefix}.{i}.{sub}.weight": m for sub, m in block.named_modules() if sub and is_linear(m)})
    if names is not None:
        wanted = list(names)
        inside = {n for layers in out for n in layers}
        outside = [n for n in wanted if n not in inside]
        if outside:
            raise ValueError(f"layer-wise pruning of a language model prunes the linear maps inside its decoder "
                             f"blocks ({prefix}.*); not one of them: {', '.join(outside[:3])}")
        keep = set(wanted)
        out = [{n: m for n, m in layers.items() if n in keep} for layers in out]
    return out


def capture_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int, device) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) entering the first decoder block, one pair per batch of windows."""
    _, blocks = decoder_blocks(model)
    caught = []

    def hook(module, args, kwargs):
        caught.append((args[0].detach(), {k: v for k, v in kwargs.items()}))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch_size):
                try:
                    model(ids[i:i + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(caught) != (len(ids) + batch_size - 1) // batch_size:
        raise ValueError("the first decoder block was not reached by the forward pass")
    return caught


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """The block's outputs on every batch (with the same keyword arguments): the next block's inputs."""
    with torch.no_grad():
        return [(_hidden(block(x, **kw)), kw) for x, kw in inputs]


def _same_tensor(held: tuple, x: torch.Tensor) -> bool:
    """Whether ``x`` is the tensor ``held`` = (tensor, its version counter then) refers to, unchanged since: the
    identity of a layer input (see :class:`InputStatistics` for why not its address)."""
    return held[0] is x and held[1] == x._version


class InputStatistics:
    """Forward pre-hooks that accumulate Σ xxᵀ (kind "gram") or Σ x² (any other kind, e.g. "norms") of each
    layer's inputs over the calibration tokens. Layers fed the same tensor (q/k/v, gate/up) share one product.

    "The same tensor" is the same tensor object, unchanged since (its version counter), held here until the next
    input arrives — not the same memory address: a freed activation's address is reused by the allocator for the
    next one of the same shape (the next batch's q/k/v input, or o_proj's input after q/k/v's), and a product
    keyed on the address was then taken for a tensor it was not computed from, at random."""

    def __init__(self, layers: dict[str, nn.Module], kind: str):
        self.kind, self.sums, self.counts, self._last = kind, {}, {}, (None, -1, None)
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name):
        def pre(module, args):
            s = self._last[2]
            if not _same_tensor(self._last, args[0]):
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1])
                x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
                s = (x.T @ x if self.kind == "gram" else (x * x).sum(0)).to(torch.float64)
                self._last = (args[0], args[0]._version, s)
            self.sums[name] = self.sums[name] + s if name in self.sums else s.clone()
            self.counts[name] = self.counts.get(name, 0) + args[0].numel() // args[0].shape[-1]
        return pre

    def pop(self, name) -> torch.Tensor:
        return self.sums.pop(name) / self.counts[name]

    def remove(self):
        for h in self.handles:
            h.remove()
        self._last = (None, -1, None)


def block_statistics(block: nn.Module, inputs, layers: dict[str, nn.Module], kind: str,
                     stop_after: nn.Module | None = None) -> InputStatistics:
    """One pass of ``block`` over the calibration ``inputs`` with :class:`InputStatistics` hooks on ``layers``
    (``kind`` "gram" for Σ xxᵀ, else Σ x²), ended at the input of ``stop_after`` when given (the rest of the block
    is not needed); the hooks are removed afterwards, the statistics stay (``.pop(name)``)."""
    stats = InputStatistics(layers, kind)

    def stop(module, args):
        raise _Stop

    handle = None if stop_after is None else stop_after.register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            for x, kw in inputs:
                try:
                    block(x, **kw)
                except _Stop:
                    pass
    finally:
        stats.remove()
        if handle is not None:
            handle.remove()
    return stats


def layer_stages(block: nn.Module, inputs, layers: dict[str, nn.Module]) -> list[dict[str, nn.Module]]:
    """``layers`` grouped into the stages of the block's forward pass, in call order: the maps that read one and the
    same tensor form a stage (Llama: q/k/v, o, gate/up, down; GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj).
    Found on the first batch of ``inputs``; a map the pass never calls is a ValueError naming it."""
    calls, last = [], [(None, -1)]  # (name, whether it starts a stage) per first call; the latest input

    def hook(name):
        def pre(module, args):
            if all(n != name for n, _ in calls):
                calls.append((name, not _same_tensor(last[0], args[0])))
                last[0] = (args[0], args[0]._version)
        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    try:
        run_block(block, inputs[:1])
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if all(n != c for c, _ in calls)]
    if missing:
        raise ValueError(f"the decoder block's forward pass does not call {', '.join(missing[:3])}: "
                         "exclude it via names")
    stages = []
    for name, starts in calls:
        if starts:
            stages.append({})
        stages[-1][name] = layers[name]
    return stages


def prune_blocks(model: nn.Module, windows, method, *, sparsity: float | None = None, pattern=None, names=None,
                 batch_size: int = 8, device=None, progress: bool = False, layer_error: bool = True,
                 true_sequential: bool = True):
    """Prune every linear map of the decoder blocks in place with ``method.prune_layer``, block after block.

    windows: (n, T) token ids (a LongTensor or a dataset of windows), the calibration set as given (None for a
    method whose statistic is None); sparsity: per layer (each layer keeps round((1 − s)·numel) weights), or
    pattern (n, m); names: the weights to prune (default: all Linear / Conv1D maps inside the decoder blocks);
    true_sequential: each map calibrated on the pruned maps before it in its block (default), else all maps of a
    block on one pass of the block as it was before pruning.

    Returns (masks {name: bool (out_stored, in_stored) on the CPU}, info) with info = {"seconds": {...},
    "layer_error": {name: f(Ŵ)/f(0) on the layer's calibration Gram} (statistic "gram" only)}.
    """
    from tqdm.auto import tqdm

    per_block = block_layers(model, names)
    if not any(per_block):
        raise ValueError("no linear map to prune in the decoder blocks")
    _, blocks = decoder_blocks(model)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    seconds = {"calibration": 0.0, "solve": 0.0}
    errors, masks = {}, {}
    statistic = method.statistic
    inputs = None
    if statistic is not None:
        t = time.perf_counter()
        ids = stack_windows(windows)
        inputs = capture_inputs(model, ids, batch_size, dev)
        seconds["calibration"] += time.perf_counter() - t
    for i in tqdm(range(len(blocks)), desc=f"{method.name} blocks", disable=not progress, leave=False):
        stages = [per_block[i]]
        if statistic is not None and per_block[i] and true_sequential:
            stages = layer_stages(blocks[i], inputs, per_block[i])
        for layers in stages:
            stats = None
            if statistic is not None and layers:
                t = time.perf_counter()
                last = list(layers.values())[-1] if true_sequential else None  # stages are in call order
                stats = block_statistics(blocks[i], inputs, layers, statistic, stop_after=last)
                seconds["calibration"] += time.perf_counter() - t
            t = time.perf_counter()
            for name, m in layers.items():
                W = weight_matrix(m).detach()
                stat = None if stats is None else stats.pop(name).to(W.device)
                k = None if pattern is not None else num_kept(sparsity, W.numel())
                Wp, mask = method.prune_layer(W.float(), stat, k, pattern)
                Wp = torch.where(mask, Wp, torch.zeros((), dtype=Wp.dtype, device=Wp.device))
                if layer_error and statistic == "gram":
                    base = reconstruction_error(W.float(), torch.zeros_like(W, dtype=torch.float32), stat)
                    errors[name] = reconstruction_error(W.float(), Wp.float(), stat) / base if base > 0 else 0.0
                set_weight_matrix(m, Wp.to(m.weight.dtype))
                masks[name] = (mask.T if is_conv1d(m) else mask).cpu()
            seconds["solve"] += time.perf_counter() - t
        if statistic is not None and i + 1 < len(blocks):
            t = time.perf_counter()
            inputs = run_block(blocks[i], inputs)
            seconds["calibration"] += time.perf_counter() - t
    return masks, {"seconds": seconds, "layer_error": errors}
