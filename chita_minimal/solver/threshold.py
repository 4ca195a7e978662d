"""The constraint set's projection: H_k of the paper (the k largest |v_i|), applied to values, and the support
of a feasible point — global top-k, or an N:M ``pattern`` (:class:`chita_minimal.solver.patterns.NM`).

Shared by IHT (:mod:`.iht`), its host-read-free variant (:mod:`.iht_sync_free`), the active set, the
layer-wise solvers (:mod:`.layer`) and the baselines that keep the top-k of a score. :func:`kth_largest` is the
one selection they all use.
"""

from __future__ import annotations

import torch


SAMPLE_STRIDE = 61  # a prime: a strided sample of a flattened matrix does not repeat the same columns
BAND_MIN = 1 << 15  # below this size one full selection is as fast


def kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of the 1-d tensor ``a`` (1 ≤ k ≤ len(a)) as a 0-d tensor, selected exactly.

    On the CPU a large ``a`` is first bracketed: a strided sample's quantiles around rank k (four standard
    deviations of the sample rank either side) give lo ≤ hi; one pass counts the entries above hi and gathers
    those in [lo, hi], and the selection runs on that band only — about 3× faster than a selection over all of
    ``a`` at 10⁵–10⁶ entries, the hot step of IHT and of the ADMM path. When the bracket misses, the full
    selection runs (the same answer). On other devices: one ``topk``, without reading anything back.
    """
    n = a.numel()
    if a.device.type != "cpu":
        return torch.topk(a, k, sorted=False).values.min()
    if n >= BAND_MIN:
        sample = torch.sort(a[::SAMPLE_STRIDE]).values
        m = sample.numel()
        q = (n - k) / n  # share of a below the k-th largest
        spread = 4.0 * (q * (1 - q) * m) ** 0.5 + 2
        lo = sample[max(int(q * m - spread), 0)]
        hi = sample[min(int(q * m + spread) + 1, m - 1)]
        need = k - int((a > hi).sum())
        band = a[(a >= lo) & (a <= hi)]
        if 0 < need <= band.numel():
            return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(a, n - k + 1).values


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of the 1-d ``score``; ties at the k-th value are broken
    deterministically: the lower index wins."""
    n = score.numel()
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    kth = kth_largest(score, k)
    mask = score > kth
    need = k - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(score == kth).squeeze(1)[:need]] = True
    return mask


def hard_threshold(v: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |v_i| (H_k in the paper); ties: the lower index wins."""
    if k >= v.numel():
        return torch.ones_like(v, dtype=torch.bool)
    return top_k_mask(v.abs(), k)


def project(u: torch.Tensor, k: int, pattern=None) -> tuple[torch.Tensor, torch.Tensor]:
    """H_k applied to values: (u with all but its k largest |entries| set to 0, the kept mask).

    With an N:M ``pattern``: the top-N |entries| of every group instead (k = pattern.k).
    """
    if pattern is not None:
        return pattern.project(u)
    mask = hard_threshold(u, k)
    return torch.where(mask, u, torch.zeros_like(u)), mask


def support_of(w: torch.Tensor, k: int, pattern=None) -> torch.Tensor:
    """The k kept coordinates of w: its nonzeros, filled up (lowest indices first) when fewer than k
    (with an N:M ``pattern``: filled up to N in every group)."""
    if pattern is not None:
        return pattern.support_of(w)
    support = w != 0
    missing = k - int(support.sum())
    if missing > 0:
        support[torch.nonzero(~support).squeeze(1)[:missing]] = True
    return support
