"""``prune``: one call from a trained model to a pruned one, with CHITA or a baseline.

model ──► fisher.gradients ──► X (n×p) ──► solve / baseline ──► write back ──► PruneReport

CHITA++ (the paper's Alg 1) repeats this for a schedule of sparsities, recomputing X at
the current (already pruned) weights every stage and keeping pruned weights at zero.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import baselines, distributed, fisher, params, saliency
from .blocks import layer_blocks
from .patterns import NM
from .problem import Problem, num_kept
from .schedules import schedule as make_schedule
from .solve import solve

CHITA_METHODS = {"chita": "active", "chita-iht": "iht", "chita-bso": "backsolve", "chita-block": "block",
                 "chita-block-iht": "block-iht"}
BLOCK_METHODS = ("chita-block", "chita-block-iht")
BASELINE_METHODS = ("mp", "wf", "mfac", "cbs")
PEER_METHODS = ("snip", "taylor", "l1-filter", "sparsegpt")  # saliency, structured and layer-wise neighbours
PRUNE_METHODS = (*CHITA_METHODS, "chita++", *BASELINE_METHODS, *PEER_METHODS)
PATTERN_METHODS = ("chita", "chita-iht", "chita-bso", "mp", "sparsegpt")  # methods that take pattern="N:M"
DP_GRID = (0.0, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99)  # levels of allocation="dp"


@dataclass
class PruneReport:
    """What :func:`prune` did.

    sparsity: requested; achieved_sparsity: measured on the prunable weights;
    layer_sparsity: per prunable parameter; objective: f(w) of problem (P) at the last
    stage (None for magnitude pruning, which builds no X); seconds: time per phase
    ("gradients", "solve", "total"); masks: bool tensors (True = kept) per parameter,
    ready for :class:`chita_minimal.params.MaskKeeper`; stages: one dict per CHITA++ stage.
    """

    method: str
    sparsity: float
    achieved_sparsity: float
    k: int
    p: int
    layer_sparsity: dict[str, float]
    objective: float | None
    seconds: dict[str, float]
    masks: dict[str, torch.Tensor] = field(repr=False)
    l2: float = 0.0
    n_grads: int = 0
    batch_size: int = 1
    seed: int = 0
    stages: list[dict] = field(default_factory=list, repr=False)


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number in [0, 1), got {type(sparsity).__name__}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    return float(sparsity)


DISTRIBUTED_SOLVERS = ("chita", "chita-iht", "chita-bso", "chita-block")  # solved on row-sharded X; others gather X


def _solve_stage(method, X, w_bar, k, l2, alpha, mask, options, sharded=False, pattern=None, layout=None,
                 sparsity=None):
    """One pruning step on the flat weights: returns (w, support, objective or None).

    ``sharded``: X holds this rank's rows (torch.distributed); methods that cannot work on
    row shards gather the full X on every rank first (memory n·p per rank). ``pattern``: an
    N:M constraint (:class:`chita_minimal.patterns.NM`) instead of global top-k.
    """
    if sharded and method not in DISTRIBUTED_SOLVERS and method not in ("mp", "l1-filter"):
        X, sharded = distributed.gather_rows(X), False
    if method in CHITA_METHODS:
        res = solve(X, w_bar, None if pattern is not None else k, l2=l2, alpha=alpha, method=CHITA_METHODS[method],
                    mask=mask, distributed=sharded, pattern=pattern, **options)
        return res.w, res.support, res.objective
    if method == "mp":
        out = baselines.magnitude(w_bar, k) if pattern is None else baselines.Pruned(*pattern.project(w_bar))
        return out.w, out.support, None
    if method == "l1-filter":
        out = saliency.l1_filter(w_bar, layout, sparsity, **options)
        return out.w, out.support, None
    if method in ("snip", "taylor"):
        out = getattr(saliency, method)(X, w_bar, k)
        return out.w, out.support, Problem(X, w_bar, l2, alpha).objective(out.w) if l2 > 0 else None
    if l2 <= 0:
        raise ValueError(f"method {method!r} needs l2 > 0 (it damps the Fisher F = XᵀX/n + l2·I)")
    fn = {"wf": baselines.woodfisher, "mfac": baselines.mfac, "cbs": baselines.cbs}[method]
    out = fn(X, w_bar, k, l2=l2, **options)
    return out.w, out.support, Problem(X, w_bar, l2, alpha).objective(out.w)


def prune(model: nn.Module, dataset, sparsity: float, method: str = "chita", *, n_grads: int = 1000,
          batch_size: int = 1, l2: float = 1e-3, seed: int = 0, param_names=None, device=None,
          first_order: bool = False, schedule: str = "exp", stages: int = 10, base: float = 0.1,
          stage_method: str = "chita", block_size: int | None = None, progress: bool = False,
          keep_pruned: bool = False, pattern: str | None = None,
          **options) -> PruneReport:
    """Prune ``model`` in place to ``sparsity`` with CHITA or a baseline; returns a :class:`PruneReport`.

    Args:
        model: a trained network; its Conv/Linear weights (or ``params_names``) are pruned.
        dataset: (x, y) samples used for the n gradient rows of the empirical Fisher.
        sparsity: fraction of the prunable weights set to zero, in [0, 1).
        method: "chita" (active-set IHT, Alg 4), "chita-iht" (line-search IHT, Alg 2/3),
            "chita-bso" (backsolve, Alg 5), "chita-block" (block backsolve, Alg 6, blocks of
            ``block_size``), "chita-block-iht" (active-set IHT on the block-diagonal Fisher with
            one global top-k, then the per-block backsolve), "chita++" (multi-stage, Alg 1: ``schedule``, ``stages``, ``base``,
            each stage solved with ``stage_method``), or the baselines "mp" (magnitude),
            "wf" (WoodFisher), "mfac" (M-FAC), "cbs" (Combinatorial Brain Surgeon); and CHITA's
            neighbours: "snip" (|ḡ ⊙ w̄|), "taylor" (mean (g_i ⊙ w̄)², Molchanov et al.), "l1-filter"
            (whole conv filters by L1 norm, ``sparsity`` = fraction of filters per conv layer; the
            report's achieved_sparsity is the fraction of weights removed), "sparsegpt" (layer-wise
            OBS reconstruction from n_grads·batch_size calibration samples, see
            :mod:`chita_minimal.layerwise`; option ``allocation``: "uniform" per-layer sparsity,
            "dp" (SPDY-like dynamic programming over per-layer error tables on ``DP_GRID``, the
            achieved sparsity is then ≥ the target), or a dict name → sparsity).
        n_grads, batch_size: rows of X and samples per row (mini-batch size m).
        l2: ridge weight of (P) (λ = l2·n/2); the damping of the baselines' Fisher.
        seed: seed of the gradient sample (stage t of CHITA++ uses seed + t).
        first_order: include the first-order term α = Σ_i X_i (n times the mean gradient).
        device: where gradients and the solve run (default: the model's device).
        block_size: Fisher block width for "wf"/"cbs" (their default 100 when None) and block
            size of "chita-block"/"chita-block-iht" (default 500); their blocks never straddle two layers.
        keep_pruned: weights that are zero already stay zero (gradual pruning of a pruned network);
            CHITA methods solve with them fixed at zero, baselines must not revive them.
        pattern: "N:M" (e.g. "2:4") semi-structured sparsity instead of a global top-k: exactly N
            weights kept in every group of M consecutive weights of a row (the weight viewed as
            (out, rest)); ``sparsity`` must then be 1 − N/M. Methods in ``PATTERN_METHODS``.
        options: passed to the solver or baseline (e.g. ``update`` for "wf", ``steps`` for "mfac").

    The model is changed only when every step succeeded; on error it is left untouched.
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(PRUNE_METHODS)}")
    if method == "chita++" and stage_method not in (*CHITA_METHODS, *BASELINE_METHODS):
        raise ValueError(f"unknown stage_method {stage_method!r}; valid: {', '.join((*CHITA_METHODS, *BASELINE_METHODS))}")
    sparsity = _check_sparsity(sparsity)
    distributed.check_same(method=method, sparsity=sparsity, n_grads=n_grads, batch_size=batch_size, l2=l2,
                           seed=seed, stage_method=stage_method, schedule=schedule, stages=stages)
    if isinstance(n_grads, bool) or not isinstance(n_grads, int) or n_grads < 1:
        raise ValueError(f"n_grads must be an int >= 1, got {n_grads!r}")
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or l2 < 0:
        raise ValueError(f"l2 must be a number >= 0, got {l2!r}")
    size = _size_of(dataset)
    if pattern is not None:
        if method not in PATTERN_METHODS:
            raise ValueError(f"pattern is supported by methods {', '.join(PATTERN_METHODS)}, not {method!r}")
        if keep_pruned:
            raise ValueError("pattern cannot be combined with keep_pruned=True")
        from .patterns import parse_pattern

        n_of, m_of = parse_pattern(pattern)
        if abs(sparsity - (1 - n_of / m_of)) > 1e-9:
            raise ValueError(f"pattern {pattern!r} keeps {n_of} of every {m_of} weights: sparsity must be "
                             f"{1 - n_of / m_of:g}, got {sparsity}")
    if method == "sparsegpt":
        return _prune_layerwise(model, dataset, sparsity, names=param_names, n_samples=n_grads * batch_size,
                                pattern=pattern, seed=seed, device=device, options=options)
    needs_grads = method not in ("mp", "l1-filter") and not (method == "chita++" and stage_method == "mp")
    if needs_grads and size < n_grads * batch_size:
        raise ValueError(f"dataset has {size} samples but n_grads·batch_size = {n_grads}·{batch_size} = "
                         f"{n_grads * batch_size} are needed")
    names = params.resolve(model, param_names)
    lay = params.layout(model, names)
    original = params.flatten(model, lay)
    if not torch.isfinite(original).all():
        bad = [nm for nm, v in params.split(lay, original).items() if not torch.isfinite(v).all()]
        raise ValueError(f"prunable weights contain NaN/Inf in: {', '.join(bad)}")
    dev = torch.device(device) if device is not None else original.device
    p = lay.p
    nm = None if pattern is None else NM.for_layout(pattern, lay).to(dev)
    k_final = num_kept(sparsity, p) if nm is None else nm.k

    if method == "chita++":
        plan = [(s, stage_method) for s in make_schedule(schedule, sparsity, stages, base)]
    else:
        plan = [(sparsity, method)]
    stage_options = dict(options)
    solvers = {method, stage_method if method == "chita++" else None}  # the methods that solve the stages
    if solvers & set(BLOCK_METHODS):
        stage_options["blocks"] = layer_blocks(lay, 500 if block_size is None else block_size)
    elif block_size is not None:
        if solvers.isdisjoint({"wf", "cbs"}):
            raise ValueError(f"block_size is used by 'wf', 'cbs', 'chita-block' and 'chita-block-iht', "
                             f"not by method {method!r}")
        stage_options["block_size"] = block_size

    t_total = time.perf_counter()
    seconds = {"gradients": 0.0, "solve": 0.0}
    stage_log = []
    w = original.to(dev)
    mask = (w != 0) if keep_pruned else None
    objective = None
    try:
        for t, (s_t, m_t) in enumerate(plan):
            k_t = num_kept(s_t, p) if nm is None else nm.k
            if mask is not None:
                k_t = min(k_t, int(mask.sum()))
            X, alpha, sharded = None, None, False
            if m_t not in ("mp", "l1-filter"):
                t0 = time.perf_counter()
                if t > 0:
                    params.write_back(model, lay, w.to(original.device))  # gradients at the masked weights
                sample = fisher.gradients(model, dataset, n_grads, batch_size=batch_size, params=names,
                                          device=dev, seed=seed + t, progress=progress)
                X, sharded = sample.X, sample.sharded
                if first_order:
                    alpha = sample.mean_grad * sample.n_total
                seconds["gradients"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            stage_mask = mask if m_t in CHITA_METHODS else None
            w_new, support, objective = _solve_stage(m_t, X, w, k_t, l2, alpha, stage_mask, stage_options, sharded,
                                                     pattern=nm, layout=lay, sparsity=s_t)
            if m_t == "l1-filter":
                k_final = int(support.sum())  # whole filters: the kept count follows the filters
            seconds["solve"] += time.perf_counter() - t0
            if mask is not None and bool((support & ~mask).any()):
                # a stage solver without a mask argument revived pruned weights: keep them pruned
                raise RuntimeError(f"stage {t} ({m_t}) revived pruned weights")
            w, mask = w_new, support
            stage_log.append(dict(stage=t, sparsity=s_t, k=k_t, method=m_t, objective=objective,
                                  seconds=time.perf_counter() - t0))
        if not torch.isfinite(w).all():
            raise ValueError(f"method {method!r} produced non-finite weights (try a larger l2)")
        params.write_back(model, lay, w.to(original.device))
    except BaseException:
        params.write_back(model, lay, original)  # leave the model as it was
        raise
    seconds["total"] = time.perf_counter() - t_total
    w_cpu = w.detach().cpu()
    return PruneReport(method=method, sparsity=sparsity, achieved_sparsity=1.0 - int((w_cpu != 0).sum()) / p,
                       k=k_final, p=p, layer_sparsity=params.per_layer_sparsity(lay, w_cpu), objective=objective,
                       seconds=seconds, masks=params.masks_from(lay, mask.cpu()), l2=float(l2), n_grads=n_grads,
                       batch_size=batch_size, seed=seed, stages=stage_log)


def _prune_layerwise(model, dataset, sparsity, *, names, n_samples, pattern, seed, device, options) -> PruneReport:
    """``prune(method="sparsegpt")``: layer-wise OBS reconstruction (see :mod:`chita_minimal.layerwise`)."""
    from . import layerwise
    from .patterns import parse_pattern

    opts = dict(options)
    allocation = opts.pop("allocation", "uniform")
    grid = opts.pop("grid", DP_GRID)
    if _size_of(dataset) < n_samples:
        raise ValueError(f"dataset has {_size_of(dataset)} samples but {n_samples} calibration samples are needed")
    names = params.resolve(model, names)
    lay = params.layout(model, names)
    original = params.flatten(model, lay)
    t0 = time.perf_counter()
    seconds = {"gradients": 0.0}
    try:
        if isinstance(allocation, str) and allocation == "dp":
            if pattern is not None:
                raise ValueError("allocation='dp' cannot be combined with an N:M pattern")
            t1 = time.perf_counter()
            H = layerwise.calibration_hessians(model, dataset, n_samples, names=names, device=device, seed=seed)
            errors = layerwise.layer_errors(model, dataset, grid, names=names, hessians=H,
                                            **{k: v for k, v in opts.items() if k in ("blocksize", "percdamp")})
            sizes = dict(zip(lay.names, lay.numels))
            allocation = layerwise.allocate(errors, sizes, grid, sparsity)
            seconds["allocation"] = time.perf_counter() - t1
        rep = layerwise.layerwise_prune(model, dataset, None if pattern is not None else sparsity,
                                        n_samples=n_samples, names=names, device=device, seed=seed,
                                        pattern=None if pattern is None else parse_pattern(pattern),
                                        allocation=allocation, **opts)
    except BaseException:
        params.write_back(model, lay, original)
        raise
    seconds["gradients"] = rep.seconds["hessians"]  # the calibration passes play the role of the gradients
    seconds["solve"] = rep.seconds["total"] - rep.seconds["hessians"]
    seconds["total"] = time.perf_counter() - t0
    w = params.flatten(model, lay).detach().cpu()
    support = torch.cat([rep.masks[nm].reshape(-1) for nm in lay.names])
    return PruneReport(method="sparsegpt", sparsity=sparsity, achieved_sparsity=1.0 - int((w != 0).sum()) / lay.p,
                       k=int(support.sum()), p=lay.p, layer_sparsity=params.per_layer_sparsity(lay, w),
                       objective=None, seconds=seconds, masks=params.masks_from(lay, support), l2=0.0,
                       n_grads=n_samples, batch_size=1, seed=seed,
                       stages=[dict(stage=0, sparsity=sparsity, allocation=allocation if isinstance(allocation, dict)
                                    else "uniform")])


def _size_of(dataset) -> int:
    try:
        return len(dataset)
    except TypeError:
        raise TypeError("dataset must be a sized, indexable dataset of (x, y) pairs") from None
