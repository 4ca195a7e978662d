"""Iterative hard thresholding for (P): the paper's Alg 3, with the step size of Alg 2.

Each iteration costs one Xᵀr and one X·d pass; the residual r = y − Xw is kept up to
date instead of being recomputed, so a line-search iteration costs about what one
bare ``X @ w`` + ``X.T @ r`` pass costs.

The constraint is global top-k, or an N:M pattern (``pattern``, a
:class:`chita_minimal.solver.patterns.NM`, with k = pattern.k): H_k becomes the top-N of every
group, and τ_c of Alg 2 takes the largest pruned |g_j| per group.
"""

from __future__ import annotations

import torch

from chita_minimal.solver.iht_sync_free import iht_sync_free
from chita_minimal.solver.problem import Problem
from chita_minimal.solver.threshold import hard_threshold, project, support_of  # noqa: F401 (also imported from here)

# refit (see iht): also right after a swap of at most this many coordinates from a support that had settled
# (an exact refit, or this many iterations without a change)
_SWAP_REFIT = 8
_SWAP_SETTLED = 5

# When more than this fraction of coordinates changes, one dense matvec beats a column gather
# (gathering columns of a row-major X reads scattered memory).
_DENSE_UPDATE_FRACTION = 0.02


def _step_to_keep_support(w, g, support, pattern=None):
    """τ_c: the largest τ for which H_k(w − τg) keeps the support of w (Alg 2).

    For i in S, |w_i − τ g_i| stays ≥ τ·max_{j∉S}|g_j| until
    τ_i = |w_i| / (sign(w_i)·g_i + M); τ_c is the smallest such τ_i. With an N:M
    ``pattern`` the competition is within a group: M is the max over the pruned j of i's group.
    """
    if pattern is None:
        M = torch.where(support, torch.zeros_like(g), g.abs()).max()
    else:
        M = pattern.max_pruned(g, support)
    denom = torch.sign(w) * g + M
    ok = support & (denom > 0)
    ratios = torch.where(ok, w.abs() / torch.where(ok, denom, torch.ones_like(denom)), torch.full_like(w, float("inf")))
    return float(ratios.min())


def _threshold_step(problem: Problem, w, r, g, Xd, d, tau, k, pattern=None, exact_changes: bool = False):
    """w⁺ = H_k(w − τg) and its residual, reusing X·d: X w⁺ = Xw + τXd + X_Δ δ_Δ.

    Δ: the coordinates where δ = w⁺ − w − τd is nonzero — in exact arithmetic those whose membership in the
    support changed, but rounding leaves δ ~ 1e-16·|w| on many kept ones, and past a few percent of the
    coordinates the update becomes a full product. ``exact_changes``: Δ is the coordinates that entered or left
    the support (the kept ones moved by exactly τd, which X·d carries), so a step that swaps a few coordinates
    costs a few columns."""
    u = w - tau * g
    w_new, mask = project(u, k, pattern)
    return w_new, mask, _stepped_residual(problem, w, r, Xd, d, tau, w_new, mask, exact_changes)


def _stepped_residual(problem: Problem, w, r, Xd, d, tau, w_new, mask, exact_changes=False, changed=None):
    """y − X w⁺ for w⁺ = H_k(w − τg): r − τXd − X_Δ δ_Δ from the columns Δ (:func:`_threshold_step`; ``changed``:
    Δ when the caller has it), or a full product when Δ is more than a few percent of the coordinates."""
    delta = w_new - w - tau * d  # nonzero only where the support changed
    if changed is None:
        changed = torch.nonzero(mask != (w != 0) if exact_changes else delta).squeeze(1)
    if changed.numel() > _DENSE_UPDATE_FRACTION * w.numel():
        return problem.residual(w_new)
    return r - tau * Xd - problem.matvec_cols(changed, delta[changed])


