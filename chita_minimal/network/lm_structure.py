"""MLP neurons and attention key/value groups removed for real from a Llama-family decoder, block after block.

    small, info = shrink_decoder(model, windows, 0.3, choose)      # 30 % of the decoder's multiply-adds

In a Llama-style block (Llama, SmolLM, Mistral, Qwen2: ``mlp.gate_proj/up_proj/down_proj`` and
``self_attn.q_proj/k_proj/v_proj/o_proj``) the removable units are

- an **MLP neuron** j: row j of ``gate_proj`` and ``up_proj`` and column j of ``down_proj``, the consumer;
- an **attention key/value group** g (grouped-query attention): the rows of key/value head g in ``k_proj`` and
  ``v_proj``, the rows of the query heads that read it in ``q_proj`` (heads g·r … g·r + r − 1, r = heads per
  key/value head) and their columns of ``o_proj``, the consumer. The block's attention reshapes by ``head_dim``
  and repeats each key/value head r times, so it runs unchanged on fewer groups.

The driver is the sequential one of the unstructured layer-wise methods
(:mod:`chita_minimal.network.sequential`): block i is calibrated on the outputs of the already shrunk blocks < i;
hooks collect the Gram matrices of the two consumers' inputs; ``choose(W, H, groups, keep, producers)`` — a
structure method's rule — returns the kept groups and, for methods that refit, the consumer's new weights; the
units are sliced out of the weights (new, smaller ``nn.Linear`` modules); the shrunk block runs to feed the next.

The budget is a fraction of the decoder's multiply-adds per token in its linear maps (the attention scores and
their weighting of the values, which grow with the context, are not counted): an MLP neuron costs 3·d, a
key/value group d·head_dim·(2r + 2). Every block loses the same share: ⌊fraction·groups⌋ key/value groups (at
least one kept), and as many neurons as make up the rest.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from chita_minimal.network.language import decoder_blocks, stack_windows
from chita_minimal.network.sequential import _Statistics, capture_inputs, run_block


def llama_parts(block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(mlp, attention) of a Llama-style block, each None when absent or not of that shape."""
    mlp = getattr(block, "mlp", None)
    attn = getattr(block, "self_attn", None)
    if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj",
                                                                                       "down_proj")):
        mlp = None
    if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj",
                                                                                         "v_proj", "o_proj")) \
            or not hasattr(attn, "head_dim") or not hasattr(attn, "num_key_value_groups"):
        attn = None
    return mlp, attn


def kv_groups(attn: nn.Module) -> torch.Tensor:
    """(groups, r·head_dim) columns of ``o_proj`` read from each key/value group's query heads."""
    hd, r = attn.head_dim, attn.num_key_value_groups
    n_kv = attn.k_proj.out_features // hd
    return torch.arange(n_kv * r * hd).view(n_kv, r * hd)


def decoder_macs(model: nn.Module) -> int:
    """Multiply-adds per token of the linear maps of the decoder blocks (attention scores not counted)."""
    _, blocks = decoder_blocks(model)
    return sum(m.in_features * m.out_features for b in blocks for m in b.modules() if isinstance(m, nn.Linear))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=like.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.train(like.training)
    return out


def remove_neurons(mlp: nn.Module, keep: torch.Tensor, down_weight: torch.Tensor | None = None) -> None:
    """Keep the MLP neurons ``keep`` (bool (d_ff,)): new gate/up/down maps; ``down_weight`` (d × d_ff) replaces
    the down projection's weights first (a refit), else they are kept as they are."""
    idx = keep.nonzero().squeeze(1).to(mlp.gate_proj.weight.device)
    W = mlp.down_proj.weight if down_weight is None else down_weight.to(mlp.down_proj.weight)
    for name in ("gate_proj", "up_proj"):
        m = getattr(mlp, name)
        setattr(mlp, name, _linear(m.weight[idx], None if m.bias is None else m.bias[idx], m))
    mlp.down_proj = _linear(W[:, idx], mlp.down_proj.bias, mlp.down_proj)


def remove_kv_groups(attn: nn.Module, keep: torch.Tensor, o_weight: torch.Tensor | None = None) -> None:
    """Keep the key/value groups ``keep`` (bool (groups,)): their key/value heads, their query heads, their columns
    of ``o_proj`` (``o_weight`` replaces its weights first, a refit)."""
    hd, r = attn.head_dim, attn.num_key_value_groups
    g = keep.nonzero().squeeze(1).tolist()
    kv_rows = torch.tensor([i * hd + j for i in g for j in range(hd)], device=attn.k_proj.weight.device)
    q_rows = torch.tensor([(i * r + h) * hd + j for i in g for h in range(r) for j in range(hd)],
                          device=attn.q_proj.weight.device)
    W = attn.o_proj.weight if o_weight is None else o_weight.to(attn.o_proj.weight)
    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        m = getattr(attn, name)
        setattr(attn, name, _linear(m.weight[rows], None if m.bias is None else m.bias[rows], m))
    attn.o_proj = _linear(W[:, q_rows], attn.o_proj.bias, attn.o_proj)


