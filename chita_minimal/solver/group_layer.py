"""Which groups of a layer's input columns to keep: the structured layer-wise problem (OSSCAR's, in Gram form).

A consumer layer W (r × d) reads d input features; they come in G groups (an MLP neuron: one column of the down
projection; an attention key/value group: the columns of o_proj fed by its query heads). Removing a group removes
its columns (and, upstream, whatever produces them). With H = XᵀX/N of the layer's calibration inputs and the
ridge λ (H_λ = H + λI), the kept set S of columns is chosen and the layer refit on it:

    min_S  f(S) = min_{Ŵ: Ŵ_{:,Sᶜ} = 0} tr((W − Ŵ) H_λ (W − Ŵ)ᵀ) = tr(W H_λ Wᵀ) − ‖L_S⁻¹ (H_λ)_{S,:} Wᵀ‖²_F,

with L_S the Cholesky factor of (H_λ)_{SS}, and Ŵ_{:,S} = W (H_λ)_{:,S} (H_λ)_{SS}⁻¹ (the backsolve). This is
CHITA's problem with the group-L0 constraint of group-CHITA, the rows sharing one H (as in the layer problem of
:mod:`.layer`). :func:`select_groups` solves it as OSSCAR (Meng et al., ICML 2024) does, in three phases:

1. **Greedy removal by OBS group costs**: from all groups, remove in a few chunks the groups whose removal costs
   least — cost_q = tr(Ŵ_Q [(H_S⁻¹)_QQ]⁻¹ Ŵ_Qᵀ), the exact rise of f when group Q alone leaves S with the other
   kept columns refit — and recompute the costs on the smaller set after each chunk.
2. **Local search** (CHITA's swaps, Alg 4, over groups): the removed group of largest gain (the fall of f when it
   alone comes back, ‖G_A‖ through the Schur complement) against the kept group of smallest cost; the best of a
   few such pairs is evaluated exactly and taken when f falls. With few groups (attention) every subset of the
   right size is evaluated instead (the exact optimum).
3. **Backsolve** of all rows on the kept columns.
"""

from __future__ import annotations

import itertools
import math

import torch

from chita_minimal.solver.layer import check_layer, damp
from chita_minimal.utils import check_int, check_number


def _check_groups(groups: torch.Tensor, d: int) -> torch.Tensor:
    if not isinstance(groups, torch.Tensor) or groups.dim() != 2 or groups.dtype not in (torch.int64, torch.int32):
        raise TypeError("groups must be a (G, s) integer tensor of column indices (one row per group)")
    if groups.numel() == 0 or int(groups.min()) < 0 or int(groups.max()) >= d:
        raise ValueError(f"groups must hold column indices in [0, {d})")
    if torch.unique(groups).numel() != groups.numel():
        raise ValueError("groups must not share columns")
    return groups.long()


def group_objective(W: torch.Tensor, Hd: torch.Tensor, cols: torch.Tensor) -> float:
    """f(S) for the kept columns ``cols`` (float64 inputs): tr(W H_λ Wᵀ) − ‖L_S⁻¹ (H_λ)_{S,:} Wᵀ‖²."""
    total = float(((W @ Hd) * W).sum())
    if cols.numel() == 0:
        return total
    L = torch.linalg.cholesky(Hd[cols][:, cols])
    Z = torch.linalg.solve_triangular(L, Hd[cols] @ W.T, upper=False)
    return total - float((Z * Z).sum())