def line_search_step(problem: Problem, w, r, f, k, tol, cg=None, pattern=None, g=None, exact_changes=False,
                     batch_trials=False):
    """One IHT iteration with the step size of Alg 2. Returns (w, support, r, f).

    τ* = ‖d_S‖²/(‖X_S d_S‖² + 2λ‖d_S‖²) is the exact minimiser along d = −∇f on the
    support S; τ_c is the largest step that keeps S after thresholding. If τ* ≤ τ_c
    the support stays and the exact step is taken — along the conjugate direction
    d + β·d_prev when the previous step kept the same support (``cg``, a dict this
    function updates; Fletcher–Reeves β), which makes the weights on a stable support
    converge like conjugate gradients rather than steepest descent, at no extra matvec
    (X·d_prev is carried). When the support cannot stay, or the step no longer makes
    progress (relative decrease < tol, i.e. w is optimal on S), the steps τ_c·2^j,
    j = 0…5, are tried with thresholding, doubling while f decreases; if none lowers
    f, the safe step 1/L is tried. f never increases. ``pattern``: an N:M constraint
    (k = pattern.k; "full support" then means N nonzeros in every group). ``g``: ∇f(w) when the
    caller has it already. ``exact_changes``: see :func:`_threshold_step`. ``batch_trials`` (a dense
    :class:`Problem`, or one with ``matvecs``): the support-changing candidates from :func:`_trial_steps` —
    the same search, with the residuals of the candidates that swap many coordinates from one product.
    """
    support = w != 0
    full_support = int(support.sum()) >= k
    if g is None:
        g = problem.gradient(w, r)
    d = torch.where(support, -g, torch.zeros_like(g))  # descent direction on S
    dd = float(torch.dot(d, d))
    Xd = problem.matvec(d)
    tau_star = dd / (problem.rdot(Xd, Xd) + 2.0 * problem.lam * dd) if dd > 0 else 0.0
    tau_c = _step_to_keep_support(w, g, support, pattern) if full_support else 0.0

    best = (w, support, r, f)
    if full_support and 0.0 < tau_star <= tau_c:
        # the support stays: exact minimiser along d (or its conjugate), no thresholding needed
        step, Xstep, tau = d, Xd, tau_star
        if cg is not None and cg.get("dd"):
            beta = dd / cg["dd"]
            step_cg = d + beta * cg["d"]
            Xstep_cg = Xd + beta * cg["Xd"]
            slope = -float(torch.dot(g, step_cg))  # −gᵀd_cg > 0 for a descent direction
            curv = problem.rdot(Xstep_cg, Xstep_cg) + 2.0 * problem.lam * float(torch.dot(step_cg, step_cg))
            if slope > 0 and curv > 0:
                step, Xstep, tau = step_cg, Xstep_cg, slope / curv
        w_new = w + tau * step
        r_new = r - tau * Xstep
        best = (w_new, support, r_new, problem.objective(w_new, r_new))
        if cg is not None:
            cg.update(d=step, Xd=Xstep, dd=dd)
        if f - best[3] > tol * abs(f):
            return best
    if cg is not None:
        cg.clear()  # the support may change: restart the conjugate directions

    # explore support changes: τ_c, 2τ_c, … (τ* when w has fewer than k nonzeros) while f decreases
    # τ_c itself is a tie (a kept and a pruned coordinate have equal magnitude after the step) that
    # rounding would decide: start just past it, where the support really changes
    tau = tau_c * (1.0 + 64 * torch.finfo(w.dtype).eps) if tau_c > 0 else tau_star
    improved = False
    if batch_trials and 0.0 < tau < float("inf"):
        trials = _trial_steps(problem, w, r, g, Xd, d, tau, k, pattern)
        for _ in range(6):  # the same search as below, on candidates computed in batches
            cand = next(trials)
            if cand[3] < best[3]:
                best, improved = cand, True
            elif improved:
                break
        if best[3] < f:
            return best
        cand = next(trials)  # the safe step 1/L
        return cand if cand[3] < f else best
    if 0.0 < tau < float("inf"):
        for _ in range(6):  # the start and ≤ 5 doublings
            cand = _threshold_step(problem, w, r, g, Xd, d, tau, k, pattern, exact_changes)
            f_c = problem.objective(cand[0], cand[2])
            if f_c < best[3]:
                best, improved = (*cand, f_c), True
            elif improved:
                break  # past the best step along this path
            tau *= 2.0
    if best[3] < f:
        return best
    # fall back to the safe step 1/L (monotone by the majorisation argument)
    w_new, mask, r_new = _threshold_step(problem, w, r, g, Xd, d, 1.0 / problem.lipschitz(), k, pattern,
                                         exact_changes)
    f_new = problem.objective(w_new, r_new)
    return (w_new, mask, r_new, f_new) if f_new < f else best


def _trial_steps(problem: Problem, w, r, g, Xd, d, tau, k, pattern=None):
    """The candidates of Alg 2's support-changing search in order — H_k(w − τ·2^j g) for j = 0…5, then the safe
    step 1/L — each as (w⁺, mask, r⁺, f⁺), computed when the search asks for it. A candidate that swaps few
    coordinates gets its residual from their columns (``exact_changes`` of :func:`_threshold_step`); at the first
    that would need a full product, all the remaining candidates are projected and their residuals come from one
    product of X with all of them (``matvecs``: one read of X instead of one per candidate). The search that
    consumes them stops where it would have stopped anyway; only candidates it may not reach are computed early."""
    taus = [tau * 2.0**j for j in range(6)] + [1.0 / problem.lipschitz()]
    for j, t in enumerate(taus):
        w_new, mask = project(w - t * g, k, pattern)
        changed = torch.nonzero(mask != (w != 0)).squeeze(1)
        if changed.numel() > _DENSE_UPDATE_FRACTION * w.numel() and j < len(taus) - 1:
            rest = [(w_new, mask)] + [project(w - u * g, k, pattern) for u in taus[j + 1:]]
            R = problem.y - problem.matvecs(torch.stack([c[0] for c in rest]))
            for (w_i, mask_i), r_i in zip(rest, R):
                yield w_i, mask_i, r_i, problem.objective(w_i, r_i)
            return
        r_new = _stepped_residual(problem, w, r, Xd, d, t, w_new, mask, changed=changed)
        yield w_new, mask, r_new, problem.objective(w_new, r_new)


