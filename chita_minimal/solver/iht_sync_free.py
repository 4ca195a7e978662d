"""IHT with the line search of Alg 2 decided on the device: no scalar is read back to the host inside the loop.

On a GPU a read of one number (``float(t)``, ``if t:``) waits for every queued kernel; the line search of
:func:`chita_minimal.solver.iht.line_search_step` makes several per iteration (step sizes, trial objectives,
"did f decrease"), and at p ≈ 32k each costs more than the X·d it waits for. Here one iteration is a fixed
sequence of tensor operations:

- Xᵀr and X·d as before;
- every candidate of Alg 2 at once: the step along d (or its conjugate) that keeps the support, the thresholded
  steps τ_c·2^j (j = 0…5) and the safe step 1/L, their supports by a batched top-k with the same tie rule as
  :func:`chita_minimal.solver.threshold.hard_threshold`, and their residuals from **one** product of X with all of
  them (one more read of X);
- the choice among them by masks (``torch.where``), reproducing the branches of the sequential line search:
  the support-keeping step when it decreases f by more than tol·|f|, else the doubling sequence up to its first
  non-improvement, else 1/L, else no move.

The stopping rule (relative decrease ≤ tol) is checked on the host every ``check_every`` iterations; the
iterations in between after convergence leave the state unchanged, so the iterates, the support and the
iteration count are those of the sequential line search (up to rounding: trial residuals come from a dense
product instead of a sparse update). Costs one extra read of X per iteration and (p × 7) of memory for the
candidates, so it pays where host reads are dear (GPUs) — on a CPU the sequential version is faster.
Problems with a dense X only (:class:`chita_minimal.solver.problem.Problem`), global top-k (no N:M pattern).
"""

from __future__ import annotations

import torch

from chita_minimal.solver.problem import Problem
from chita_minimal.solver.threshold import project, support_of

_DOUBLINGS = 6  # τ_c·2^j for j = 0…5: the start and ≤ 5 doublings, as in the sequential line search


