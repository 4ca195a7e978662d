"""Block backsolve without X: for networks whose n×p gradient matrix does not fit in memory.

X for ResNet50 (p = 25.5M) with n = 1000 rows is 102 GB in fp32. The block backsolve of the
paper (Alg 6) with α = 0 needs much less of it. Its support S is the magnitude mask (with α = 0
the gradient of (P) at w̄ vanishes, so the first IHT step of Alg 5 is H_k(w̄)), and block b then
solves a ridge regression in w_{S_b} whose data are two sums over the n rows:

    G_b = X_{S_b}ᵀ X_{S_b}                                        (s_b × s_b)
    h_b = X_{S_b}ᵀ r_b,   r_b = X_b w̄_b − X_{S_b} w̄_{S_b} = X_{b∖S_b} w̄_{b∖S_b}     (s_b,)
    (G_b + 2λ I) Δ_b = h_b,     w_{S_b} = w̄_{S_b} + Δ_b,     λ = l2·n/2.

So the per-sample gradients are streamed, ``chunk`` rows at a time
(:func:`chita_minimal.network.fisher.gradient_chunks`), and only G_b and h_b are kept: memory
Σ_b s_b² + chunk·p numbers instead of n·p. The result equals
:func:`chita_minimal.solver.blocks.block_backsolve` on the full X (a test checks it). Blocks with
similar s_b are stored padded together (widths rounded up to a power of two) so every chunk
costs one batched matmul per bucket, and the solves are batched Cholesky factorisations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from chita_minimal.network import fisher, params
from chita_minimal.solver.blocks import batched_spd_solve, block_ids, layer_blocks
from chita_minimal.solver.threshold import hard_threshold
from chita_minimal.solver.problem import num_kept
from chita_minimal.utils import check_sparsity

_SOLVE_NUMBERS = 2**25  # fp64 numbers per batched Cholesky


@dataclass
class StreamedSolve:
    """Result of :func:`block_backsolve_streamed`.

    w (p,), support (p,) bool; seconds per phase ("gradients": building the rows, "accumulate":
    the Gram updates, "solve": the batched Cholesky solves, "total"); gram_numbers: how many
    numbers the Grams and right-hand sides hold (padding included), the memory of the method
    beyond one chunk of rows; buckets: number of width buckets.
    """

    w: torch.Tensor = field(repr=False)
    support: torch.Tensor = field(repr=False)
    seconds: dict[str, float]
    gram_numbers: int
    buckets: int


class _Bucket:
    """Blocks whose support widths round up to the same power of two s: cols (g, s) holds each slot's
    coordinate (p marks padding), G (g, s, s) and h (g, s) the sums of the module docstring."""

    def __init__(self, cols, p, dtype, device):
        g, s = cols.shape
        self.cols = cols
        self.valid = cols < p  # (g, s)
        self.safe = torch.where(self.valid, cols, torch.zeros_like(cols))  # gather index, padding → column 0
        self.G = torch.zeros(g, s, s, dtype=dtype, device=device)
        self.h = torch.zeros(g, s, dtype=dtype, device=device)


def _buckets(support, bid, G_count, accum_dtype):
    """Group the support coordinates by block into padded buckets (see :class:`_Bucket`)."""
    p, dev = support.numel(), support.device
    idx = torch.nonzero(support).squeeze(1)  # kept coordinates, increasing
    vb = bid[idx]
    counts = torch.bincount(vb, minlength=G_count)
    order = torch.argsort(vb, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(vb)
    slot[order] = torch.arange(idx.numel(), device=dev) - starts[vb[order]]
    width = torch.where(counts > 0, 2 ** torch.ceil(torch.log2(counts.clamp(min=1).double())).long(), 0)
    out = []
    for s in torch.unique(width[width > 0]).tolist():
        blocks = torch.nonzero(width == s).squeeze(1)
        row = torch.full((G_count,), -1, dtype=torch.long, device=dev)
        row[blocks] = torch.arange(blocks.numel(), device=dev)
        mine = torch.nonzero(width[vb] == s).squeeze(1)
        cols = torch.full((blocks.numel(), s), p, dtype=torch.long, device=dev)
        cols[row[vb[mine]], slot[mine]] = idx[mine]
        bk = _Bucket(cols, p, accum_dtype, dev)
        bk.blocks = blocks  # (g,) global block ids
        out.append(bk)
    return out


def block_backsolve_streamed(model, dataset, sparsity: float, *, n_grads: int = 1000, block_size: int = 500,
                             partition: str = "fixed", l2: float = 1e-3, seed: int = 0, batch_size: int = 1,
                             chunk: int = 16, names=None,
                             device=None, accum_dtype: torch.dtype = torch.float64, progress: bool = False,
                             write_back: bool = True) -> StreamedSolve:
    """CHITA's block backsolve (Alg 6, α = 0) from streamed gradients; prunes ``model`` in place.

    Args:
        model, dataset, sparsity, n_grads, batch_size, l2, seed, names, device: as in
            :func:`chita_minimal.prune` (the rows are the same samples as ``prune`` draws for ``seed``).
        block_size, partition: Fisher blocks inside each layer, as ``prune`` makes them
            (:func:`chita_minimal.solver.blocks.layer_blocks`).
        chunk: rows computed at a time (memory chunk·p numbers).
        accum_dtype: dtype of the Gram sums (fp64 by default; they are small).
        write_back: write the pruned weights into ``model`` (else leave it unchanged).
    """
    sparsity = check_sparsity("sparsity", sparsity)
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 > 0:
        raise ValueError(f"l2 must be a number > 0, got {l2!r}")
    t_total = time.perf_counter()
    lay = params.layout(model, params.resolve(model, names))
    w_bar = params.flatten(model, lay)
    home = w_bar.device  # where the model's weights live (written back there)
    dev = torch.device(device) if device is not None else home
    w_bar = w_bar.to(dev)
    p = lay.p
    k = num_kept(sparsity, p)
    support = hard_threshold(w_bar, k)  # Alg 5 step 1 with α = 0: the magnitude mask
    bid, _, G_count = block_ids(p, [len(b) for b in layer_blocks(lay, block_size, partition)], device=dev)
    buckets = _buckets(support, bid, G_count, accum_dtype)
    w_out = w_bar * ~support  # the pruned part: its contribution r_b to each block's residual

    seconds = {"gradients": 0.0, "accumulate": 0.0, "solve": 0.0}
    t0 = time.perf_counter()
    rows = fisher.gradient_chunks(model, dataset, n_grads, batch_size=batch_size, names=list(lay.names),
                                  device=dev, seed=seed, chunk_size=chunk, progress=progress)
    for _, Xc in rows:  # (c, p)
        t1 = time.perf_counter()
        seconds["gradients"] += t1 - t0
        r = torch.zeros(Xc.shape[0], G_count, dtype=Xc.dtype, device=dev)
        r.index_add_(1, bid, Xc * w_out)  # (c, G): r_b of every row
        for bk in buckets:
            XS = Xc[:, bk.safe] * bk.valid  # (c, g, s)
            XS = XS.permute(1, 2, 0).to(accum_dtype)  # (g, s, c)
            bk.G.baddbmm_(XS, XS.transpose(1, 2))  # in place: no temporary the size of the Grams
            bk.h.unsqueeze(-1).baddbmm_(XS, r[:, bk.blocks].T.unsqueeze(-1).to(accum_dtype))
        t0 = time.perf_counter()
        seconds["accumulate"] += t0 - t1
    seconds["gradients"] += time.perf_counter() - t0

    t1 = time.perf_counter()
    lam2 = float(l2) * n_grads  # 2λ
    w = w_bar * support
    for bk in buckets:
        g, s = bk.h.shape
        step = max(1, _SOLVE_NUMBERS // (s * s))
        for c in range(0, g, step):
            A = bk.G[c:c + step].clone()
            A.diagonal(dim1=-2, dim2=-1).add_(lam2 + (~bk.valid[c:c + step]).to(A.dtype))  # padding: identity
            delta = batched_spd_solve(A, bk.h[c:c + step]).to(w.dtype)  # (c, s)
            ok = bk.valid[c:c + step]
            cols = bk.cols[c:c + step][ok]
            w[cols] = w_bar[cols] + delta[ok]
    seconds["solve"] = time.perf_counter() - t1
    if not torch.isfinite(w).all():
        raise ValueError("the streamed block backsolve produced non-finite weights (try a larger l2)")
    if write_back:
        params.write_back(model, lay, w.to(home))
    seconds["total"] = time.perf_counter() - t_total
    numbers = sum(bk.G.numel() + bk.h.numel() for bk in buckets)
    return StreamedSolve(w=w, support=support, seconds=seconds, gram_numbers=numbers, buckets=len(buckets))