def plan_block(mlp, attn, fraction: float) -> tuple[int, int]:
    """(neurons kept, key/value groups kept) of one block removing ``fraction`` of its multiply-adds."""
    d_ff = mlp.down_proj.in_features if mlp is not None else 0
    d = mlp.down_proj.out_features if mlp is not None else attn.o_proj.out_features
    total = 3 * d * d_ff
    groups, group_cost = 0, 0
    if attn is not None:
        hd, r = attn.head_dim, attn.num_key_value_groups
        groups = attn.k_proj.out_features // hd
        group_cost = attn.q_proj.in_features * hd * (2 * r + 2)
        total += groups * group_cost
    drop_groups = min(math.floor(fraction * groups + 1e-9), groups - 1) if groups else 0
    rest = fraction * total - drop_groups * group_cost
    drop_neurons = min(max(round(rest / (3 * d)), 0), d_ff - 1) if d_ff else 0
    return d_ff - drop_neurons, groups - drop_groups


def shrink_decoder(model: nn.Module, windows, fraction: float, choose, *, batch_size: int = 8, device=None,
                   progress: bool = False, calibrate: bool = True):
    """Remove ``fraction`` of the decoder's linear multiply-adds (MLP neurons and key/value groups) in place.

    choose(W, H, groups, keep, producers) → (kept (G,) bool, new consumer weight or None): the structure method's
    rule for one consumer W (out × in) with the Gram H of its inputs, its column groups (G, s), the count to keep
    and the producer weights ({name: weight}, rows = units); ``calibrate=False`` (a rule that reads weights only):
    no calibration pass, H is None. Returns info {"seconds": {...}, "objective":
    {consumer name: what ``choose`` reported, if anything}, "kept": {block: (neurons, groups)}, "keep":
    {"<blocks>.<i>.mlp" / ".self_attn": bool mask of the units kept}}.
    """
    from tqdm.auto import tqdm

    prefix, blocks = decoder_blocks(model)
    parts = [llama_parts(b) for b in blocks]
    if not any(m is not None or a is not None for m, a in parts):
        raise ValueError(f"structured removal needs Llama-style decoder blocks (mlp.gate_proj/up_proj/down_proj, "
                         f"self_attn.q_proj/k_proj/v_proj/o_proj); {type(blocks[0]).__name__} has neither")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    seconds = {"calibration": 0.0, "solve": 0.0}
    inputs = None
    if calibrate:
        t = time.perf_counter()
        inputs = capture_inputs(model, stack_windows(windows), batch_size, dev)
        seconds["calibration"] += time.perf_counter() - t
    kept_counts, objective, masks = {}, {}, {}
    for i in tqdm(range(len(blocks)), desc="shrink blocks", disable=not progress, leave=False):
        mlp, attn = parts[i]
        keep_n, keep_g = plan_block(mlp, attn, fraction)
        consumers = {}
        if mlp is not None and keep_n < mlp.down_proj.in_features:
            consumers[f"{prefix}.{i}.mlp.down_proj"] = mlp.down_proj
        if attn is not None and keep_g < kv_groups(attn).shape[0]:
            consumers[f"{prefix}.{i}.self_attn.o_proj"] = attn.o_proj
        if consumers:
            stats = None
            if calibrate:
                t = time.perf_counter()
                stats = _Statistics(consumers, "gram")
                try:
                    run_block(blocks[i], inputs)
                finally:
                    stats.remove()
                seconds["calibration"] += time.perf_counter() - t
            t = time.perf_counter()
            for name, m in consumers.items():
                H = None if stats is None else stats.pop(name).to(m.weight.device)
                W = m.weight.detach().float()
                if name.endswith("down_proj"):
                    groups = torch.arange(W.shape[1]).view(-1, 1)
                    producers = {"gate_proj": mlp.gate_proj.weight.detach(), "up_proj": mlp.up_proj.weight.detach()}
                    kept, Wnew, info = _chosen(choose(W, H, groups, keep_n, producers))
                    remove_neurons(mlp, kept, Wnew)
                    masks[f"{prefix}.{i}.mlp"] = kept
                else:
                    groups = kv_groups(attn)
                    producers = {n: getattr(attn, n).weight.detach() for n in ("q_proj", "k_proj", "v_proj")}
                    kept, Wnew, info = _chosen(choose(W, H, groups, keep_g, producers))
                    remove_kv_groups(attn, kept, Wnew)
                    masks[f"{prefix}.{i}.self_attn"] = kept
                if info is not None:
                    objective[name] = info
            seconds["solve"] += time.perf_counter() - t
        kept_counts[i] = (keep_n, keep_g)
        if calibrate and i + 1 < len(blocks):
            t = time.perf_counter()
            inputs = run_block(blocks[i], inputs)
            seconds["calibration"] += time.perf_counter() - t
    return {"seconds": seconds, "objective": objective, "kept": kept_counts, "keep": masks}


def _chosen(out):
    kept, W = out[0], out[1]
    return kept.cpu(), W, out[2] if len(out) > 2 else None
