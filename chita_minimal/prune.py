"""``prune``: one call from a trained model to a pruned one, with any registered method.

model ──► network.fisher.gradients ──► X (n×p) ──► method.step(Stage) ──► write back ──► PruneReport

A method (see :mod:`chita_minimal.methods`) says what it needs; ``prune`` provides it: the flat
prunable weights w̄ and k, the gradients X when ``method.needs_gradients``, an N:M pattern, the
mask of weights that must stay zero. A multi-stage method (CHITA++, the paper's Alg 1) plans
several steps, and X is recomputed at the current (already pruned) weights for each. A
:class:`~chita_minimal.methods.base.ModelMethod` (SparseGPT) runs the whole call itself.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from chita_minimal import methods
from chita_minimal.methods.base import PRUNE_ARGUMENTS, ModelMethod, OptionError, Settings, Stage, dataset_size
from chita_minimal.network import fisher, memory, params
from chita_minimal.network.samples import as_dataset
from chita_minimal.report import PruneReport
from chita_minimal.scale import distributed
from chita_minimal.solver.patterns import NM, parse_pattern, row_length
from chita_minimal.solver.problem import num_kept
from chita_minimal.utils import check_number, check_sparsity, renamed


def __getattr__(name):  # PRUNE_METHODS: the registered names, as of now
    if name == "PRUNE_METHODS":
        return tuple(methods.REGISTRY)
    raise AttributeError(f"module 'chita_minimal.prune' has no attribute {name!r}")


@renamed(param_names="names")
def prune(model: nn.Module, dataset, sparsity: float, method="chita", *, n_grads: int = 1000,
          batch_size: int = 1, l2: float = 1e-3, seed: int = 0, names=None, device=None,
          first_order: bool = False, keep_pruned: bool = False, pattern: str | None = None,
          progress: bool = False, loss_fn=None, output_fn=None, max_memory=None, **options) -> PruneReport:
    """Prune ``model`` in place to ``sparsity`` with ``method``; returns a :class:`~chita_minimal.report.PruneReport`.

    Args:
        model: a trained network; its Conv/Linear weights (or the parameters ``names``) are pruned.
        dataset: the samples for the n gradient rows of the empirical Fisher (or calibration samples):
            an indexable dataset, a ``DataLoader`` (its dataset is used), or any iterable of batches
            (the first n_grads·batch_size samples are taken); a sample is ``(x, y)`` — x a tensor, a
            tuple or a dict of model inputs — or an HF-style dict with "labels" (see
            :mod:`chita_minimal.network.samples`). None for a method that needs no data (e.g. "mp").
        sparsity: fraction of the prunable weights set to zero, in [0, 1).
        method: a registered name — ``cm.methods.available()`` lists them with one line each: "chita"
            (Alg 4), "chita-iht", "chita-bso", "chita-block", "chita-block-iht", "chita++", "mp", "wf",
            "mfac", "cbs", "snip", "taylor", "l1-filter", "sparsegpt" — or a method object such as
            ``cm.methods.WoodFisher(block_size=50)``.
        options: the method's own options when ``method`` is a name, e.g. ``block_size`` for "wf",
            "cbs", "chita-block"; ``schedule``, ``stages``, ``base``, ``stage_method`` for "chita++"
            (plus the options of its stage method). An option the method does not have is an error
            that lists the valid ones.
        n_grads, batch_size: rows of X and samples per row (mini-batch size m).
        l2: ridge weight of (P) (λ = l2·n/2); the damping of the baselines' Fisher.
        seed: seed of the gradient sample (stage t of CHITA++ uses seed + t).
        names: the parameters to prune (default: every linear map, see
            :func:`chita_minimal.network.params.prunable_names`; the old keyword ``param_names`` still works).
        device: where gradients and the solve run (default: the model's device).
        first_order: include the first-order term α = Σ_i X_i (n times the mean gradient).
        keep_pruned: weights that are zero already stay zero (gradual pruning of a pruned network).
        pattern: "N:M" (e.g. "2:4") semi-structured sparsity instead of a global top-k: exactly N
            weights kept in every group of M consecutive weights of a row; ``sparsity`` must then be
            1 − N/M. For methods with ``takes_pattern``. With the default ``names``, layers whose rows
            M does not divide (e.g. a first conv with rows of 27) are left dense, with a warning
            naming them; parameters named explicitly must all fit (else a ValueError names them).
        progress: a progress bar for the gradients.
        loss_fn: ``loss_fn(output, target)``, the mean loss of a mini-batch (default cross-entropy);
            output_fn: what of the model's output the loss reads (default: the tensor itself, or
            ``.logits`` / ``["logits"]`` / the first element of a tuple).
        max_memory: bytes (or "8GB", "512MiB") that X and the method's working set may take; default the
            free memory of the device. Checked before X is built: when it does not fit, "chita-block"
            streams the gradients instead (the report says so in its notes), every other method
            raises a ValueError with the figures and the ways out, and nothing is allocated.

    The model is changed only when every step succeeded; on error it is left untouched.
    """
    try:
        method = methods.get(method, **options)
    except OptionError as e:
        raise OptionError(f"{e}; prune's own arguments: {', '.join(PRUNE_ARGUMENTS)}") from None
    sparsity = check_sparsity("sparsity", sparsity)
    if isinstance(n_grads, bool) or not isinstance(n_grads, int) or n_grads < 1:
        raise ValueError(f"n_grads must be an int >= 1, got {n_grads!r}")
    l2 = check_number("l2", l2, low=0)
    distributed.check_same(method=repr(method), sparsity=sparsity, n_grads=n_grads, batch_size=batch_size, l2=l2,
                           seed=seed)
    if pattern is not None:
        if not method.takes_pattern:
            valid = [n for n, c in methods.REGISTRY.items() if c.takes_pattern]
            raise ValueError(f"pattern is supported by methods {', '.join(valid)}, not {method.name!r}")
        if keep_pruned:
            raise ValueError("pattern cannot be combined with keep_pruned=True")
        n_of, m_of = parse_pattern(pattern)
        if abs(sparsity - (1 - n_of / m_of)) > 1e-9:
            raise ValueError(f"pattern {pattern!r} keeps {n_of} of every {m_of} weights: sparsity must be "
                             f"{1 - n_of / m_of:g}, got {sparsity}")
        if names is None:
            names = _pattern_layers(model, pattern, m_of)
    settings = Settings(n_grads=n_grads, batch_size=batch_size, l2=l2, seed=seed, names=names, device=device,
                        first_order=first_order, keep_pruned=keep_pruned, pattern=pattern, progress=progress,
                        loss_fn=loss_fn, output_fn=output_fn, max_memory=max_memory)
    if max_memory is not None:
        memory.parse_bytes(max_memory)
    if dataset is not None:
        dataset = as_dataset(dataset, n_grads * batch_size)
    if isinstance(method, ModelMethod):
        return method.prune_model(model, dataset, sparsity, settings)
    plan = method.plan(sparsity)
    if any(m.needs_gradients for _, m in plan) and (size := dataset_size(dataset)) < n_grads * batch_size:
        raise ValueError(f"dataset has {size} samples but n_grads·batch_size = {n_grads}·{batch_size} = "
                         f"{n_grads * batch_size} are needed")
    if any(m.needs_l2 for _, m in plan) and l2 <= 0:
        bad = next(m.name for _, m in plan if m.needs_l2)
        raise ValueError(f"method {bad!r} needs l2 > 0 (it damps the Fisher F = XᵀX/n + l2·I)")
    return _run(model, dataset, sparsity, method, plan, settings)


def _pattern_layers(model, pattern, m) -> list[str]:
    """The default prunable weights whose rows an N:M pattern can cut; the others are skipped, with a warning."""
    shapes = {name: prm.shape for name, prm in model.named_parameters()}
    default = params.resolve(model, None)
    flipped = dict(zip(default, params.transposed_weights(model, default)))
    skipped = [n for n in default if row_length(shapes[n], flipped[n]) % m or shapes[n].numel() == 0]
    if skipped:
        if len(skipped) == len(default):
            raise ValueError(f"no prunable weight has rows divisible by M = {m} for pattern {pattern!r}")
        warnings.warn(f"pattern {pattern!r}: left dense (row length not divisible by {m}): "
                      + ", ".join(f"{n} {tuple(shapes[n])}" for n in skipped), stacklevel=4)
    return [n for n in default if n not in skipped]


def _memory_advice(mem, method, s, p, itemsize) -> str:
    fit = max(0, (mem.available - (mem.solver_bytes or 0)) // max(1, p * itemsize))
    return (f"method {method.name!r} with n_grads = {s.n_grads} needs {memory.human(mem.total)} "
            f"(X: {s.n_grads} × {p:,} × {itemsize} bytes = {memory.human(mem.x_bytes)}, working set "
            f"{memory.human(mem.solver_bytes)}) but {memory.human(mem.available)} are available ({mem.limit} on "
            f"{mem.device}); nothing was allocated and the model is unchanged. Ways out: fewer gradients "
            f"(n_grads = {fit} would fit X), a block method (method='chita-block' streams the gradients when X "
            "does not fit: scale.streaming), another device (device=...), or a larger max_memory")


def _streamed_report(model, lay, method, sparsity, out, s, mem, names, original, t_total) -> PruneReport:
    """prune's report for the streamed block backsolve (no X, so no objective of (P))."""
    w = out.w
    if not torch.isfinite(w).all():
        raise ValueError(f"method {method.name!r} produced non-finite weights (try a larger l2)")
    params.write_back(model, lay, w.to(original.device))
    seconds = {"gradients": out.seconds["gradients"], "solve": out.seconds["accumulate"] + out.seconds["solve"],
               "total": time.perf_counter() - t_total}
    note = f"X would not fit ({mem}): block backsolve from streamed gradients (scale.streaming), X never built"
    w_cpu = w.detach().cpu()
    return PruneReport(method=method.name, target=sparsity, achieved=1.0 - int((w_cpu != 0).sum()) / lay.p,
                       k=int(out.support.sum()), p=lay.p, layer_sparsity=params.per_layer_sparsity(lay, w_cpu),
                       objective=None, seconds=seconds, masks=params.masks_from(lay, out.support.cpu()),
                       l2=float(s.l2), n_grads=s.n_grads, batch_size=s.batch_size, seed=s.seed,
                       stages=[dict(stage=0, sparsity=sparsity, method=method.name, streamed=True)],
                       dense=params.dense_parameters(model, names), notes=[note])


