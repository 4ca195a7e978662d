"""Active-set CHITA (the paper's Alg 4): run IHT on a small set of columns, then
let a full-space IHT step bring in the coordinates that set missed.

Most of the time is spent on X_A (n × ~1.5k) instead of X (n × p), which is what
makes CHITA fast at high sparsity.
"""

from __future__ import annotations

import math

import torch

from chita_minimal.solver.backsolve import first_step
from chita_minimal.solver.iht import hard_threshold, iht, line_search_step, project, support_of
from chita_minimal.solver.problem import Problem


def active_set(problem: Problem, k: int | None, *, expand: float = 1.5, max_rounds: int = 10, max_iter: int = 500,
               tol: float = 1e-7, max_halvings: int = 10, swap_candidates: int = 50, polish: bool = True,
               pattern=None, refit: int | None = None):
    """Alg 4. Returns (w, support, trace, iterations).

    1. A = support of one IHT step from w̄, kept at ⌈expand·k⌉ coordinates.
    2. Solve (P) restricted to A by line-search IHT (Alg 2/3).
    3. Full-space step w' = H_k(w − τ∇f(w)) with τ = 2/L_A, halved until f decreases
       (≤ ``max_halvings``), or the line-search step of Alg 2 on all p coordinates,
       whichever is lower; if f decreases, A ← A ∪ supp(w') and go to 2 (≤ ``max_rounds``).
    4. If that step fails, local search: the best single swap (one kept weight out,
       one pruned weight in, the new weight set optimally, among the
       ``swap_candidates`` smallest kept and largest-gradient pruned coordinates);
       if it lowers f, go to 2 with the new coordinate in A. ``swap_candidates=0``
       turns it off. This is the swap move of local combinatorial search for best
       subset selection (Hazimeh & Mazumder 2020), which lets IHT escape fixed points.
    5. ``polish``: re-fit the weights on the final support by the exact ridge solve of
       Alg 5 when that lowers f (it never raises it: it is the minimiser on the support).

    The trace holds f (of the full problem) after every iteration, non-increasing.

    ``refit`` (the speed option of :func:`chita_minimal.solver.iht.iht`): in step 2, once the support
    has not changed for ``refit`` iterations, jump to the exact solve on it. Off by default: it
    gives the same result when IHT would only have converged on a fixed support (at low sparsity,
    3–7× faster on MLPNet), but at high sparsity it changes the path IHT takes (objective within a
    fraction of a percent, either way; see ``bench/speed.py``).

    With an N:M ``pattern`` (k = pattern.k or None) every group must keep N coordinates, so A
    cannot be a union of whole groups (that would be all of them): A holds ⌈expand·N⌉ (≤ M)
    coordinates of every group at the start and grows by coordinates; the restricted problem on A
    gets ``pattern.restrict(A)``, groups renumbered, some shorter than M. Thresholding, τ_c and
    the support fill-up are those of the pattern, and the swap of step 4 stays within one group
    (j among the ``swap_candidates`` largest pruned gradients, i among the kept weights of j's
    group); when no swap pays with the other weights fixed, the best one is refit by one exact
    ridge solve on its support and taken if f decreases. Every iterate is feasible and f still
    never increases.
    """
    p = problem.p
    u = first_step(problem)
    if pattern is None:
        active = hard_threshold(u, min(p, math.ceil(expand * k)))
    else:
        k = pattern.check_k(k)
        active = pattern.keep_top(u, min(pattern.m, math.ceil(expand * pattern.n)))
    w, _ = project(problem.w_bar * active, k, pattern)  # only w[A] is used below
    trace, iterations = [], 0
    for _ in range(max_rounds):
        idx = torch.nonzero(active).squeeze(1)
        sub = problem.restrict(idx)
        sub_pattern = None if pattern is None else pattern.restrict(idx)
        w_sub, _, sub_trace, it = iht(sub, k, w[idx], line_search=True, max_iter=max_iter, tol=tol,
                                      pattern=sub_pattern, refit=refit)
        iterations += it
        trace.extend(sub_trace if not trace else sub_trace[1:])
        w = torch.zeros_like(w)
        w[idx] = w_sub
        f = trace[-1]
        if len(idx) == p:
            break  # the active set is everything: nothing left to bring in
        # try to enlarge the active set with a full-space IHT step: τ = 2/L_A, halved until f
        # decreases, and the line-search step of Alg 2 on the full problem; the better one wins
        r = problem.residual(w)
        g = problem.gradient(w, r)
        tau = 2.0 / sub.lipschitz()
        accepted = None
        for _ in range(max_halvings + 1):
            u = w - tau * g
            w_new, mask = project(u, k, pattern)
            f_new = problem.objective(w_new)
            if f_new < f - tol * abs(f):
                accepted = (w_new, mask, f_new)
                break
            tau /= 2.0
        w_ls, mask_ls, _, f_ls = line_search_step(problem, w, r, f, k, tol, pattern=pattern)
        if f_ls < f - tol * abs(f) and (accepted is None or f_ls < accepted[2]):
            accepted = (w_ls, w_ls != 0, f_ls)
        if accepted is None and swap_candidates > 0:
            accepted = _best_swap(problem, w, r, g, f, swap_candidates, tol, pattern)
        if accepted is None:
            break
        w, mask, f_new = accepted
        trace.append(f_new)
        iterations += 1
        if not bool((mask & ~active).any()):
            continue  # improvement inside A: IHT resumes from the new point
        active |= mask
    support = support_of(w, k, pattern)
    if polish:
        w_ridge = problem.ridge(support)
        f_ridge = problem.objective(w_ridge)
        if f_ridge < trace[-1]:
            w = w_ridge
            trace.append(f_ridge)
    return w, support, trace, iterations


