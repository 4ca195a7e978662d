"""The constraint set's projection: H_k of the paper (the k largest |v_i|), applied to values, and the support
of a feasible point — global top-k, or an N:M ``pattern`` (:class:`chita_minimal.solver.patterns.NM`).

Shared by IHT (:mod:`.iht`), its host-read-free variant (:mod:`.iht_sync_free`), the active set and the
baselines that keep the top-k of a score.
"""

from __future__ import annotations

import torch


def hard_threshold(v: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |v_i| (H_k in the paper).

    Ties at the k-th magnitude are broken deterministically: the lower index wins.
    """
    p = v.numel()
    if k >= p:
        return torch.ones_like(v, dtype=torch.bool)
    a = v.abs()
    kth = torch.topk(a, k, sorted=False).values.min()
    mask = a > kth
    need = k - int(mask.sum())
    if need > 0:
        ties = torch.nonzero(a == kth).squeeze(1)[:need]
        mask[ties] = True
    return mask


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
