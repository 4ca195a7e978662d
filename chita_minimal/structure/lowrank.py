"""Low-rank layer decomposition with a global min-max error rank allocation (ALDS-style).

ALDS (Liebenwein et al., "Compressing Neural Networks: Towards Determining the Optimal Layer-wise
Decomposition", NeurIPS 2021) replaces a layer's weight W (out, cols) by a product of two thin
factors and picks every layer's rank so as to minimise the *maximum* relative layer error under a
global parameter budget. By the Eckart–Young–Mirsky theorem the best rank-r approximation in the
Frobenius norm is the truncated SVD W_r = U_r S_r V_rᵀ, with relative error

    ε(W, r) = ‖W − W_r‖_F / ‖W‖_F = sqrt(Σ_{i>r} σ_i²) / sqrt(Σ_i σ_i²).               (EYM)

A Linear (out, in) becomes Linear(in, r) → Linear(r, out); a Conv2d (out, C, kh, kw) is used as the
matrix (out, C·kh·kw) and becomes Conv2d(C, r, (kh, kw)) → 1×1 Conv2d(r, out). With j channel
groups (ALDS §3), the C input channels are split into j groups, each slice W_g (out, C/j·kh·kw)
gets its own rank-r SVD, and the layer is a grouped Conv2d(C, j·r, groups=j) followed by a 1×1
Conv2d(j·r, out) that sums the groups: W ≈ [B_1 … B_j] blockdiag(A_1, …, A_j).

    report = compress(model, 0.5)           # half the parameters of the factorized layers removed
    report.model, report.layers             # the compressed copy; per layer rank, groups, error, parameters
    ranks = allocate_ranks(model, 0.5)      # {weight name: rank or None (left dense)}
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from chita_minimal.network.params import owners
from chita_minimal.report import Report
from chita_minimal.utils import check_fraction, renamed


# -----------------------------------------------------------------------------
# one layer


def _group_mats(W: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """W (out, C) or (out, C, kh, kw) → j matrices (out, C/j·kh·kw), one per group of input channels."""
    if W.dim() not in (2, 4):
        raise ValueError(f"W must be a 2-d (Linear) or 4-d (Conv2d) weight, got shape {tuple(W.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or W.shape[1] % groups:
        raise ValueError(f"groups must be a positive int dividing the {W.shape[1]} input channels, got {groups!r}")
    Wg = W.reshape(W.shape[0], groups, W.shape[1] // groups, -1)  # (out, j, C/j, kh·kw)
    return [Wg[:, g].reshape(W.shape[0], -1) for g in range(groups)]


def _errors(W: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """e[r-1] = ε(W, r) of (EYM) for r = 1 … r_max (summed over groups), float64 on the CPU."""
    sv = [torch.linalg.svdvals(M.detach().double()).cpu() for M in _group_mats(W, groups)]  # j × (r_max,)
    sq = torch.stack(sv) ** 2  # (j, r_max)
    total = float(sq.sum())
    tail = sq.sum(0).flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{k≥i} σ_k², i.e. the error energy at rank i
    tail = torch.cat([tail[1:], tail.new_zeros(1)]).clamp_min(0)  # rank r drops σ_{r+1}, …
    return (tail / total).sqrt() if total > 0 else torch.zeros_like(tail)


def relative_error(W: torch.Tensor, rank: int, groups: int = 1) -> float:
    """ε(W, r) of (EYM): the relative Frobenius error of the best rank-``rank`` approximation.

    W: (out, in) or a conv weight (out, C, kh, kw) (used as (out, C·kh·kw)); with ``groups`` = j, the
    error of the per-group rank-r approximations, sqrt(Σ_g Σ_{i>r} σ_{g,i}²)/‖W‖_F.
    """
    e = _errors(W, groups)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    return float(e[min(rank, len(e)) - 1])


def _check_layer(name: str, m) -> None:
    if not isinstance(m, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"layer {name!r} is a {type(m).__name__}; only Linear and Conv2d can be factorized: "
                         "exclude it via names")
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        raise ValueError(f"layer {name!r} is a grouped/depthwise Conv2d (groups={m.groups}), not supported: "
                         "exclude it via names")


def _max_rank(layer: nn.Module, groups: int) -> int:
    out, cols = layer.weight.shape[0], layer.weight[0].numel() // groups
    return min(out, cols)


def _params(layer: nn.Module, rank: int | None, groups: int = 1) -> int:
    """Parameters of the layer (weights + bias) dense (rank None) or factorized: r·(C·kh·kw + j·out)."""
    bias = 0 if layer.bias is None else layer.bias.numel()
    W = layer.weight
    if rank is None:
        return W.numel() + bias
    return rank * (W[0].numel() + groups * W.shape[0]) + bias


def factorize(layer: nn.Module, rank: int, groups: int = 1) -> nn.Sequential:
    """The truncated-SVD factorization of a Linear or Conv2d layer, √S_r put on both factors.

    Linear (out, in) → Sequential(Linear(in, r, bias=False), Linear(r, out, bias)).
    Conv2d (out, C, kh, kw) → Sequential(Conv2d(C, j·r, (kh, kw), same stride/padding/dilation,
    groups=j, bias=False), Conv2d(j·r, out, 1, bias)); j = ``groups`` > 1 only for Conv2d (C % j = 0).
    A rank above the maximum min(out, C/j·kh·kw) is clipped to it (then the layer is reproduced exactly).
    The factors are computed in float64 and stored in the layer's dtype and device.
    """
    _check_layer("layer", layer)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if isinstance(layer, nn.Linear) and groups != 1:
        raise ValueError(f"groups > 1 is supported for Conv2d only, got groups={groups!r} for a Linear layer")
    W = layer.weight.detach()
    mats = _group_mats(W, groups)  # j × (out, cols)
    r = min(rank, _max_rank(layer, groups))
    A, B = [], []
    for M in mats:
        U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)  # (out, k), (k,), (k, cols)
        s = S[:r].sqrt()
        A.append(s[:, None] * Vh[:r])  # (r, cols)
        B.append(U[:, :r] * s)  # (out, r)
    A = torch.cat(A).to(W.dtype)  # (j·r, cols)
    B = torch.cat(B, dim=1).to(W.dtype)  # (out, j·r)
    kw = dict(device=W.device, dtype=W.dtype)
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, r, bias=False, **kw)
        second = nn.Linear(r, layer.out_features, bias=has_bias, **kw)
        first.weight.data.copy_(A)
        second.weight.data.copy_(B)
    else:
        C, (kh, kwid) = layer.in_channels, layer.kernel_size
        first = nn.Conv2d(C, groups * r, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                          dilation=layer.dilation, groups=groups, bias=False, padding_mode=layer.padding_mode, **kw)
        second = nn.Conv2d(groups * r, layer.out_channels, 1, bias=has_bias, **kw)
        first.weight.data.copy_(A.view(groups * r, C // groups, kh, kwid))
        second.weight.data.copy_(B[:, :, None, None])
    if has_bias:
        second.bias.data.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


# -----------------------------------------------------------------------------
# the whole model


def _layers(model: nn.Module, names, groups) -> dict[str, tuple[nn.Module, int]]:
    """{weight name: (module, groups)} for the named weights (default: every Linear/Conv weight)."""
    out = {}
    for name, (m, attr) in owners(model, names).items():
        if attr != "weight":
            raise ValueError(f"{name!r} is not the weight of a layer: only Linear/Conv2d weights can be factorized")
        _check_layer(name, m)
        j = groups.get(name, 1) if isinstance(groups, dict) else (groups if isinstance(m, nn.Conv2d) else 1)
        if isinstance(m, nn.Linear) and j != 1:
            raise ValueError(f"layer {name!r} is a Linear: groups > 1 is supported for Conv2d only")
        if isinstance(j, bool) or not isinstance(j, int) or j < 1 or m.weight.shape[1] % j:
            raise ValueError(f"groups={j!r} for layer {name!r} must be a positive int dividing its "
                             f"{m.weight.shape[1]} input channels")
        out[name] = (m, j)
    return out


@renamed(compression="fraction")
def allocate_ranks(model: nn.Module, fraction: float, names=None, groups: int | dict = 1) -> dict[str, int | None]:
    """Per-layer ranks minimising the maximum relative layer error ε(W_ℓ, r_ℓ) under a global budget.

    Budget: Σ_ℓ params_ℓ(r_ℓ) ≤ (1 − fraction)·Σ_ℓ params_ℓ(dense) over the named layers (weights +
    biases). For a threshold ε every layer takes the smallest rank with ε(W_ℓ, r) ≤ ε, or stays dense
    (rank None, error 0) when that factorization would not save parameters. The total is
    non-increasing in ε and changes only at the values ε(W_ℓ, r), so a binary search over those
    candidates finds the least feasible ε exactly; this is min-max optimal (any feasible assignment
    with max error M has, at ε = M, ranks no larger than its own). ``groups``: ALDS channel groups j,
    an int for every Conv2d (Linear layers use 1) or {name: j}. ``compression`` is the deprecated
    old name of ``fraction``.

    Raises ValueError if the budget cannot be met even with rank 1 everywhere.
    """
    c = check_fraction("fraction", fraction)
    layers = _layers(model, names, groups)
    errs = {n: _errors(m.weight, j) for n, (m, j) in layers.items()}  # (r_max,) non-increasing each
    dense = {n: _params(m, None) for n, (m, _) in layers.items()}
    budget = (1 - c) * sum(dense.values())

    def assign(eps: float) -> tuple[dict[str, int | None], int]:
        ranks, total = {}, 0
        for n, (m, j) in layers.items():
            r = int((errs[n] > eps).sum()) + 1  # smallest rank with error ≤ eps (errors non-increasing)
            ranks[n] = r if r <= len(errs[n]) and _params(m, r, j) < dense[n] else None
            total += _params(m, ranks[n], j)
        return ranks, total

    cand = torch.unique(torch.cat(list(errs.values())))  # sorted ascending
    lo, hi = 0, len(cand) - 1
    if assign(float(cand[hi]))[1] > budget:
        raise ValueError(f"fraction {c} is infeasible: rank 1 in every factorizable layer keeps "
                         f"{assign(float(cand[hi]))[1]} > {budget:.0f} parameters")
    while lo < hi:  # least index with total ≤ budget
        mid = (lo + hi) // 2
        if assign(float(cand[mid]))[1] <= budget:
            hi = mid
        else:
            lo = mid + 1
    ranks, total = assign(float(cand[lo]))
    assert total <= budget, (total, budget)
    return ranks


@dataclass(kw_only=True)
class LowRankReport(Report):
    """What :func:`compress` did (a :class:`~chita_minimal.report.Report`, method "lowrank").

    target: the ``fraction`` of the named layers' parameters asked to be removed; achieved: the
    fraction removed, 1 − params_after/params_before; masks: {} (layers are replaced, not masked);
    seconds: {"total"}; stages: []. model: the compressed deep copy of the input model (which is
    not changed); layers: {weight name: {rank, groups, error, params_before, params_after}}
    (rank None = left dense, error 0); params_*: totals over the named layers; max_error: max_ℓ ε_ℓ.
    ``compression`` is the old name of ``target``.
    """

    model: nn.Module | None = field(default=None, repr=False)
    params_before: int = 0
    params_after: int = 0
    max_error: float = 0.0
    layers: dict[str, dict] = field(default_factory=dict, repr=False)

    @property
    def compression(self) -> float:
        return self.target

    def _extra_lines(self) -> list[str]:
        lines = [f"  parameters {self.params_before:,} → {self.params_after:,}; max relative layer error "
                 f"{self.max_error:.4g}"]
        if self.layers:
            w = max(len("layer"), *(len(n) for n in self.layers))
            lines.append(f"  {'layer':<{w}}  {'rank':>6}  {'groups':>6}  {'error':>8}  {'params':>10}  {'of':>10}")
            for n, r in self.layers.items():
                rank = "dense" if r["rank"] is None else r["rank"]
                lines.append(f"  {n:<{w}}  {rank:>6}  {r['groups']:>6}  {r['error']:>8.4f}  "
                             f"{r['params_after']:>10,}  {r['params_before']:>10,}")
        return lines


@renamed(compression="fraction")
def compress(model: nn.Module, fraction: float, names=None, groups: int | dict = 1) -> LowRankReport:
    """A deep copy of ``model`` with every chosen layer replaced by its :func:`factorize` at the rank of
    :func:`allocate_ranks` (``fraction`` of the named layers' parameters removed at least), returned
    as the ``model`` of a :class:`LowRankReport`. The module ``fc`` owning ``fc.weight`` becomes a
    Sequential (parameter names ``fc.0.weight``, ``fc.1.weight``, ``fc.1.bias``). The input model is
    not changed. ``compression`` is the deprecated old name of ``fraction``."""
    t0 = time.perf_counter()
    ranks = allocate_ranks(model, fraction, names, groups)
    layers = _layers(model, list(ranks), groups)
    new = copy.deepcopy(model)
    mods = dict(new.named_modules())
    rows = {}
    for name, r in ranks.items():
        m, j = layers[name]
        owner = name.rpartition(".")[0]
        if not owner:
            raise ValueError(f"{name!r} belongs to the model itself, which cannot be replaced: wrap it in a module")
        err = 0.0 if r is None else relative_error(m.weight, r, j)
        rows[name] = dict(rank=r, groups=j, error=err, params_before=_params(m, None),
                          params_after=_params(m, r, j))
        if r is not None:
            new.set_submodule(owner, factorize(mods[owner], r, j))
    before = sum(v["params_before"] for v in rows.values())
    after = sum(v["params_after"] for v in rows.values())
    return LowRankReport(method="lowrank", target=float(fraction), achieved=1.0 - after / before,
                         seconds={"total": time.perf_counter() - t0}, model=new, params_before=before,
                         params_after=after, max_error=max(v["error"] for v in rows.values()), layers=rows)
