"""Language models on the network side: their linear maps, decoder blocks, embeddings, loss and perplexity.

Works on Hugging Face causal LMs (Llama, OPT, GPT-2 families, …) without importing ``transformers``: the GPT-2
family's ``Conv1D`` (a linear map whose weight is stored in × out) is recognised by its class name and fields.

    blocks = decoder_blocks(model)                 # the ModuleList of identical decoder layers
    ppl = perplexity(model, windows)               # exp(mean next-token NLL) over token windows
"""

from __future__ import annotations

import math

import torch
from torch import nn

from chita_minimal.network.samples import logits_of
from chita_minimal.utils import model_mode


def is_conv1d(m: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (GPT-2's linear map: y = x W + b, W stored in × out)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor)


def is_linear(m: nn.Module) -> bool:
    """A dense linear map of a language model: ``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(m, nn.Linear) or is_conv1d(m)


def weight_matrix(m: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the storage (a Conv1D's is transposed; a view, not a copy)."""
    return m.weight.T if is_conv1d(m) else m.weight


def set_weight_matrix(m: nn.Module, W: torch.Tensor) -> None:
    """Write W (out, in) into the module's weight in place."""
    with torch.no_grad():
        m.weight.copy_(W.T if is_conv1d(m) else W)


def embedding_weights(model: nn.Module) -> set[int]:
    """ids of the token embedding and LM head weights (tied or not): every ``nn.Embedding`` weight, and the
    weight of ``model.get_output_embeddings()`` where the model has one. Pruning methods leave these dense."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "get_output_embeddings", None)
    if callable(head):
        out = head()
        if out is not None and isinstance(getattr(out, "weight", None), torch.Tensor):
            ids.add(id(out.weight))
    return ids


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, blocks): the longest ``nn.ModuleList`` of modules of one class that each hold linear maps — the
    decoder layers of a transformer (``model.layers``, ``model.decoder.layers``, ``transformer.h``, …).
    ValueError, naming the model, when there is none."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1 \
                and any(is_linear(x) for x in m[0].modules()):
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ValueError(f"model ({type(model).__name__}) has no decoder blocks (a ModuleList of identical layers "
                         "holding Linear or Conv1D maps): layer-wise pruning of language models needs them")
    return best


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal LM loss: mean cross-entropy of token t+1 given tokens ≤ t; logits (B, T, V), labels (B, T);
    labels -100 are ignored (as in Hugging Face)."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       labels[:, 1:].reshape(-1), ignore_index=-100)


def input_ids_of(sample) -> torch.Tensor:
    """The token ids of one sample: a LongTensor, a dict with ``input_ids``, or an (ids, labels) pair."""
    if isinstance(sample, dict):
        if "input_ids" not in sample:
            raise ValueError(f"a dict sample needs 'input_ids', got keys {sorted(sample)}")
        sample = sample["input_ids"]
    elif isinstance(sample, (tuple, list)):
        sample = sample[0]
    if not isinstance(sample, torch.Tensor) or sample.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token windows must hold integer token ids, got {getattr(sample, 'dtype', type(sample))}")
    return sample


def stack_windows(windows, indices=None) -> torch.Tensor:
    """The token windows (or those at ``indices``) as one (n, T) LongTensor; ValueError for an empty set or
    windows of different lengths."""
    if isinstance(windows, torch.Tensor):
        ids = windows if indices is None else windows[torch.as_tensor(indices)]
        if ids.dim() == 1:
            ids = ids[None]
    else:
        idx = range(len(windows)) if indices is None else indices
        rows = [input_ids_of(windows[int(i)]).reshape(-1) for i in idx]
        if not rows:
            raise ValueError("windows is empty")
        if len({r.numel() for r in rows}) != 1:
            raise ValueError("token windows must all have the same length")
        ids = torch.stack(rows)
    if ids.numel() == 0:
        raise ValueError("windows is empty")
    return ids.long()


@torch.no_grad()
def perplexity(model: nn.Module, windows, *, batch_size: int = 4, progress: bool = False, device=None) -> float:
    """exp of the mean next-token negative log-likelihood over token windows (each scored on its own).

    windows: a (n, T) LongTensor, or a dataset of windows (:func:`chita_minimal.data.text.token_windows`);
    every window predicts its tokens 2…T from the ones before. The model's logits are read from ``.logits``.
    """
    from tqdm.auto import tqdm

    ids = stack_windows(windows)
    if ids.shape[1] < 2:
        raise ValueError(f"windows need at least 2 tokens to score a next token, got length {ids.shape[1]}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    total, count = 0.0, 0
    with model_mode(model, training=False):
        for i in tqdm(range(0, len(ids), batch_size), desc="perplexity", disable=not progress, leave=False):
            x = ids[i:i + batch_size].to(dev)
            logits = logits_of(model(x, use_cache=False))
            total += float(next_token_loss(logits, x)) * x.numel() / x.shape[1] * (x.shape[1] - 1)
            count += x.shape[0] * (x.shape[1] - 1)
    return math.exp(total / count)


@torch.no_grad()
def throughput(model: nn.Module, ids: torch.Tensor, *, new_tokens: int = 32, prompt: int = 16,
               repeats: int = 3) -> dict[str, float]:
    """Measured speed of a causal LM on this machine: {"prefill_tokens_per_s", "generate_tokens_per_s"}.

    Prefill: the prompt's pass of generation over ``ids`` (B, T), B·T tokens per pass: the key/value cache
    written and the logits of the last position only, as ``generate`` computes them (``logits_to_keep=1``, where
    the model takes it; the vocabulary projection of every position is the cost of scoring text, not of
    prefill); generation: greedy decoding of ``new_tokens`` tokens after the first ``prompt`` tokens of
    ``ids[0]`` with the model's key/value cache, tokens per second after the prompt's own pass. Each figure is the
    best of ``repeats`` timed runs after one warm-up (the thread count is torch's current one): compare models
    measured in the same process.
    """
    import inspect
    import time

    if ids.dim() != 2 or ids.shape[1] < prompt:
        raise ValueError(f"ids must be (batch, length ≥ prompt = {prompt}), got shape {tuple(ids.shape)}")
    dev = next(model.parameters()).device
    x = ids.to(dev)
    start = x[:1, :prompt]
    pad = getattr(getattr(model, "generation_config", None), "eos_token_id", None)

    def timed(fn) -> float:
        fn()
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with model_mode(model, training=False):
        prefill = timed(lambda: model(x, use_cache=True, **last))
        first = timed(lambda: model(start, use_cache=True, **last))
        gen = timed(lambda: model.generate(start, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           do_sample=False, pad_token_id=pad))
    return {"prefill_tokens_per_s": x.numel() / prefill,
            "generate_tokens_per_s": new_tokens / max(gen - first, 1e-9)}