def group_backsolve(W: torch.Tensor, Hd: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Ŵ (r × d, float64): W (H_λ)_{:,S} (H_λ)_{SS}⁻¹ on the columns S = ``cols``, zero elsewhere."""
    out = torch.zeros_like(W)
    if cols.numel():
        L = torch.linalg.cholesky(Hd[cols][:, cols])
        out[:, cols] = torch.cholesky_solve((W @ Hd[:, cols]).T, L).T
    return out


def _removal_costs(W: torch.Tensor, Hd: torch.Tensor, groups: torch.Tensor, kept: torch.Tensor):
    """OBS cost of removing each kept group alone from the kept set (the others refit): (costs (G,), Ŵ)."""
    cols = groups[kept].reshape(-1)
    L = torch.linalg.cholesky(Hd[cols][:, cols])
    Hinv = torch.cholesky_inverse(L)
    What = torch.cholesky_solve((W @ Hd[:, cols]).T, L).T  # (r, |S|) the refit on S
    s = groups.shape[1]
    n = int(kept.sum())
    blocks = Hinv.view(n, s, n, s).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (n, s, s) (H_S⁻¹)_QQ
    Wq = What.view(W.shape[0], n, s).permute(1, 0, 2)  # (n, r, s)
    costs = torch.full((groups.shape[0],), math.inf, dtype=W.dtype, device=W.device)
    costs[kept] = (Wq * torch.linalg.solve(blocks, Wq.transpose(1, 2)).transpose(1, 2)).sum((1, 2))
    return costs, What, cols, Hinv


def _addition_gains(W: torch.Tensor, Hd: torch.Tensor, groups: torch.Tensor, kept: torch.Tensor, What, cols):
    """The fall of f when each removed group alone comes back (the others refit): (G,), −inf for kept groups."""
    gains = torch.full((groups.shape[0],), -math.inf, dtype=W.dtype, device=W.device)
    out = (~kept).nonzero().squeeze(1)
    if out.numel() == 0:
        return gains
    R = (W - _embed(What, cols, W.shape[1])) @ Hd  # (r, d): the gradient/2 of f at the refit, zero on S
    L = torch.linalg.cholesky(Hd[cols][:, cols])
    A = groups[out]  # (m, s)
    m, s = A.shape
    C = torch.linalg.solve_triangular(L, Hd[cols][:, A.reshape(-1)], upper=False).view(len(cols), m, s)
    schur = Hd[A[:, :, None], A[:, None, :]] - torch.einsum("kma,kmb->mab", C, C)  # (m, s, s)
    GA = R[:, A].permute(1, 0, 2)  # (m, r, s)
    gains[out] = (GA * torch.linalg.solve(schur, GA.transpose(1, 2)).transpose(1, 2)).sum((1, 2))
    return gains


def _swap_deltas(W, Hd, groups, kept, What, cols, Hinv):
    """For single-column groups: the exact change of f for every swap (a removed column in, a kept one out), from
    the refit on S and H_S⁻¹: adding a lowers f by g_a²/σ_a (σ_a the Schur complement, g_a = ((W − Ŵ)H_λ)_{:,a}),
    moves Ŵ_S by −(g_a/σ_a)·u_aᵀ and (H⁻¹)_bb by u_ab²/σ_a (u_a = H_S⁻¹(H_λ)_{S,a}); removing b then costs
    ‖Ŵ'_b‖²/(H'⁻¹)_bb. Returns (best change, group in, group out)."""
    out = (~kept).nonzero().squeeze(1)
    col_out = groups[out, 0]
    R = (W - _embed(What, cols, W.shape[1])) @ Hd[:, col_out]  # (r, m) g_a
    HSA = Hd[cols][:, col_out]  # (|S|, m)
    U = Hinv @ HSA
    sigma = Hd[col_out, col_out] - (HSA * U).sum(0)  # (m,)
    Cm = R / sigma  # (r, m) the new weight of column a
    gain = (R * R).sum(0) / sigma
    P = What.T @ Cm  # (|S|, m)
    num = (What * What).sum(0)[:, None] - 2 * U * P + U ** 2 * (Cm * Cm).sum(0)[None, :]
    den = Hinv.diagonal()[:, None] + U ** 2 / sigma[None, :]
    delta = num / den - gain[None, :]  # (|S|, m): b out (rows), a in (columns)
    best = int(torch.argmin(delta))
    b_pos, a_pos = divmod(best, delta.shape[1])
    kept_idx = kept.nonzero().squeeze(1)
    return float(delta.view(-1)[best]), int(out[a_pos]), int(kept_idx[b_pos])


def _embed(What, cols, d):
    out = torch.zeros(What.shape[0], d, dtype=What.dtype, device=What.device)
    out[:, cols] = What
    return out


def select_groups(W: torch.Tensor, H: torch.Tensor, groups: torch.Tensor, keep: int, *, percdamp: float = 0.01,
                  chunks: int = 8, swap_rounds: int = 10, candidates: int = 4, restarts: int = 8,
                  exhaustive: int = 64):
    """Keep ``keep`` of the column groups of W (r × d) with H = XᵀX/N (d × d): phases 1–3 of the module.

    groups: (G, s) column indices, one row per group (all of size s); chunks: greedy removal steps;
    swap_rounds, candidates: local-search rounds and the pairs (``candidates`` best gains × lowest costs) tried
    per round; restarts: local searches restarted from the best set with two groups traded at random (seeded);
    exhaustive: every subset is evaluated when there are at most this many.

    Returns (kept (G,) bool, Ŵ (r × d) refit on the kept columns, zero on the others, in W's dtype,
    info {"objective": f/f(∅), "swaps": accepted swaps}).
    """
    check_layer(W, H)
    groups = _check_groups(groups, W.shape[1])
    G = groups.shape[0]
    check_int("keep", keep)
    if keep > G:
        raise ValueError(f"keep = {keep} exceeds the {G} groups")
    check_int("chunks", chunks)
    check_int("swap_rounds", swap_rounds, low=0)
    check_int("candidates", candidates)
    check_int("restarts", restarts, low=0)
    check_number("percdamp", percdamp, low=0)
    W64 = W.to(torch.float64)
    Hd = damp(H.to(torch.float64), percdamp)
    base = group_objective(W64, Hd, groups[:0].reshape(-1))
    swaps = 0
    if math.comb(G, keep) <= exhaustive:
        best = min(itertools.combinations(range(G), keep),
                   key=lambda c: group_objective(W64, Hd, groups[list(c)].reshape(-1)))
        kept = torch.zeros(G, dtype=torch.bool, device=W.device)
        kept[list(best)] = True
    else:
        kept = torch.ones(G, dtype=torch.bool, device=W.device)
        for step in range(chunks):  # phase 1: greedy removal in chunks
            left = int(kept.sum()) - keep
            if left <= 0:
                break
            take = math.ceil(left / (chunks - step))
            costs = _removal_costs(W64, Hd, groups, kept)[0]
            kept[torch.topk(costs, take, largest=False).indices] = False
        kept, f, swaps = _swap_search(W64, Hd, groups, kept, swap_rounds, candidates)
        gen = torch.Generator().manual_seed(0)
        for _ in range(restarts):  # restarts from the best set with two kept groups traded for two removed ones
            trial = kept.clone()
            ins, outs = (~kept).nonzero().squeeze(1), kept.nonzero().squeeze(1)
            t = min(2, len(ins), len(outs))
            trial[ins[torch.randperm(len(ins), generator=gen)[:t].to(ins.device)]] = True
            trial[outs[torch.randperm(len(outs), generator=gen)[:t].to(outs.device)]] = False
            trial, ft, st = _swap_search(W64, Hd, groups, trial, swap_rounds, candidates)
            if ft < f:
                kept, f, swaps = trial, ft, swaps + st
    cols = groups[kept].reshape(-1).sort().values
    What = group_backsolve(W64, Hd, cols)  # phase 3
    f = group_objective(W64, Hd, cols)
    return kept, What.to(W.dtype), {"objective": f / base if base > 0 else 0.0, "swaps": swaps}


def _swap_search(W, Hd, groups, kept, rounds, candidates):
    """Phase 2 from the set ``kept``: (kept, f, accepted swaps)."""
    f = group_objective(W, Hd, groups[kept].reshape(-1))
    swaps = 0
    for _ in range(rounds):
        if bool(kept.all()) or not bool(kept.any()):
            break
        costs, What, cols, Hinv = _removal_costs(W, Hd, groups, kept)
        if groups.shape[1] == 1:  # single columns (MLP neurons): every swap evaluated exactly at once
            delta, a, b = _swap_deltas(W, Hd, groups, kept, What, cols, Hinv)
            if delta >= -1e-12 * abs(f):
                break
            kept = kept.clone()
            kept[a], kept[b] = True, False
            f, swaps = f + delta, swaps + 1
            continue
        gains = _addition_gains(W, Hd, groups, kept, What, cols)
        ins = torch.topk(gains, min(candidates, int((~kept).sum()))).indices.tolist()
        outs = torch.topk(costs, min(candidates, int(kept.sum())), largest=False).indices.tolist()
        best_f, best = f, None
        for a, b in itertools.product(ins, outs):
            trial = kept.clone()
            trial[a], trial[b] = True, False
            ft = group_objective(W, Hd, groups[trial].reshape(-1))
            if ft < best_f * (1 - 1e-12):
                best_f, best = ft, trial
        if best is None:
            break
        kept, f, swaps = best, best_f, swaps + 1
    return kept, f, swaps


def group_scores(W: torch.Tensor, H: torch.Tensor, groups: torch.Tensor, kind: str) -> torch.Tensor:
    """Baseline scores of the groups (high = kept), with no refit: "wanda" Σ_{j∈Q} ‖W_{:,j}‖²·H_jj (the rise of f
    when group Q alone is removed, H replaced by its diagonal: Wanda's score per group); "norm" ‖W_{:,Q}‖_F
    (H is not read and may be None)."""
    groups = _check_groups(groups, W.shape[1])
    col = (W.to(torch.float64) ** 2).sum(0)
    if kind == "wanda":
        col = col * H.diagonal().to(torch.float64)
    elif kind != "norm":
        raise ValueError(f"kind must be 'wanda' or 'norm', got {kind!r}")
    return col[groups].sum(1)
