"""Block approximation (the paper's Alg 6): the Fisher XᵀX is taken block-diagonal.

The quadratic of (P) becomes  ½ Σ_b ‖X_b(w_b − w̄_b)‖² + λ‖w − w̄‖² + αᵀw,  i.e. problem (P)
for the block-diagonal matrix X̃ = diag(X_1, …, X_G) of shape (G·n, p). :class:`BlockProblem`
is that problem: every solver of the package (IHT, the active set) runs on it unchanged, with
one *global* top-k across blocks, and its restricted solve is one ridge regression per block.

Blocks are stored padded, in buckets of blocks whose widths round up to the same power of two
(shape (g, B, n) per bucket), so that the matvecs and the per-block solves are batched
(``torch.bmm``, one batched Cholesky per chunk of a bucket) rather than a Python loop over
blocks. Memory is at most about 2·n·p floats (padding), usually close to n·p, like X itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from chita_minimal.solver.backsolve import first_step_support
from chita_minimal.solver.problem import Problem, check_inputs, ridge_on_support, ridge_outside, spd_solve

_CHUNK = 16384  # columns copied at a time when packing blocks
_SOLVE_NUMBERS = 2**25  # fp64 numbers per batched Cholesky (bounds the memory of a chunk of blocks)


def make_blocks(p: int, blocks) -> list[torch.Tensor]:
    """Normalise a block specification into a list of index tensors partitioning range(p).

    ``blocks`` may be an int B (contiguous blocks of B coordinates, the last shorter),
    a sequence of ints (contiguous block sizes summing to p, e.g. per-layer sizes), or
    a sequence of 1-D integer tensors that together cover every coordinate once.
    """
    if isinstance(blocks, bool):
        raise TypeError("blocks must be an int, a sequence of ints or a sequence of index tensors")
    if isinstance(blocks, int):
        if blocks < 1:
            raise ValueError(f"blocks (block size) must be >= 1, got {blocks}")
        return [torch.arange(s, min(s + blocks, p)) for s in range(0, p, blocks)]
    if not isinstance(blocks, Sequence) or len(blocks) == 0:
        raise TypeError("blocks must be an int, a non-empty sequence of ints or a sequence of index tensors")
    if all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
        if any(b < 1 for b in blocks) or sum(blocks) != p:
            raise ValueError(f"block sizes must be >= 1 and sum to p = {p}, got sum {sum(blocks)}")
        starts = [0]
        for b in blocks[:-1]:
            starts.append(starts[-1] + b)
        return [torch.arange(s, s + b) for s, b in zip(starts, blocks)]
    idx = [torch.as_tensor(b).long().flatten() for b in blocks]
    seen = torch.cat(idx)
    if seen.numel() != p or not torch.equal(torch.sort(seen).values, torch.arange(p)):
        raise ValueError(f"blocks must partition range(p) with p = {p}: every coordinate exactly once")
    return idx


PARTITIONS = ("fixed", "equal")


def layer_blocks(layout, block_size: int, partition: str = "fixed", shift: int = 0) -> list[torch.Tensor]:
    """Blocks of about ``block_size`` contiguous weights that never straddle two layers (Alg 6).

    ``layout`` is a :class:`chita_minimal.network.params.Layout`; each layer is cut on its own:

    - ``partition="fixed"`` (default): blocks of exactly ``block_size``, the layer's last block shorter
      (the paper's cut; these are the blocks ``prune(method="chita-block"/"chita-block-iht")`` uses);
      ``shift`` (0 ≤ shift < block_size) moves every cut: the layer's first block has ``shift`` weights (when
      the layer is longer than that), then blocks of ``block_size`` follow — another cut of the same kind;
    - ``partition="equal"``: the layer cut into max(1, ⌊size/block_size⌋) blocks of equal size (±1), so no
      block is a short remainder.

    With the same support, the block backsolve's result depends on where the blocks are cut (the cross-block
    terms of XᵀX that are dropped differ); the chapter "Where the blocks are cut" measures how much.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift < block_size:
        raise ValueError(f"shift must be an int with 0 <= shift < block_size = {block_size}, got {shift!r}")
    if shift and partition != "fixed":
        raise ValueError(f"shift moves the cuts of partition='fixed'; partition={partition!r} has no shift")
    out = []
    for offset, numel in zip(layout.offsets, layout.numels):
        if partition == "fixed":
            first = shift if 0 < shift < numel else 0
            if first:
                out.append(torch.arange(first) + offset)
            out.extend(b + offset + first for b in make_blocks(numel - first, block_size))
        else:
            count = max(1, numel // block_size)
            out.extend(b + offset for b in torch.arange(numel).tensor_split(count))
    return out


def block_ids(p: int, blocks, device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For a block specification: (block of each coordinate (p,), its position in the block (p,), G)."""
    parts = make_blocks(p, blocks)
    sizes = torch.tensor([len(b) for b in parts])
    order = torch.cat(parts)
    bid = torch.empty(p, dtype=torch.long)
    slot = torch.empty(p, dtype=torch.long)
    bid[order] = torch.repeat_interleave(torch.arange(len(parts)), sizes)
    slot[order] = torch.arange(p) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    return bid.to(device), slot.to(device), len(parts)


class _Bucket:
    """Blocks of similar width stored padded together: Xb (g, B, n), their global block ids
    (g,), and cols (g, B): the variable at each slot, or p for padding (a zero row)."""

    def __init__(self, Xb, block, cols):
        self.Xb, self.block, self.cols = Xb, block, cols


def _pack(rows_of, idx: torch.Tensor, bid: torch.Tensor, G: int, n: int, like: torch.Tensor):
    """Columns idx grouped by block bid[idx] into buckets of blocks whose widths round up to the same
    power of two (padding < 2x, one batched matmul per bucket). Returns (buckets, vbid, vbucket, vrow, vslot):
    for each packed column, its block, bucket, row of the bucket and slot in the block.

    ``rows_of(j)`` returns the columns j as rows, shape (len(j), n).
    """
    m, dev = idx.numel(), idx.device
    vbid = bid[idx]
    counts = torch.bincount(vbid, minlength=G)  # (G,)
    order = torch.argsort(vbid, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    vslot = torch.empty_like(vbid)
    vslot[order] = torch.arange(m, device=dev) - starts[vbid[order]]
    width = torch.where(counts > 0, 2 ** torch.ceil(torch.log2(counts.clamp(min=1).double())).long(), 0)
    vbucket, vrow = torch.empty_like(vbid), torch.empty_like(vbid)
    buckets = []
    for B in torch.unique(width[width > 0]).tolist():
        block = torch.nonzero(width == B).squeeze(1)  # (g,) global block ids in this bucket
        row_of_block = torch.full((G,), -1, dtype=torch.long, device=dev)
        row_of_block[block] = torch.arange(block.numel(), device=dev)
        mine = torch.nonzero(width[vbid] == B).squeeze(1)  # packed columns in this bucket
        vbucket[mine] = len(buckets)
        vrow[mine] = row_of_block[vbid[mine]]
        Xb = like.new_zeros(block.numel(), B, n)
        for c in range(0, mine.numel(), _CHUNK):
            j = mine[c:c + _CHUNK]
            Xb[vrow[j], vslot[j]] = rows_of(idx[j])
        cols = torch.full((block.numel(), B), m, dtype=torch.long, device=dev)
        cols[vrow[mine], vslot[mine]] = mine
        buckets.append(_Bucket(Xb, block, cols))
    return buckets, vbid, vbucket, vrow, vslot


class BlockProblem(Problem):
    """Problem (P) with the block-diagonal Fisher of Alg 6 (see the module docstring).

    Args:
        X: (n, p) gradient matrix; w_bar: (p,); blocks: block specification
            (:func:`make_blocks`: a block size, block sizes, or index partitions).
        l2, alpha: as in :class:`Problem`.
        keep: optional (p,) bool mask; only these coordinates are variables (the others
            are fixed at 0, as by :meth:`restrict`), which saves packing unused columns.

    Variables are the kept coordinates, in increasing order; the residual has G·n
    entries (one n-vector per block) and y_b = X_b w̄_b uses every column of block b.
    """

    dense_x = False  # X is stored packed by block, not as the (n, p) matrix

    def __init__(self, X, w_bar, blocks, l2: float = 0.0, alpha=None, *, keep: torch.Tensor | None = None):
        n, p = check_inputs(X, w_bar, l2, alpha)
        bid, _, G = block_ids(p, blocks, X.device)
        idx = torch.arange(p, device=X.device) if keep is None else torch.nonzero(keep.to(X.device)).squeeze(1)
        Y = X.new_zeros(G, n)  # y_b = X_b w̄_b over the whole block
        for c in range(0, p, _CHUNK):
            sl = slice(c, c + _CHUNK)
            Y.index_add_(0, bid[sl], (X[:, sl] * w_bar[sl]).T)
        packed = _pack(lambda j: X[:, j].T, idx, bid, G, n, X)
        self._setup(packed, G, w_bar[idx], l2, None if alpha is None else alpha[idx], Y.flatten(),
                    ridge_outside(w_bar, idx, float(l2) * n / 2.0), n)

    def _setup(self, packed, G, w_bar, l2, alpha, y, offset, n):
        self.buckets, self.vbid, self.vbucket, self.vrow, self.vslot = packed
        self.X = None  # no dense X: every use goes through the methods below
        self.w_bar, self.alpha, self.y = w_bar, alpha, y
        self.G, self.n, self.p = G, n, w_bar.numel()
        self.l2 = float(l2)
        self.lam = self.l2 * n / 2.0
        self.offset = float(offset)
        self._lipschitz = None

    # -- the block-diagonal operator X̃ = diag(X_1, …, X_G) --------------------------------
    def _padded(self, v: torch.Tensor, bucket: _Bucket) -> torch.Tensor:
        """(p,) → (g, B): a bucket's share of v in block layout, zeros in the padding."""
        return torch.cat([v, v.new_zeros(1)])[bucket.cols]

    def matvec(self, v):
        out = v.new_zeros(self.G, self.n)
        for bk in self.buckets:
            out[bk.block] = torch.bmm(self._padded(v, bk).unsqueeze(1), bk.Xb).squeeze(1)
        return out.flatten()  # (G·n,)

    def rmatvec(self, r):
        R = r.view(self.G, self.n)
        g = r.new_zeros(self.p + 1)
        for bk in self.buckets:
            # bmm(r_b as a row, X_bᵀ): 3x faster on CPU than bmm(X_b, r_b as a column) (a slow batched gemv)
            g[bk.cols] = torch.bmm(R[bk.block].unsqueeze(1), bk.Xb.transpose(1, 2)).squeeze(1)
        return g[:-1]

    def columns(self, idx):
        out = self.w_bar.new_empty(idx.numel(), self.n)
        which = self.vbucket[idx]
        for b, bk in enumerate(self.buckets):
            sel = torch.nonzero(which == b).squeeze(1)
            if sel.numel():
                out[sel] = bk.Xb[self.vrow[idx[sel]], self.vslot[idx[sel]]]
        return out

    def matvec_cols(self, idx, vals):
        out = self.w_bar.new_zeros(self.G, self.n)
        out.index_add_(0, self.vbid[idx], self.columns(idx) * vals.unsqueeze(1))
        return out.flatten()

    def column_blocks(self, idx):
        return self.vbid[idx]

    def residual_blocks(self, r):
        return r.view(self.G, self.n)

    def restrict(self, idx: torch.Tensor) -> "BlockProblem":
        offset = self.offset + ridge_outside(self.w_bar, idx, self.lam)
        sub = object.__new__(BlockProblem)
        packed = _pack(self.columns, idx, self.vbid, self.G, self.n, self.w_bar)
        sub._setup(packed, self.G, self.w_bar[idx], self.l2, None if self.alpha is None else self.alpha[idx],
                   self.y, offset, self.n)
        return sub

    # -- Alg 6: one ridge regression per block, batched ------------------------------------
    def ridge(self, support: torch.Tensor) -> torch.Tensor:
        """argmin of the block problem with w = 0 outside ``support``: per block b,

            min ½‖y_b − X_{b,S} w_S‖² + λ‖w_S − w̄_S‖² + α_Sᵀw_S,

        solved for a bucket of blocks at once: the s×s normal equations (s = the bucket's
        width; padding rows get an identity), or their n×n Woodbury form when s > n and
        λ > 0. Grams in the input dtype, solves in fp64 (one batched Cholesky per chunk).
        """
        idx = torch.nonzero(support).squeeze(1)
        w = torch.zeros_like(self.w_bar)
        if idx.numel() == 0:
            return w
        sub = self if idx.numel() == self.p else self.restrict(idx)
        n, lam2 = self.n, 2.0 * self.lam
        Y = self.y.view(self.G, n)
        w_sub = torch.zeros(sub.p + 1, dtype=w.dtype, device=w.device)
        for bk in sub.buckets:
            XS, s = bk.Xb, bk.Xb.shape[1]  # (g, s, n)
            pad = bk.cols == sub.p  # (g, s)
            w_bar_S = sub._padded(sub.w_bar, bk)
            alpha_S = None if sub.alpha is None else sub._padded(sub.alpha, bk)
            r0 = Y[bk.block] - torch.bmm(w_bar_S.unsqueeze(1), XS).squeeze(1)  # (g, n)
            woodbury = s > n and lam2 > 0
            size = n if woodbury else s
            chunk = max(1, _SOLVE_NUMBERS // (size * size))
            delta = torch.empty_like(w_bar_S)
            for c in range(0, XS.shape[0], chunk):
                Xc, rc = XS[c:c + chunk], r0[c:c + chunk]
                ac = None if alpha_S is None else alpha_S[c:c + chunk]
                if woodbury:  # Δ = X_Sᵀ(X_S X_Sᵀ + 2λI)⁻¹(r₀ + X_S α_S/2λ) − α_S/2λ
                    K = torch.bmm(Xc.transpose(1, 2), Xc)  # (c, n, n)
                    K.diagonal(dim1=-2, dim2=-1).add_(lam2)
                    rhs = rc if ac is None else rc + torch.bmm(ac.unsqueeze(1), Xc).squeeze(1) / lam2
                    z = batched_spd_solve(K, rhs).to(Xc.dtype)
                    d = torch.bmm(Xc, z.unsqueeze(-1)).squeeze(-1)
                    if ac is not None:
                        d -= ac / lam2
                else:  # (X_SᵀX_S + 2λI) Δ = X_Sᵀr₀ − α_S
                    A = torch.bmm(Xc, Xc.transpose(1, 2))  # (c, s, s)
                    A.diagonal(dim1=-2, dim2=-1).add_(lam2 + pad[c:c + chunk].to(A.dtype))
                    b = torch.bmm(rc.unsqueeze(1), Xc.transpose(1, 2)).squeeze(1)
                    if ac is not None:
                        b -= ac
                    d = batched_spd_solve(A, b).to(Xc.dtype)
                delta[c:c + chunk] = d
            w_sub[bk.cols] = torch.where(pad, torch.zeros_like(delta), w_bar_S + delta)
        w[idx] = w_sub[:-1]
        return w

    def __repr__(self) -> str:
        widths = [bk.Xb.shape[1] for bk in self.buckets]
        return (f"BlockProblem(n={self.n}, p={self.p}, blocks={self.G}, bucket widths={widths}, l2={self.l2:g}, "
                f"alpha={'yes' if self.alpha is not None else 'no'}, dtype={self.dtype}, device={self.device})")


def batched_spd_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve A_i x_i = b_i for a batch of symmetric PSD matrices in fp64 (Cholesky; least squares if singular)."""
    A64, b64 = A.double(), b.double()
    L, info = torch.linalg.cholesky_ex(A64)
    # two triangular solves: 4x faster on a CPU than torch.cholesky_solve for a batch of single right-hand sides
    z = torch.linalg.solve_triangular(L, b64.unsqueeze(-1), upper=False)
    x = torch.linalg.solve_triangular(L.mT, z, upper=True).squeeze(-1)
    for i in torch.nonzero(info).flatten().tolist():
        x[i] = spd_solve(A64[i], b64[i])
    return x


def gather_columns(X: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """X[:, cols] as a new (n, len(cols)) tensor. On a CPU through numpy's ``take``, which walks X row by row
    (about one read of X; ``index_select`` along dim 1 takes 2-3x longer there); elsewhere ``index_select``."""
    if X.device.type == "cpu" and X.is_contiguous() and not X.requires_grad and X.dtype != torch.bfloat16:
        return torch.from_numpy(np.take(X.numpy(), cols.numpy(), axis=1))
    return X.index_select(1, cols)


def block_matvecs(X: torch.Tensor, u: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """(G, n): X_b u_b for every block b of ``parts`` (one read of X, no copy of it).

    Contiguous blocks are column slices of X: runs of equal-width blocks are one batched product on a GPU
    (a strided view, (n, m, B)), one BLAS gemv per block on a CPU (faster there than a strided batched
    product); other blocks gather their columns.
    """
    n, G = X.shape[0], len(parts)
    out = X.new_empty(G, n)
    spans = contiguous_spans(parts)
    if spans is None:
        for g, b in enumerate(parts):
            b = b.to(X.device)
            torch.mv(X[:, b], u[b], out=out[g])
        return out
    if X.device.type == "cpu":
        for g, (a, width) in enumerate(spans):
            torch.mv(X[:, a:a + width], u[a:a + width], out=out[g])
        return out
    g = 0
    while g < G:  # a run of m consecutive blocks of one width B: X[:, a:a+mB] viewed (n, m, B)
        a, width = spans[g]
        m = 1
        while g + m < G and spans[g + m][1] == width:
            m += 1
        V = X[:, a:a + m * width].unflatten(1, (m, width))
        out[g:g + m] = torch.einsum("nmb,mb->mn", V, u[a:a + m * width].view(m, width))
        g += m
    return out


def contiguous_spans(parts: list[torch.Tensor]) -> list[tuple[int, int]] | None:
    """[(start, width)] when the blocks are consecutive ranges 0…p−1 in order (per-layer blocks), else None."""
    order = torch.cat(parts)  # consecutive ranges in order iff their concatenation is 0…p−1: one comparison
    if any(b.numel() == 0 for b in parts) or not torch.equal(order, torch.arange(order.numel(), device=order.device)):
        return None
    spans, start = [], 0
    for b in parts:
        spans.append((start, b.numel()))
        start += b.numel()
    return spans


def padded_width(s: torch.Tensor) -> torch.Tensor:
    """Round block widths up to a multiple of max(8, 2^⌊log2 s⌋/4): at most 25 % padding (above 32) and about
    four widths per octave, so that a bucket of equal padded width is one batched Gram and Cholesky."""
    step = torch.clamp(2 ** torch.floor(torch.log2(s.clamp(min=1).double())).long() // 4, min=8)
    return torch.where(s > 0, (s + step - 1) // step * step, 0)


def block_ridge(X: torch.Tensor, w_bar: torch.Tensor, parts: list[torch.Tensor], support: torch.Tensor,
                l2: float = 0.0, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Alg 6's solve on a fixed support: per block b, with S_b = the support's share of the block,

        min over w_b (zero off S_b)  ½‖X_b(w_b − w̄_b)‖² + λ‖w_b − w̄_b‖² + αᵀw_b ,   λ = l2·n/2,

    i.e. (X_SᵀX_S + 2λI) Δ = X_Sᵀr₀ − α_S with r₀ = X_b w̄_b − X_S w̄_S = X_b (w̄ outside S)_b, or the n×n
    Woodbury form when the block keeps more than n columns and λ > 0. Returns the (p,) solution.

    The work: r₀ for every block from one read of X (:func:`block_matvecs`); then the kept columns of the
    blocks, gathered straight from X into buckets of blocks of equal padded width (:func:`padded_width`;
    padding columns are zero), one batched Gram and one batched fp64 Cholesky per chunk of a bucket. Nothing
    of size n·p is copied; memory is bounded by ``_SOLVE_NUMBERS`` per chunk. On a CPU, for contiguous blocks
    (per-layer blocks) in fp32/fp64, the same solves one block at a time instead (:func:`_block_ridge_sliced`),
    1.4–2x faster there on ResNet20 (``bench/speed.py``); the two agree to rounding.
    """
    n, p = X.shape
    dev = X.device
    lam2 = float(l2) * n  # 2λ
    parts = [b.to(dev) for b in parts]
    support = support.to(dev)
    if _sliceable(X):
        spans = contiguous_spans(parts)
        if spans is not None:
            return _block_ridge_sliced(X, w_bar, spans, support, lam2, alpha)
    w = torch.zeros_like(w_bar)
    idx = torch.nonzero(support).squeeze(1)
    if idx.numel() == 0:
        return w
    G = len(parts)
    sizes = torch.tensor([b.numel() for b in parts], device=dev)
    bid = torch.empty(p, dtype=torch.long, device=dev)
    bid[torch.cat(parts)] = torch.repeat_interleave(torch.arange(G, device=dev), sizes)
    R0 = block_matvecs(X, torch.where(support, torch.zeros_like(w_bar), w_bar), parts)  # r₀ = X_b (w̄ off S)_b
    # kept columns grouped by block (stable: increasing index within a block) and their slot in the block
    vb = bid[idx]
    order = torch.argsort(vb, stable=True)
    idx, vb = idx[order], vb[order]
    counts = torch.bincount(vb, minlength=G)
    slot = torch.arange(idx.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[vb]
    width = padded_width(counts)
    for W in torch.unique(width[width > 0]).tolist():  # one host read: the bucket widths
        blocks = torch.nonzero(width == W).squeeze(1)
        row_of_block = torch.full((G,), -1, dtype=torch.long, device=dev)
        row_of_block[blocks] = torch.arange(blocks.numel(), device=dev)
        mine = torch.nonzero(width[vb] == W).squeeze(1)
        src = torch.zeros(blocks.numel(), W, dtype=torch.long, device=dev)
        pad = torch.ones(blocks.numel(), W, dtype=torch.bool, device=dev)
        src[row_of_block[vb[mine]], slot[mine]] = idx[mine]
        pad[row_of_block[vb[mine]], slot[mine]] = False
        src = torch.where(pad, src[:, :1], src)  # a padding slot reads its block's first kept column ...
        woodbury = W > n and lam2 > 0
        chunk = max(1, _SOLVE_NUMBERS // (W * max(W, n)))
        for c in range(0, blocks.numel(), chunk):
            cs, cpad = src[c:c + chunk], pad[c:c + chunk]
            g = cs.shape[0]
            V = gather_columns(X, cs.flatten()).view(n, g, W).permute(1, 0, 2)  # (g, n, W): the kept columns
            r0 = R0[blocks[c:c + chunk]]  # (g, n)
            a = None if alpha is None else torch.where(cpad, 0.0, alpha[cs])
            if woodbury:  # Δ = X_Sᵀ(X_S X_Sᵀ + 2λI)⁻¹(r₀ + X_S α_S/2λ) − α_S/2λ
                V = V.masked_fill(cpad.unsqueeze(1), 0.0)  # ... and is zeroed here
                K = torch.bmm(V, V.transpose(1, 2))  # (g, n, n)
                K.diagonal(dim1=-2, dim2=-1).add_(lam2)
                rhs = r0 if a is None else r0 + torch.bmm(V, a.unsqueeze(-1)).squeeze(-1) / lam2
                z = batched_spd_solve(K, rhs).to(X.dtype)
                delta = torch.bmm(z.unsqueeze(1), V).squeeze(1)
                if a is not None:
                    delta -= a / lam2
            else:  # (X_SᵀX_S + 2λI) Δ = X_Sᵀr₀ − α_S
                A = torch.bmm(V.transpose(1, 2), V)  # (g, W, W)
                A.masked_fill_(cpad.unsqueeze(1) | cpad.unsqueeze(2), 0.0)  # ... or drops out here: padding
                A.diagonal(dim1=-2, dim2=-1).add_(lam2 + cpad.to(A.dtype))  # rows are identity rows
                b = torch.bmm(r0.unsqueeze(1), V).squeeze(1).masked_fill_(cpad, 0.0)  # with a zero right side
                if a is not None:
                    b -= a
                delta = batched_spd_solve(A, b).to(X.dtype)
            keep = ~cpad
            w[cs[keep]] = w_bar[cs[keep]] + delta[keep]
    return w


def _sliceable(X: torch.Tensor) -> bool:
    return X.device.type == "cpu" and X.dtype in (torch.float32, torch.float64) and X.is_contiguous() \
        and not X.requires_grad


def _block_ridge_sliced(X: torch.Tensor, w_bar: torch.Tensor, spans: list[tuple[int, int]], support: torch.Tensor,
                        lam2: float, alpha: torch.Tensor | None) -> torch.Tensor:
    """:func:`block_ridge` on a CPU for blocks that are column ranges of X, one block at a time.

    A block is a slice X[:, a:a+B] of the row-major X (B·n numbers: in cache from its matvec r₀ = X_b(w̄ off S)_b
    to the gather of its kept columns V, so X is read from memory about once); the Gram VᵀV (or VVᵀ, Woodbury)
    goes through numpy, whose matmul calls BLAS ``syrk`` for a product of a matrix with its own transpose (half
    the flops of the batched general product, no padding). The k×k systems are then solved in fp64 by batched
    Cholesky, in groups of blocks of similar k (:func:`_solve_similar`). The batched path's buckets instead pay
    for padded Grams and a gathered copy of all kept columns (n·k numbers).
    """
    n = X.shape[0]
    Xn, wb, sup = X.numpy(), w_bar.numpy(), support.cpu().numpy()
    al = None if alpha is None else alpha.numpy()
    w = np.zeros_like(wb)
    systems, numbers = [], 0  # (columns, A, right side) of the k×k systems not solved yet
    for a, width in spans:
        s = sup[a:a + width]
        kept = np.flatnonzero(s)
        if kept.size == 0:
            continue
        cols = a + kept
        Xb = Xn[:, a:a + width]
        r0 = Xb @ np.where(s, 0, wb[a:a + width])  # r₀ = X_b (w̄ off S)_b
        V = Xb[:, kept]  # (n, k): the kept columns, gathered from the slice
        a_S = None if al is None else al[cols]
        if kept.size > n and lam2 > 0:  # Δ = Vᵀ(VVᵀ + 2λI)⁻¹(r₀ + Vα_S/2λ) − α_S/2λ
            rhs = r0 if a_S is None else r0 + (V @ a_S) / lam2
            K = torch.from_numpy(V @ V.T).double()
            K.diagonal().add_(lam2)
            delta = spd_solve(K, torch.from_numpy(rhs).double()).numpy().astype(V.dtype) @ V
            w[cols] = wb[cols] + (delta if a_S is None else delta - a_S / lam2)
            continue
        A = (V.T @ V).astype(np.float64)  # (VᵀV + 2λI) Δ = Vᵀr₀ − α_S
        A[np.diag_indices_from(A)] += lam2
        rhs = r0 @ V
        systems.append((cols, A, rhs if a_S is None else rhs - a_S))
        numbers += A.size
        if numbers > _SOLVE_NUMBERS:
            _solve_similar(systems, wb, w)
            systems, numbers = [], 0
    _solve_similar(systems, wb, w)
    return torch.from_numpy(w)


def _solve_similar(systems: list, wb: np.ndarray, w: np.ndarray) -> None:
    """w[cols] = w̄[cols] + A⁻¹b for every (cols, A, b) of ``systems``: sorted by size, up to 64 systems whose
    sizes are within 25 % + 8 of the group's smallest are padded to the largest (identity rows, zero right side)
    and solved by one batched fp64 Cholesky (:func:`batched_spd_solve`)."""
    systems = sorted(systems, key=lambda t: len(t[0]))
    i = 0
    while i < len(systems):
        j = i + 1
        while j < len(systems) and j - i < 64 and len(systems[j][0]) <= 1.25 * len(systems[i][0]) + 8:
            j += 1
        group, W = systems[i:j], len(systems[j - 1][0])
        A = np.zeros((j - i, W, W))
        A[:, np.arange(W), np.arange(W)] = 1.0
        b = np.zeros((j - i, W))
        for t, (cols, a, r) in enumerate(group):
            A[t, :len(cols), :len(cols)] = a
            b[t, :len(cols)] = r
        x = batched_spd_solve(torch.from_numpy(A), torch.from_numpy(b)).numpy()
        for t, (cols, _, _) in enumerate(group):
            w[cols] = wb[cols] + x[t, :len(cols)].astype(w.dtype)
        i = j


def block_backsolve(problem: Problem, k: int, blocks, support: torch.Tensor | None = None):
    """Alg 6: global support (one thresholding step), then a ridge solve per block (:func:`block_ridge`).

    Block b solves min ½‖X_b(w_b − w̄_b)‖² + λ‖w_b − w̄_b‖² + α_bᵀw_b on its share of
    the support: the cross-block terms of XᵀX are dropped. With one block this is
    exactly :func:`chita_minimal.solver.backsolve.backsolve`. Returns (w, support).
    """
    if support is None:
        support = first_step_support(problem, k)
    w = block_ridge(problem.X, problem.w_bar, make_blocks(problem.p, blocks), support, problem.l2, problem.alpha)
    return w, support


def block_backsolve_looped(problem: Problem, k: int, blocks, support: torch.Tensor | None = None):
    """The same as :func:`block_backsolve`, one block at a time (the plain reference, for tests)."""
    if support is None:
        support = first_step_support(problem, k)
    w = torch.zeros_like(problem.w_bar)
    device = problem.X.device
    for b in make_blocks(problem.p, blocks):
        b = b.to(device)
        alpha_b = None if problem.alpha is None else problem.alpha[b]
        sub = Problem(problem.X[:, b], problem.w_bar[b], problem.l2, alpha_b)
        w[b] = ridge_on_support(sub, support[b])
    return w, support
