"""Remove whole attention heads from a transformer (the heads are really removed, not zeroed).

``nn.MultiheadAttention`` ties the width of its inner projections to ``embed_dim``, so it cannot
lose a head. :func:`split_attention` therefore copies the model with every ``nn.MultiheadAttention``
replaced by an equivalent :class:`HeadAttention`, whose q, k, v projections are separate
``nn.Linear(embed_dim, num_heads·head_dim)`` layers and whose output projection is
``nn.Linear(num_heads·head_dim, embed_dim)``. Head h owns rows h·d … (h+1)·d − 1 of q, k and v
(d = ``head_dim``) and the same input columns of ``out``; removing it deletes exactly those.
:class:`HeadAttention` has the call signature of ``nn.MultiheadAttention``, so it drops into
``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` unchanged.

Pieces::

    model = split_attention(model)              # NEW model, same function, HeadAttention modules
    head_groups(model)                          # {"encoder.layers.0.self_attn": 4, ...}
    scores = head_scores(model)                 # L1 norm of each head's weights, (heads,) per module
    scores = head_scores(model, data, kind="taylor", n_grads=32)   # first-order Taylor, from gradients
    keep, frac = select_heads(scores, 0.5)      # drop the half of the heads with the lowest scores
    small = remove_heads(model, keep)           # NEW model with fewer heads (accepts MHA models too)
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from chita_minimal.network import fisher, samples
from chita_minimal.utils import check_int, check_sparsity

KINDS = ("l1", "l2", "taylor", "gate")


# -----------------------------------------------------------------------------
# the attention module with separate heads


class HeadAttention(nn.Module):
    """Multi-head attention with separate ``q``, ``k``, ``v`` and ``out`` linear layers, so heads can be removed.

    ``q``: Linear(embed_dim → num_heads·head_dim), ``k``: Linear(kdim → …), ``v``: Linear(vdim → …),
    ``out``: Linear(num_heads·head_dim → embed_dim). Unlike ``nn.MultiheadAttention``,
    num_heads·head_dim need not equal embed_dim. ``forward`` takes the arguments of
    ``nn.MultiheadAttention.forward`` and returns ``(output, attention weights or None)``.

    The class attributes ``_qkv_same_embed_dim = False`` and ``in_proj_weight = in_proj_bias = None``
    tell ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``) that this is not a packed
    ``nn.MultiheadAttention``, so in eval mode they take their ordinary path, which calls this module,
    instead of torch's fused fast path.
    """

    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, out_bias: bool | None = None, dropout: float = 0.0,
                 batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        for arg, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("head_dim", head_dim)):
            check_int(arg, value, 1)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        inner, kw = num_heads * head_dim, dict(device=device, dtype=dtype)
        self.q = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.k = nn.Linear(self.kdim, inner, bias=bias, **kw)
        self.v = nn.Linear(self.vdim, inner, bias=bias, **kw)
        self.out = nn.Linear(inner, embed_dim, bias=bias if out_bias is None else out_bias, **kw)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}")

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """Attention of ``query`` over ``key``/``value``, as ``nn.MultiheadAttention`` computes it.

        Shapes: (L, N, E) inputs, or (N, L, E) with ``batch_first``, or unbatched (L, E).
        ``key_padding_mask`` (N, S): True (or −inf) marks keys to ignore; a float mask is added.
        ``attn_mask`` (L, S) or (N·num_heads, L, S): True marks pairs not allowed; a float mask is added.
        ``is_causal``: a hint that ``attn_mask`` is the causal mask; without ``attn_mask`` the causal
        mask is built here. Returns (output, weights): weights (N, L, S) averaged over the heads, or
        (N, num_heads, L, S) with ``average_attn_weights=False``, when ``need_weights``; else None.
        Without weights the attention runs in ``F.scaled_dot_product_attention``.
        """
        batched = query.dim() == 3
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, S, H, d = query.shape[0], query.shape[1], key.shape[1], self.num_heads, self.head_dim
        q = self.q(query).view(N, L, H, d).transpose(1, 2)  # (N, H, L, d)
        k = self.k(key).view(N, S, H, d).transpose(1, 2)  # (N, H, S, d)
        v = self.v(value).view(N, S, H, d).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, N, L, S, q)  # None or broadcast to (N, H, L, S)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / d), k.transpose(-2, -1))  # (N, H, L, S)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            if p > 0.0:
                weights = F.dropout(weights, p)
            o = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        o = self.out(o.transpose(1, 2).reshape(N, L, H * d))  # (N, L, E)
        if not batched:
            o = o.squeeze(0)
        elif not self.batch_first:
            o = o.transpose(0, 1)
        return o, weights

    def _mask(self, attn_mask, key_padding_mask, is_causal, N, L, S, q):
        """The additive float mask (−inf = not allowed) of both masks together, or None."""
        def additive(m):
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill_(m, float("-inf"))
            return m.to(q.dtype)

        mask = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                mask = additive(attn_mask).view(1, 1, L, S)
            elif attn_mask.dim() == 3 and attn_mask.shape[0] in (N * self.num_heads, 1):
                mask = additive(attn_mask).view(-1, self.num_heads if attn_mask.shape[0] > 1 else 1, L, S)
            else:
                raise ValueError(f"attn_mask must have shape ({L}, {S}) or ({N * self.num_heads}, {L}, {S}) "
                                 f"(batch·num_heads first), got {tuple(attn_mask.shape)}")
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (N, S):
                raise ValueError(f"key_padding_mask must have shape ({N}, {S}), got {tuple(key_padding_mask.shape)}")
            kpm = additive(key_padding_mask).view(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        return mask


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _from_mha(m: nn.MultiheadAttention) -> HeadAttention:
    """The HeadAttention computing what ``m`` computes (weights copied, flags and mode kept)."""
    if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
        raise ValueError("split_attention does not support nn.MultiheadAttention with add_bias_kv=True or "
                         "add_zero_attn=True (the extra key/value position belongs to no head)")
    E = m.embed_dim
    W = m.out_proj.weight
    new = HeadAttention(E, m.num_heads, m.head_dim, kdim=m.kdim, vdim=m.vdim, bias=m.in_proj_bias is not None,
                        out_bias=m.out_proj.bias is not None, dropout=m.dropout, batch_first=m.batch_first,
                        device=W.device, dtype=W.dtype)
    if m._qkv_same_embed_dim:  # packed (3E, E): rows of q, then k, then v
        ws = [(m.in_proj_weight, slice(i * E, (i + 1) * E)) for i in range(3)]
    else:
        ws = [(m.q_proj_weight, slice(None)), (m.k_proj_weight, slice(None)), (m.v_proj_weight, slice(None))]
    with torch.no_grad():
        for i, (lin, (w, rows)) in enumerate(zip((new.q, new.k, new.v), ws)):
            lin.weight.copy_(w[rows])
            lin.weight.requires_grad_(w.requires_grad)
            if m.in_proj_bias is not None:
                lin.bias.copy_(m.in_proj_bias[i * E:(i + 1) * E])
                lin.bias.requires_grad_(m.in_proj_bias.requires_grad)
        new.out.weight.copy_(W)
        new.out.weight.requires_grad_(W.requires_grad)
        if m.out_proj.bias is not None:
            new.out.bias.copy_(m.out_proj.bias)
            new.out.bias.requires_grad_(m.out_proj.bias.requires_grad)
    return new.train(m.training)


def _replace(model: nn.Module, make) -> nn.Module:
    """``model`` (modified in place) with every module for which ``make(module)`` is not None replaced by
    that result, at every path it is reachable by (a shared module stays shared); the root may be replaced."""
    new_of = {}  # id(old module) -> its replacement
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if id(m) not in new_of:
            new_of[id(m)] = make(m)
        if new_of[id(m)] is not None:
            if name == "":
                return new_of[id(m)]
            model.set_submodule(name, new_of[id(m)])
    return model


def split_attention(model: nn.Module) -> nn.Module:
    """A NEW model in which every ``nn.MultiheadAttention`` is replaced by an equivalent :class:`HeadAttention`.

    The weights are copied (a packed ``in_proj_weight`` is cut into q, k and v; separate
    ``q/k/v_proj_weight`` are taken as they are), as are the biases, dropout, ``batch_first``, the
    ``requires_grad`` flags and the train/eval mode; the new modules sit at the same names. Any
    ``nn.TransformerEncoder`` of the copy gets ``use_nested_tensor = False`` (its nested-tensor fast
    path is written for the packed attention only). ``model`` itself is untouched.

    The copy computes the same function (up to float rounding). One visible difference: in eval mode
    without gradients, torch's nested-tensor fast path of ``nn.TransformerEncoder`` returns 0 at the
    padded positions of a ``src_key_padding_mask``; the copy returns the ordinary path's values
    there, which nothing downstream should read.
    Raises ValueError for ``add_bias_kv=True`` or ``add_zero_attn=True``, which are not supported.
    """
    _check_module(model)
    out = _replace(copy.deepcopy(model), lambda m: _from_mha(m) if isinstance(m, nn.MultiheadAttention) else None)
    for m in out.modules():
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(getattr(layer, "self_attn", None), HeadAttention)
                                                        for layer in m.layers):
            m.use_nested_tensor = False
    return out


def head_groups(model: nn.Module) -> dict[str, int]:
    """Module name → number of heads of every attention module (:class:`HeadAttention` or ``nn.MultiheadAttention``).

    An ``nn.MultiheadAttention`` is listed under the name its :class:`HeadAttention` gets from
    :func:`split_attention`; :func:`remove_heads` and :func:`head_scores` split it themselves, but
    to work with the pieces directly (``model.get_submodule(name).q``) call :func:`split_attention`
    first. The root module is named ``""``. A module shared by several paths is listed once.
    """
    _check_module(model)
    return {name: m.num_heads for name, m in model.named_modules()
            if isinstance(m, (HeadAttention, nn.MultiheadAttention))}


def _has_mha(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


# -----------------------------------------------------------------------------
# removal


def check_head_keep(model: nn.Module, keep) -> dict[str, torch.Tensor]:
    """Validated ``keep`` masks (CPU), one bool (num_heads,) per attention module named in ``keep``."""
    groups = head_groups(model)
    if not groups:
        raise ValueError(f"model {type(model).__name__} has no attention module "
                         "(nn.MultiheadAttention or HeadAttention) whose heads could be removed")
    if not isinstance(keep, dict):
        raise TypeError(f"keep must be a dict attention module name -> bool tensor (num_heads,), "
                        f"got {type(keep).__name__}")
    unknown = [name for name in keep if name not in groups]
    if unknown:
        raise ValueError(f"keep names unknown attention module(s) {unknown}; valid names are {list(groups)}")
    out = {}
    for name, mask in keep.items():
        h = groups[name]
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"keep[{name!r}] must be a bool tensor of shape ({h},), got {type(mask).__name__}")
        if mask.dtype != torch.bool or tuple(mask.shape) != (h,):
            raise ValueError(f"keep[{name!r}] must be a bool tensor of shape ({h},) (True = head kept), "
                             f"got dtype {mask.dtype} and shape {tuple(mask.shape)}")
        if not bool(mask.any()):
            raise ValueError(f"keep[{name!r}] keeps no head; keep at least one head per attention module")
        out[name] = mask.cpu()
    return out


def _fewer_heads(m: HeadAttention, mask: torch.Tensor) -> HeadAttention:
    """A copy of ``m`` with only the heads ``mask`` (True = kept): their q/k/v rows and ``out`` columns."""
    d = m.head_dim
    heads = torch.nonzero(mask).squeeze(1)
    rows = (heads[:, None] * d + torch.arange(d)).reshape(-1).to(m.q.weight.device)
    new = HeadAttention(m.embed_dim, len(heads), d, kdim=m.kdim, vdim=m.vdim, bias=m.q.bias is not None,
                        out_bias=m.out.bias is not None, dropout=m.dropout, batch_first=m.batch_first,
                        device=m.q.weight.device, dtype=m.q.weight.dtype)
    with torch.no_grad():
        for lname in ("q", "k", "v", "out"):
            old, lin = getattr(m, lname), getattr(new, lname)
            for pname, prm in lin.named_parameters(recurse=False):
                src = getattr(old, pname)
                if lname != "out":
                    prm.copy_(src[rows])
                elif pname == "weight":
                    prm.copy_(src[:, rows])
                else:  # the out bias belongs to no head
                    prm.copy_(src)
                prm.requires_grad_(src.requires_grad)
    return new.train(m.training)


def remove_heads(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    """A NEW model in which attention module ``name`` keeps only the heads h with ``keep[name][h] == True``.

    ``keep``: attention module name (see :func:`head_groups`) → bool tensor of shape (num_heads,);
    modules not named keep all their heads. Removing head h deletes rows h·d … (h+1)·d − 1
    (d = ``head_dim``) of the q, k and v weights and biases and the same input columns of the
    ``out`` weight; ``num_heads`` goes down, ``head_dim`` and the ``out`` bias stay. A model with
    ``nn.MultiheadAttention`` modules is first converted by :func:`split_attention`, so the result
    holds :class:`HeadAttention` modules. Train/eval modes and ``requires_grad`` flags are kept;
    ``model`` itself is untouched.

    The new model computes exactly the same function as ``model`` when every removed head
    contributes nothing: its ``out`` columns are zero, or its v rows and v bias are zero (then its
    output is 0 whatever its attention pattern). Otherwise the removed heads' contributions are lost.

    Raises TypeError / ValueError for a ``keep`` that is not such a dict, for unknown names (the
    valid ones are listed), and for a mask that keeps no head.
    """
    _check_module(model)
    keep = check_head_keep(model, keep)
    small = split_attention(model) if _has_mha(model) else copy.deepcopy(model)
    masks = {id(small.get_submodule(name)): mask for name, mask in keep.items()}
    return _replace(small, lambda m: _fewer_heads(m, masks[id(m)]) if id(m) in masks else None)


# -----------------------------------------------------------------------------
# head importance


def _per_head(t: torch.Tensor, lname: str, pname: str, H: int) -> torch.Tensor:
    """(H,) sums of ``t`` (shaped like parameter ``lname.pname``) over each head's entries:
    rows for q/k/v, input columns for the ``out`` weight."""
    if lname == "out":  # weight (E, H·d)
        return t.reshape(t.shape[0], H, -1).sum((0, 2))
    return t.reshape(H, -1).sum(1)  # weight (H·d, in) or bias (H·d,)


def _head_params(m: HeadAttention):
    """(layer name, parameter name, parameter) of one head's weights: q/k/v weights and biases, ``out`` weight."""
    return [(lname, pname, prm) for lname in ("q", "k", "v", "out")
            for pname, prm in getattr(m, lname).named_parameters(recurse=False)
            if not (lname == "out" and pname == "bias")]