def batched_hard_threshold(U: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |U[i, j]| in every row i; ties at the k-th magnitude go to the lower index
    (the rule of :func:`chita_minimal.solver.threshold.hard_threshold`, row by row, without a host read)."""
    p = U.shape[1]
    if k >= p:
        return torch.ones_like(U, dtype=torch.bool)
    a = U.abs()
    kth = torch.topk(a, k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    above = a > kth
    need = k - above.sum(dim=1, keepdim=True)
    ties = a == kth
    return above | (ties & (torch.cumsum(ties, dim=1) <= need))


def _objectives(problem: Problem, W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """f of every row of W given its residual (row of R), as a tensor."""
    f = 0.5 * R.square().sum(-1) + problem.lam * (W - problem.w_bar).square().sum(-1)
    if problem.alpha is not None:
        f = f + W @ problem.alpha
    return f + problem.offset


def line_search_step_sync_free(problem: Problem, w, r, f, k: int, tol: float, cg: dict, inv_L: float):
    """One iteration of :func:`chita_minimal.solver.iht.line_search_step` without host reads.

    ``f`` is a 0-dim tensor; ``cg`` holds the conjugate-direction state as tensors (``valid``, ``d``, ``Xd``,
    ``dd``) and is updated; ``inv_L`` = 1/L (the safe step). Returns (w, support, r, f) with f a 0-dim tensor.
    """
    dtype = w.dtype
    zero = torch.zeros((), dtype=dtype, device=w.device)
    inf = torch.full((), float("inf"), dtype=dtype, device=w.device)
    lam2 = 2.0 * problem.lam
    support = w != 0
    full_support = support.sum() >= k
    g = problem.gradient(w, r)
    d = torch.where(support, -g, zero)
    dd = torch.dot(d, d)
    Xd = problem.matvec(d)
    tau_star = torch.where(dd > 0, dd / (torch.dot(Xd, Xd) + lam2 * dd), zero)
    # τ_c: the largest step whose thresholding keeps the support (Alg 2)
    M = torch.where(support, zero, g.abs()).max()
    denom = torch.sign(w) * g + M
    ok = support & (denom > 0)
    tau_c_all = torch.where(ok, w.abs() / torch.where(ok, denom, torch.ones_like(denom)), inf).min()
    tau_c = torch.where(full_support, tau_c_all, zero)

    # the support stays: exact step along d, or along the conjugate direction when the last step kept it too
    keep = full_support & (tau_star > 0) & (tau_star <= tau_c)
    beta = torch.where(cg["valid"], dd / torch.where(cg["valid"], cg["dd"], torch.ones_like(dd)), zero)
    step_cg, Xstep_cg = d + beta * cg["d"], Xd + beta * cg["Xd"]
    slope = -torch.dot(g, step_cg)
    curv = torch.dot(Xstep_cg, Xstep_cg) + lam2 * torch.dot(step_cg, step_cg)
    use_cg = cg["valid"] & (slope > 0) & (curv > 0)
    step = torch.where(use_cg, step_cg, d)
    Xstep = torch.where(use_cg, Xstep_cg, Xd)
    tau = torch.where(use_cg, slope / torch.where(curv > 0, curv, torch.ones_like(curv)), tau_star)
    w_keep, r_keep = w + tau * step, r - tau * Xstep
    f_keep = _objectives(problem, w_keep, r_keep)
    keep_done = keep & (f - f_keep > tol * f.abs())
    start_best = torch.where(keep, f_keep, f)

    # support changes: τ_c·2^j (τ* when w has fewer than k nonzeros), then the safe step 1/L — all at once
    tau0 = torch.where(tau_c > 0, tau_c * (1.0 + 64 * torch.finfo(dtype).eps), tau_star)
    taus = torch.cat([tau0 * 2.0 ** torch.arange(_DOUBLINGS, dtype=dtype, device=w.device),
                      torch.full((1,), inv_L, dtype=dtype, device=w.device)])
    U = w.unsqueeze(0) - taus.unsqueeze(1) * g.unsqueeze(0)
    masks = batched_hard_threshold(U, k)
    W = torch.where(masks, U, zero)
    R = problem.y.unsqueeze(0) - problem.matvecs(W)
    F = _objectives(problem, W, R)
    trial_ok = (tau0 > 0) & torch.isfinite(tau0)
    F_seq = torch.where(trial_ok, F[:_DOUBLINGS], inf)
    # the doubling sequence stops at its first non-improvement after an improvement: the chosen trial is the
    # lowest f before that point (improvements there are strictly decreasing)
    before = torch.cat([start_best.view(1), torch.cummin(F_seq, 0).values[:-1]]).minimum(start_best)
    improves = F_seq < before
    started = torch.cumsum(improves.to(torch.int32), 0) > 0
    stop = (~improves) & torch.cat([started.new_zeros(1), started[:-1]])
    alive = torch.cumsum(stop.to(torch.int32), 0) == 0
    F_alive = torch.where(alive, F_seq, inf)
    j = torch.argmin(F_alive)
    trial_wins = F_alive[j] < start_best
    best_f = torch.where(trial_wins, F_alive[j], start_best)
    safe = (best_f >= f) & (F[-1] < f)  # nothing lowered f: the safe step, if it does

    # select, by masks, in the order of the sequential branches: the best so far (the support-keeping step when it
    # was computed, else w; a winning trial), replaced by the safe step when the best does not lower f
    w_out = torch.where(safe, W[-1], torch.where(trial_wins, W[j], torch.where(keep, w_keep, w)))
    r_out = torch.where(safe, R[-1], torch.where(trial_wins, R[j], torch.where(keep, r_keep, r)))
    f_out = torch.where(safe, F[-1], best_f)
    s_out = torch.where(safe, masks[-1], torch.where(trial_wins, masks[j], support))
    w_out = torch.where(keep_done, w_keep, w_out)
    r_out = torch.where(keep_done, r_keep, r_out)
    f_out = torch.where(keep_done, f_keep, f_out)
    s_out = torch.where(keep_done, support, s_out)
    cg.update(valid=keep_done, d=torch.where(keep_done, step, cg["d"]), Xd=torch.where(keep_done, Xstep, cg["Xd"]),
              dd=torch.where(keep_done, dd, cg["dd"]))
    return w_out, s_out, r_out, f_out


def iht_sync_free(problem: Problem, k: int, w0: torch.Tensor | None = None, *, max_iter: int = 500,
                  tol: float = 1e-7, check_every: int = 16):
    """:func:`chita_minimal.solver.iht.iht` with the line search (Alg 2/3) and no host read inside the loop
    (see the module docstring). Returns (w, support, trace, iterations) like ``iht``."""
    if not problem.dense_x:
        raise TypeError(f"the sync-free line search needs a Problem with a dense X, got {type(problem).__name__}")
    start = problem.w_bar if w0 is None else w0
    w, _ = project(start, k)  # H_k of the start, as in iht
    r = problem.residual(w)
    f = _objectives(problem, w, r)
    inv_L = 1.0 / problem.lipschitz()  # one host read, before the loop
    cg = dict(valid=torch.zeros((), dtype=torch.bool, device=w.device), d=torch.zeros_like(w),
              Xd=torch.zeros_like(r), dd=torch.zeros((), dtype=w.dtype, device=w.device))
    done = torch.zeros((), dtype=torch.bool, device=w.device)
    iterations = torch.zeros((), dtype=torch.long, device=w.device)
    trace = [f]
    for it in range(1, max_iter + 1):
        w_n, _, r_n, f_n = line_search_step_sync_free(problem, w, r, f, k, tol, cg, inv_L)
        w_n, r_n, f_n = torch.where(done, w, w_n), torch.where(done, r, r_n), torch.where(done, f, f_n)
        iterations = iterations + (~done).to(torch.long)
        converged = (f - f_n).abs() <= tol * torch.clamp(f.abs(), min=1e-30)
        w, r, f = w_n, r_n, f_n
        done = done | converged
        trace.append(f)
        if it % check_every == 0 and bool(done):
            break
    n_it = int(iterations)
    values = torch.stack(trace[:n_it + 1]).tolist()
    return w, support_of(w, k), values, n_it
