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
from chita_minimal.network.sequential import block_statistics, capture_inputs, run_block


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

    choose(W, H, groups, keep, producers, name) → (kept (G,) bool, new consumer weight or None, info or None): the structure
    method's rule for one consumer W (out × in) named ``name`` with the Gram H of its inputs, its column groups
    (G, s), the count to keep and the producer weights ({name: weight}, rows = units); ``calibrate=False`` (a rule
    that does not read the layers' inputs): no calibration pass, H is None. Returns info {"seconds": {...}, "objective":
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
                stats = block_statistics(blocks[i], inputs, consumers, "gram")
                seconds["calibration"] += time.perf_counter() - t
            t = time.perf_counter()
            for name, m in consumers.items():
                H = None if stats is None else stats.pop(name).to(m.weight.device)
                W = m.weight.detach().float()
                if name.endswith("down_proj"):
                    groups = torch.arange(W.shape[1]).view(-1, 1)
                    producers = {"gate_proj": mlp.gate_proj.weight.detach(), "up_proj": mlp.up_proj.weight.detach()}
                    kept, Wnew, info = _chosen(choose(W, H, groups, keep_n, producers, name))
                    remove_neurons(mlp, kept, Wnew)
                    masks[f"{prefix}.{i}.mlp"] = kept
                else:
                    groups = kv_groups(attn)
                    producers = {n: getattr(attn, n).weight.detach() for n in ("q_proj", "k_proj", "v_proj")}
                    kept, Wnew, info = _chosen(choose(W, H, groups, keep_g, producers, name))
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


def _chosen(out) -> tuple[torch.Tensor, torch.Tensor | None, object]:
    """(kept mask on the CPU, new consumer weight or None, info or None): what a rule returned, checked."""
    if not (isinstance(out, tuple) and len(out) == 3):
        raise TypeError("a structure rule returns (kept mask, new consumer weight or None, info or None), got "
                        f"{type(out).__name__}")
    kept, W, info = out
    return kept.cpu(), W, info


@torch.no_grad()
def unit_products(model: nn.Module) -> dict[str, torch.Tensor]:
    """Σ_{θ ∈ unit} θ·∂L/∂θ for every MLP neuron and key/value group, from the gradients now in ``.grad``: the
    first-order change of the loss when the unit is removed (its producer rows — gate/up, or the q/k/v rows of
    the group's heads, biases included — and its consumer columns of down_proj / o_proj). Keys: the consumer
    names, as :func:`shrink_decoder` gives them to a rule."""
    prefix, blocks = decoder_blocks(model)
    out = {}

    def rows(m: nn.Linear) -> torch.Tensor:
        z = (m.weight * m.weight.grad).sum(1, dtype=torch.float64)
        return z if m.bias is None else z + (m.bias * m.bias.grad).double()

    for i, block in enumerate(blocks):
        mlp, attn = llama_parts(block)
        if mlp is not None:
            down = mlp.down_proj
            out[f"{prefix}.{i}.mlp.down_proj"] = rows(mlp.gate_proj) + rows(mlp.up_proj) \
                + (down.weight * down.weight.grad).sum(0, dtype=torch.float64)
        if attn is not None:
            n_kv = kv_groups(attn).shape[0]
            o = attn.o_proj
            z = (o.weight * o.weight.grad).sum(0, dtype=torch.float64).view(n_kv, -1).sum(1)
            for name in ("q_proj", "k_proj", "v_proj"):
                z = z + rows(getattr(attn, name)).view(n_kv, -1).sum(1)
            out[f"{prefix}.{i}.self_attn.o_proj"] = z
    return out


def taylor_unit_scores(model: nn.Module, windows, *, batch_size: int = 1, device=None,
                       progress: bool = False) -> dict[str, torch.Tensor]:
    """First-order Taylor importance of every MLP neuron and key/value group (Molchanov et al., CVPR 2019, eq. 8
    for a group of parameters, as LLM-Pruner scores LLM groups): I_u = (1/B) Σ_b (Σ_{θ ∈ u} θ·∂L_b/∂θ)², L_b the
    next-token loss of batch b (``batch_size`` windows) of the dense model. The model's weights are not changed;
    its gradients are cleared afterwards. Keys: the consumer names (:func:`unit_products`)."""
    from tqdm.auto import tqdm

    ids = stack_windows(windows)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    _, blocks = decoder_blocks(model)
    wanted = {id(p) for b in blocks for part in llama_parts(b) if part is not None
              for m in part.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    scores, batches = {}, 0
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        for start in tqdm(range(0, ids.shape[0], batch_size), desc="taylor", disable=not progress, leave=False):
            x = ids[start:start + batch_size].to(dev)
            model(x, labels=x, use_cache=False).loss.backward()
            for name, z in unit_products(model).items():
                scores[name] = scores.get(name, 0.0) + z ** 2
            batches += 1
            for p in model.parameters():
                p.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return {name: z / batches for name, z in scores.items()}


def unit_counts(model: nn.Module) -> dict[str, list[int]]:
    """{"mlp_neurons": [...], "kv_groups": [...]}: the units every decoder block holds (−1 where it has none)."""
    _, blocks = decoder_blocks(model)
    neurons, groups = [], []
    for b in blocks:
        mlp, attn = llama_parts(b)
        neurons.append(-1 if mlp is None else mlp.down_proj.in_features)
        groups.append(-1 if attn is None else kv_groups(attn).shape[0])
    return {"mlp_neurons": neurons, "kv_groups": groups}


def save_shrunk(model: nn.Module, directory) -> None:
    """Save a shrunk Hugging Face decoder: ``config.json`` (the model's config with the units of every block,
    ``chita_unit_counts``, which :func:`load_shrunk` reads back: blocks of different widths are not a shape a
    Hugging Face config describes) and ``model.safetensors`` (tied weights once). The weights are saved as they
    are in memory: a model loaded from GGUF is dense there, so its quantization entry is left out."""
    import copy
    from pathlib import Path

    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.chita_unit_counts = unit_counts(model)
    config.to_json_file(str(directory / "config.json"))
    save_model(model, str(directory / "model.safetensors"))


def load_shrunk(directory, *, dtype=torch.float32) -> nn.Module:
    """The model :func:`save_shrunk` wrote: built from its config, each block cut to its saved widths (the first
    units kept, then overwritten by the saved ones), the saved weights loaded (tied weights tied again). ValueError
    when the directory holds no unit counts or the weights do not fit."""
    from pathlib import Path

    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    counts = getattr(config, "chita_unit_counts", None)
    if counts is None:
        raise ValueError(f"{directory} was not written by save_shrunk (its config has no chita_unit_counts); "
                         "load a dense model with transformers' from_pretrained")
    del config.chita_unit_counts
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # (initialised, then overwritten)
    _, blocks = decoder_blocks(model)
    if len(blocks) != len(counts["mlp_neurons"]):
        raise ValueError(f"{directory}: {len(counts['mlp_neurons'])} blocks saved, the config builds {len(blocks)}")
    for b, n, g in zip(blocks, counts["mlp_neurons"], counts["kv_groups"]):
        mlp, attn = llama_parts(b)
        if mlp is not None and n >= 0:
            remove_neurons(mlp, torch.arange(mlp.down_proj.in_features) < n)
        if attn is not None and g >= 0:
            remove_kv_groups(attn, torch.arange(kv_groups(attn).shape[0]) < g)
    try:
        load_model(model, str(Path(directory) / "model.safetensors"), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{directory}: the saved weights do not fit the model built from its config ({e})") from None
    return model.eval()