def head_scores(model: nn.Module, data=None, *, kind: str = "l1", n_grads: int | None = None, batch_size: int = 1,
                seed: int = 0, loss_fn=None, output_fn=None) -> dict[str, torch.Tensor]:
    """An importance per head: attention module name → (num_heads,) float tensor on the CPU.

    A head's weights are its q, k and v rows (weights and biases) and its ``out`` input columns,
    i.e. what :func:`remove_heads` deletes. ``kind``:

    - ``"l1"`` (default): Σ |w| over the head's weights (the structural analogue of the filter L1
      norm of ``channels.l1_scores``); ``"l2"``: √(Σ w²). No data needed. A head whose weights are
      all zero scores 0.
    - ``"taylor"``: first-order Taylor importance (1/n) Σ_i Σ_w |w · g_i,w| over the head's
      weights, with g_i the gradient of the mean loss of mini-batch i (n = ``n_grads`` mini-batches
      of ``batch_size`` samples drawn from ``data`` without replacement, permutation seeded by ``seed``).
    - ``"gate"``: (1/n) Σ_i |Σ_w w · g_i,w| over the head's ``out`` columns, which is |∂L_i/∂ξ_h|
      for a gate ξ_h (at 1) scaling the head's output (Michel et al., "Are Sixteen Heads Really
      Better than One?", NeurIPS 2019).

    ``data`` is anything :mod:`chita_minimal.network.samples` accepts (dataset, DataLoader,
    iterable of batches); ``loss_fn(output, target)`` defaults to cross-entropy and ``output_fn``
    to ``samples.logits_of`` (so a model returning a dict with ``"logits"`` works), as in
    ``fisher.gradients``. Gradients are taken in eval mode (modes, ``requires_grad`` flags and
    ``.grad`` fields are left as they were). A model with ``nn.MultiheadAttention`` is scored on
    its :func:`split_attention` copy (same names, same function).
    """
    _check_module(model)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if _has_mha(model):
        model = split_attention(model)
    mods = {name: m for name, m in model.named_modules() if isinstance(m, HeadAttention)}
    if kind in ("l1", "l2"):
        if data is not None or n_grads is not None:
            raise ValueError(f"kind={kind!r} is a weight norm: it takes no data or n_grads")
        out = {}
        for name, m in mods.items():
            s = sum(_per_head(p.detach().abs() if kind == "l1" else p.detach() ** 2, ln, pn, m.num_heads)
                    for ln, pn, p in _head_params(m))
            out[name] = (s if kind == "l1" else s.sqrt()).cpu()
        return out
    if data is None or n_grads is None:
        raise ValueError(f"kind={kind!r} needs data and n_grads (the number of mini-batches to draw)")
    if not mods:
        return {}
    return _gradient_scores(model, mods, data, kind, n_grads, batch_size, seed, fisher.loss_of(loss_fn, output_fn))