def _best_swap(problem: Problem, w, r, g, f, m: int, tol: float, pattern=None):
    """Best swap i ∈ S → j ∉ S with the other weights fixed, in closed form.

    Removing i changes f by  c_i = rᵀX_i w_i + ½‖X_i‖²w_i² + λ(w̄_i² − (w_i − w̄_i)²) − α_i w_i;
    then the best value t of w_j lowers f by ½ b²/a with a = ‖X_j‖² + 2λ and
    b = X_jᵀ(r + X_i w_i) + 2λ w̄_j − α_j (t = b/a). With an N:M ``pattern`` only swaps
    within one group are allowed (i is a kept weight of j's group), and when none lowers f with
    the other weights fixed, the best one is refit exactly (the ridge solve of Alg 5 on the swapped
    support, one solve) and taken if that lowers f. Returns (w, support, f) or None.
    """
    S = torch.nonzero(w).squeeze(1)
    out = torch.nonzero(w == 0).squeeze(1)
    if S.numel() == 0 or out.numel() == 0:
        return None
    J = out[torch.topk(g[out].abs(), min(m, out.numel())).indices]  # largest pruned gradients
    if pattern is None:
        I = S[torch.topk(w[S].abs(), min(m, S.numel()), largest=False).indices]  # smallest kept
    else:  # the kept weights of the groups of J
        members = pattern.groups[pattern.group_of[J]].flatten()
        members = members[members >= 0]
        I = torch.unique(members[w[members] != 0])
        if I.numel() == 0:
            return None
    lam, w_bar = problem.lam, problem.w_bar
    CI, CJ = problem.columns(I), problem.columns(J)  # (m, n): the columns X_i, X_j as rows
    bI, bJ = problem.column_blocks(I), problem.column_blocks(J)  # residual block each column acts on
    R = problem.residual_blocks(r)  # (blocks, n)
    wI = w[I]
    alpha_I = 0.0 if problem.alpha is None else problem.alpha[I]
    alpha_J = 0.0 if problem.alpha is None else problem.alpha[J]
    c = (CI * R[bI]).sum(1) * wI + 0.5 * (CI * CI).sum(1) * wI**2 + lam * (w_bar[I] ** 2 - (wI - w_bar[I]) ** 2) \
        - alpha_I * wI
    a = (CJ * CJ).sum(1) + 2 * lam  # (mJ,)
    cross = (CJ @ CI.T) * (bJ.unsqueeze(1) == bI.unsqueeze(0))  # X_jᵀX_i, zero across blocks
    b = ((CJ * R[bJ]).sum(1) + 2 * lam * w_bar[J] - alpha_J).unsqueeze(1) + cross * wI  # (mJ, mI)
    gain = c.unsqueeze(0) - 0.5 * b**2 / a.unsqueeze(1)  # change of f for each (j, i)
    if pattern is not None:  # a swap across groups would break the pattern
        same = pattern.group_of[J].unsqueeze(1) == pattern.group_of[I].unsqueeze(0)
        gain = torch.where(same, gain, torch.full_like(gain, float("inf")))
    best = int(torch.argmin(gain))
    change = float(gain.flatten()[best])
    if change >= -tol * abs(f) and (pattern is None or change == math.inf):
        return None
    j, i = divmod(best, I.numel())
    w_new = w.clone()
    w_new[I[i]] = 0.0
    w_new[J[j]] = b[j, i] / a[j]
    if change < -tol * abs(f):
        return w_new, w_new != 0, problem.objective(w_new)
    # N:M: with the other weights fixed no swap pays; refit the best one exactly on its support (Alg 5)
    w_new = problem.ridge(pattern.support_of(w_new))
    f_new = problem.objective(w_new)
    return (w_new, w_new != 0, f_new) if f_new < f - tol * abs(f) else None