def fixed_step(problem: Problem, w, r, f, k, tol, cg=None, pattern=None, exact_changes=False, batch_trials=False):
    """One IHT iteration with the fixed step 1/L (Alg 3 without line search)."""
    g = problem.gradient(w, r)
    u = w - g / problem.lipschitz()
    w_new, mask = project(u, k, pattern)
    r_new = problem.residual(w_new)
    return w_new, mask, r_new, problem.objective(w_new, r_new)


def iht(problem: Problem, k: int | None, w0: torch.Tensor | None = None, *, line_search: bool = True,
        max_iter: int = 500, tol: float = 1e-7, pattern=None, refit: int | None = None, sync_free: bool = False,
        exact_changes: bool = False, batch_trials: bool = False, r0: torch.Tensor | None = None,
        return_residual: bool = False):
    """IHT for (P) (Alg 3); step size by line search (Alg 2) or fixed 1/L.

    Starts from ``w0`` thresholded to k (default H_k(w̄), the magnitude-pruning
    point). Stops when the relative objective change falls below ``tol`` or after
    ``max_iter`` iterations. Returns (w, support, trace, iterations) where trace holds
    f at the start and after every iteration (non-increasing for the line search).
    With an N:M ``pattern`` (:class:`chita_minimal.solver.patterns.NM`), k is None or pattern.k.

    ``refit``: after this many consecutive iterations on an unchanged support, jump to the
    exact minimiser on that support (the restricted ridge solve of Alg 5) when it lowers f,
    instead of converging to it step by step — many iterations on an ill-conditioned
    support (small l2, n < k) become one solve; and also right after a swap of at most
    ``_SWAP_REFIT`` coordinates from a support that had settled (an exact refit, or ``_SWAP_SETTLED``
    iterations unchanged): the walk of single swaps that IHT makes near its end, each followed by
    many conjugate-gradient steps on the new support, becomes one solve per swap. None: never.

    ``exact_changes``: the residual of a thresholded trial step from the columns that entered or
    left the support (:func:`_threshold_step`); ``batch_trials``: the support-changing candidates of
    the line search in batches (:func:`_trial_steps`). ``r0``: the residual y − X w0 when the caller has it
    (w0 with at most k nonzeros, which the start's thresholding keeps as it is); ``return_residual``: also
    return the residual of the result, (w, support, trace, iterations, r) — both save a product with X.

    ``sync_free``: the line search decided on the device, with no host read inside the loop
    (:mod:`chita_minimal.solver.iht_sync_free`): the same steps, for GPUs, where a read-back per trial costs
    more than the product it waits for. Line search, dense X, global top-k and no ``refit`` only.
    """
    if sync_free:
        unsupported = [what for what, bad in (("line_search=False", not line_search),
                                              ("an N:M pattern", pattern is not None), ("refit", refit is not None),
                                              (f"a {type(problem).__name__}", not problem.dense_x)) if bad]
        if unsupported:
            raise ValueError(f"sync_free=True does not support {' or '.join(unsupported)}: it needs the line search "
                             "on a dense X with a global top-k and no refit")
        out = iht_sync_free(problem, k, w0, max_iter=max_iter, tol=tol)
        return (*out, problem.residual(out[0])) if return_residual else out
    if pattern is not None:
        k = pattern.check_k(k)
    start = problem.w_bar if w0 is None else w0
    w, support = project(start, k, pattern)
    r = problem.residual(w) if r0 is None else r0
    f = problem.objective(w, r)
    trace = [f]
    step = line_search_step if line_search else fixed_step
    cg = {}
    it = 0
    stable = 0
    exact = False
    for it in range(1, max_iter + 1):
        w, new_support, r, f_new = step(problem, w, r, f, k, tol, cg, pattern, exact_changes=exact_changes,
                                        batch_trials=batch_trials)
        same = torch.equal(new_support, support)
        swapped = bool(refit) and (exact or stable >= _SWAP_SETTLED) and not same \
            and int((new_support != support).sum()) <= _SWAP_REFIT
        stable = stable + 1 if same else 0
        support = new_support
        exact = False
        if refit and (stable == refit or swapped):  # the support has settled: solve on it exactly
            w_r = problem.ridge(support_of(w, k, pattern))
            r_r = problem.residual(w_r)
            f_r = problem.objective(w_r, r_r)
            if f_r < f_new:
                w, r, f_new = w_r, r_r, f_r
                cg.clear()
                exact = True
        trace.append(f_new)
        converged = abs(f - f_new) <= tol * max(abs(f), 1e-30)
        f = f_new
        if converged:
            break
    return (w, support_of(w, k, pattern), trace, it) + ((r,) if return_residual else ())