def _gradient_scores(model, mods, data, kind, n_grads, batch_size, seed, loss) -> dict[str, torch.Tensor]:
    check_int("n_grads", n_grads, 1)
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, None)
    need = n_grads * batch_size
    dataset = samples.as_dataset(data, need, arg="data")
    if len(dataset) < need:
        raise ValueError(f"data has {len(dataset)} samples but n_grads·batch_size = {n_grads}·{batch_size} "
                         f"= {need} distinct samples are needed")
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=g)[:need].view(n_grads, batch_size)
    entries = [(name, m, ln, pn, p) for name, m in mods.items() for ln, pn, p in _head_params(m)
               if kind == "taylor" or (ln == "out" and pn == "weight")]
    params = [e[-1] for e in entries]
    flags = [p.requires_grad for p in params]
    scores = {name: torch.zeros(m.num_heads, dtype=torch.float64) for name, m in mods.items()}
    try:
        for p in params:
            p.requires_grad_(True)
        with fisher.prepared(model, None) as dev, torch.enable_grad():
            for i in range(n_grads):
                x, y = fisher.load_samples(dataset, indices[i:i + 1], dev, params[0].dtype)  # (1, bs, ...)
                out = samples.call(model, samples.index(x, 0))
                grads = torch.autograd.grad(loss(out, samples.index(y, 0)), params, allow_unused=True)
                for (name, m, ln, pn, p), gr in zip(entries, grads):
                    if gr is None:
                        continue
                    wg = p.detach() * gr
                    s = _per_head(wg.abs() if kind == "taylor" else wg, ln, pn, m.num_heads)
                    scores[name] += (s if kind == "taylor" else s.abs()).double().cpu()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return {name: (s / n_grads).to(params[0].dtype) for name, s in scores.items()}