def _run(model, dataset, sparsity, method, plan, s: Settings) -> PruneReport:
    """The steps of ``plan`` on the flat prunable weights; the model is written only at the end."""
    names = params.resolve(model, s.names)
    lay = params.layout(model, names)
    original = params.flatten(model, lay)
    if not torch.isfinite(original).all():
        bad = [nm for nm, v in params.split(lay, original).items() if not torch.isfinite(v).all()]
        raise ValueError(f"prunable weights contain NaN/Inf in: {', '.join(bad)}")
    dev = torch.device(s.device) if s.device is not None else original.device
    p = lay.p
    nm = None if s.pattern is None else NM.for_layout(s.pattern, lay).to(dev)
    k_final = num_kept(sparsity, p) if nm is None else nm.k

    t_total = time.perf_counter()
    if any(m.needs_gradients for _, m in plan):
        mem = memory.plan(s.n_grads, p, original.element_size(),
                          max(m.working_bytes(s.n_grads, p, k_final, original.element_size()) for _, m in plan),
                          dev, s.max_memory)
        if not mem.fits:
            streamed = getattr(method, "prune_streamed", None)
            out = streamed(model, dataset, sparsity, s, names) if streamed and len(plan) == 1 else None
            if out is None:
                raise memory.MemoryPlanError(_memory_advice(mem, method, s, p, original.element_size()))
            return _streamed_report(model, lay, method, sparsity, out, s, mem, names, original, t_total)
    seconds = {"gradients": 0.0, "solve": 0.0}
    stage_log = []
    w = original.to(dev)
    mask = (w != 0) if s.keep_pruned else None
    objective = None
    try:
        for t, (s_t, m_t) in enumerate(plan):
            k_t = num_kept(s_t, p) if nm is None else nm.k
            if mask is not None:
                k_t = min(k_t, int(mask.sum()))
            X, alpha, sharded = None, None, False
            if m_t.needs_gradients:
                t0 = time.perf_counter()
                if t > 0:
                    params.write_back(model, lay, w.to(original.device))  # gradients at the masked weights
                sample = fisher.gradients(model, dataset, s.n_grads, batch_size=s.batch_size, names=names,
                                          device=dev, seed=s.seed + t, progress=s.progress, loss_fn=s.loss_fn,
                                          output_fn=s.output_fn)
                X, sharded = sample.X, sample.sharded
                if s.first_order:
                    alpha = sample.mean_grad * sample.n_total
                if sharded and not m_t.takes_sharded:  # methods that cannot work on row shards get all of X
                    X, sharded = distributed.gather_rows(X), False
                seconds["gradients"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            step = m_t.step(Stage(X=X, w=w, k=k_t, l2=s.l2, alpha=alpha, mask=mask if m_t.takes_mask else None,
                                  sharded=sharded, pattern=nm, layout=lay, sparsity=s_t))
            support, objective = step.support, step.objective
            if not m_t.exact_k:
                k_final = int(support.sum())  # e.g. whole filters: the kept count follows the filters
            seconds["solve"] += time.perf_counter() - t0
            if mask is not None and bool((support & ~mask).any()):
                # a stage solver without a mask argument revived pruned weights: keep them pruned
                raise RuntimeError(f"stage {t} ({m_t.name}) revived pruned weights")
            w, mask = step.w, support
            stage_log.append(dict(stage=t, sparsity=s_t, k=k_t, method=m_t.name, objective=objective,
                                  seconds=time.perf_counter() - t0))
        if not torch.isfinite(w).all():
            raise ValueError(f"method {method.name!r} produced non-finite weights (try a larger l2)")
        params.write_back(model, lay, w.to(original.device))
    except BaseException:
        params.write_back(model, lay, original)  # leave the model as it was
        raise
    seconds["total"] = time.perf_counter() - t_total
    w_cpu = w.detach().cpu()
    return PruneReport(method=method.name, target=sparsity, achieved=1.0 - int((w_cpu != 0).sum()) / p,
                       k=k_final, p=p, layer_sparsity=params.per_layer_sparsity(lay, w_cpu), objective=objective,
                       seconds=seconds, masks=params.masks_from(lay, mask.cpu()), l2=float(s.l2), n_grads=s.n_grads,
                       batch_size=s.batch_size, seed=s.seed, stages=stage_log,
                       dense=params.dense_parameters(model, names))