def select_heads(scores: dict[str, torch.Tensor], fraction: float) -> tuple[dict[str, torch.Tensor], float]:
    """Keep masks removing ⌊fraction · all heads⌋ heads, those with the lowest scores, never a module's last head.

    Scores are divided by their module's mean first (as ``channels.select`` does per group), so
    modules are compared by the ranking within each. Returns (keep, achieved): keep is ready for
    :func:`remove_heads`, achieved the fraction of all heads removed.
    """
    fraction = check_sparsity("fraction", fraction)
    if not isinstance(scores, dict):
        raise TypeError("scores must be a dict attention module name -> (num_heads,) tensor, "
                        f"got {type(scores).__name__}")
    if not scores:
        raise ValueError("scores is empty: the model has no attention module")
    cands = []  # (normalised score, module order, head)
    for j, (name, s) in enumerate(scores.items()):
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.numel() == 0:
            raise ValueError(f"scores[{name!r}] must be a non-empty 1-D tensor (one score per head)")
        s = s.detach().double().cpu()
        mean = float(s.mean())
        s = s / mean if mean > 0 else torch.ones_like(s)
        cands += [(float(s[h]), j, h) for h in range(s.numel())]
    names = list(scores)
    keep = {name: torch.ones(scores[name].numel(), dtype=torch.bool) for name in names}
    total, todo = len(cands), int(fraction * len(cands))
    for _, j, h in sorted(cands):
        if todo == 0:
            break
        if int(keep[names[j]].sum()) > 1:
            keep[names[j]][h] = False
            todo -= 1
    return keep, 1.0 - sum(int(m.sum()) for m in keep.values()) / total
