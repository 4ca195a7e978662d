"""Active-set CHITA (the paper's Alg 4): run IHT on a small set of columns, then
let a full-space step bring in the coordinates that set missed.

Most of the time is spent on X_A (n × ~1.5k) instead of X (n × p), which is what
makes CHITA fast at high sparsity. The speed devices that make each round cheap are named where they act
(``# device:`` comments); none changes what a round may accept — every accepted point lowers f.
"""

from __future__ import annotations

import math

import torch

from chita_minimal.solver.backsolve import first_step
from chita_minimal.solver.iht import _DENSE_UPDATE_FRACTION, iht, line_search_step
from chita_minimal.solver.local_search import exact_swaps, move_cost
from chita_minimal.solver.threshold import hard_threshold, project, support_of
from chita_minimal.solver.problem import Problem


def active_set(problem: Problem, k: int | None, *, expand: float = 1.5, max_rounds: int = 10, max_iter: int = 500,
               tol: float = 1e-7, max_halvings: int = 10, swap_candidates: int = 50, polish: bool = True,
               pattern=None, refit: int | None = 15, sync_free: bool = False, exact_search: bool = True):
    """Alg 4. Returns (w, support, trace, iterations).

    1. A = support of one IHT step from w̄, kept at ⌈expand·k⌉ coordinates.
    2. Solve (P) restricted to A by line-search IHT (Alg 2/3).
    3. If that point can be improved from outside A, take the move and go to 2, with A ← A ∪ supp(w') when
       the move left A (≤ ``max_rounds`` rounds). The moves, cheapest first:
       a. local search — the best swap (one kept weight out, one pruned weight in, set optimally, among the
          ``swap_candidates`` smallest kept and largest-gradient pruned coordinates; the swap move of local
          combinatorial search for best subset selection, Hazimeh & Mazumder 2020, which lets IHT escape its
          fixed points), or up to ``_SWAPS`` disjoint swaps at once when together they lower f below the best
          one; ``swap_candidates=0`` turns it off;
       b. the line-search step of Alg 2 on all p coordinates;
       c. the full-space step w' = H_k(w − τ∇f(w)), τ = 2/L_A, halved until f decreases (≤ ``max_halvings``).
       None lowers f, or a round lowers it by less than ``_ROUND_TOL``·f (10⁻⁵, or 3·10⁻⁴ where a bare pass
       costs more than 10⁷ multiply-adds): stop.
    4. ``polish``: the exact ridge solve of Alg 5 on the final support, when it lowers f (it never raises it:
       it is the minimiser on the support).
    5. ``exact_search``: on a small support, the exact swap local search of
       :mod:`chita_minimal.solver.local_search` — exchanges of one or two coordinates, each scored by its exact
       refit, then four restarts from perturbed supports; taken when it lowers f. It runs only where one of its
       moves costs at most ``_EXACT_PASSES`` bare passes (or ``_EXACT_FLOPS`` multiply-adds), so not on MLPNet's
       or ResNet20's problems; on small problems with n < p it is what reaches the brute-force optimum (14
       families of 20 instances, p = 14–16: 2–13 hits of 20 without it, 16–20 with it; the runtime chapter).

    The trace holds f (of the full problem) after every iteration, non-increasing.

    Speed devices (each marked ``# device:`` below). They change the path by rounding, by L_A, by the refits and
    by the order of the moves, so the result differs from a plain run of steps 1–4; on MLPNet (n = 1000,
    sparsity 0.5…0.98, l2 1e-3 and 0.1) the objective is at most 1.0007 times the plain path's (lower at 5
    points of 12, equal at 3), in 12–49 bare passes where the plain path took 66–251 (``bench/speed.py``; the
    runtime chapter).

    - *Exact refits.* After a move of step 3 inside A, w jumps to the exact solve on its new support, and step 2
      is skipped (its first trials would be the support changes step 3 tries); after a swap that brought in a
      few columns from outside A, the same on the grown A. In step 2, ``refit``: once the support has not changed
      for ``refit`` iterations, or right after a swap of a few coordinates from a settled support, the exact
      solve on it (:func:`chita_minimal.solver.iht.iht`; None: never) — long runs of small steps on an
      ill-conditioned support become one solve. The refits keep the n×n system of the Woodbury solve factorised
      and correct it for the columns that entered and left (:class:`chita_minimal.solver.gram.SupportGram`,
      carried over when A grows); the polish reuses the last refit.
    - *L_A without a power iteration*: L_A only sets the safe fallback steps (1/L of the line search, τ = 2/L_A
      of step 3c), which stay safe with an upper bound: for a dense X, ‖X_A‖_F² + 2λ, from one read of X_A and
      then grown by the squared norms of the columns added to A. For other operators (the block-diagonal
      problem) a power iteration warm-started from the previous round's top singular vector (in the first round
      from X_Aᵀ1, the summed per-sample gradients), to a relative change of ``_POWER_RTOL``.
    - *Products near A*: X_A is kept while A does not grow, and when A grows the new columns are appended to it
      (:func:`_grown`) instead of gathering X_A again; every X·v of step 3 is X_A v_A plus the few columns
      outside A (:class:`_NearA`), and the gradient needs one Xᵀr on all p columns per round.
    - *Carried residuals*: the residual of a refit, a line-search step or a halving goes on into the next
      round's IHT; a swap accepted by its closed-form gain goes straight to its refit. In the line searches the
      residual of a thresholded candidate comes from the columns that entered or left the support
      (``exact_changes``), and the candidates that swap many coordinates from one product with all of them
      (``batch_trials``, :func:`chita_minimal.solver.iht._trial_steps`).
    - *The halvings of 3c* start one above the step that worked the last time.

    ``sync_free``: step 2's IHT with the line search decided on the device (no host read per iteration;
    :mod:`chita_minimal.solver.iht_sync_free`, without ``refit``), for GPUs; the few reads per round of steps 3–5
    remain. Not with a pattern.

    With an N:M ``pattern`` (k = pattern.k or None) every group must keep N coordinates, so A
    cannot be a union of whole groups (that would be all of them): A holds ⌈expand·N⌉ (≤ M)
    coordinates of every group at the start and grows by coordinates; the restricted problem on A
    gets ``pattern.restrict(A)``, groups renumbered, some shorter than M. Thresholding, τ_c and
    the support fill-up are those of the pattern, and the swap of step 3a stays within one group
    (j among the ``swap_candidates`` largest pruned gradients, i among the kept weights of j's
    group); when no swap pays with the other weights fixed, the best one is refit by one exact
    ridge solve on its support and taken if f decreases. Every iterate is feasible and f still
    never increases. (The exact refits after a move are for global top-k.)
    """
    if sync_free and pattern is not None:
        raise ValueError("sync_free=True cannot be combined with an N:M pattern")
    p = problem.p
    u = first_step(problem)
    if pattern is None:
        active = hard_threshold(u, min(p, math.ceil(expand * k)))
    else:
        k = pattern.check_k(k)
        active = pattern.keep_top(u, min(pattern.m, math.ceil(expand * pattern.n)))
    w, _ = project(problem.w_bar * active, k, pattern)  # only w[A] is used below
    batch = problem.dense_x  # device: the line search's trials in batches (Problem.matvecs)
    dense = problem.dense_x and 2 * problem.n * p > _CHEAP_PASS  # a dense X where a pass costs something
    round_tol = _ROUND_TOL[dense]
    trace, iterations = [], 0
    sub, idx, halving = None, None, 0
    swapped_in = False  # the last move was a swap that brought in columns from outside A
    previous = None  # (A, top singular vector of X_A) of the last restriction: the next L_A's warm start
    exact = False  # w is the exact solve on its support, after a move inside A
    carried = (None, None, None)  # (A, its factorised refit system, its restricted problem) when A grows
    r = None  # the residual of w when a step below has it (saves a product with X_A)
    for _ in range(max_rounds):
        if sub is None:  # A is new (the first round, or it grew): restrict to it and estimate L_A
            if carried[0] is None or pattern is not None or not dense:
                idx = torch.nonzero(active).squeeze(1)
                sub = problem.restrict(idx)
            else:  # device: the grown X_A is the last one with the new columns appended (no second gather)
                idx, sub = _grown(problem, carried[2], carried[0], active)
            sub.gram_updates = True  # device: refits a few columns apart update one factorisation
            refitted = None  # (support on A, w, r, f) of the last refit on this X_A
            if carried[1] is not None:  # A grew by a few columns: its refits go on from the same factor
                sub._support_gram = carried[1].moved(sub.X, _positions(idx, carried[0], p))
            if dense:  # device: L_A ≤ ‖X_A‖_F² + 2λ, one read of X_A, then column by column
                if sub._lipschitz is None:  # (L_A only sets the safe fallback steps, which stay safe)
                    sub._lipschitz = sub.frobenius_bound()
            elif len(idx) < p:  # device: L_A warm-started from the last round's top singular vector
                sub.lipschitz(start=_warm_start(previous, idx, sub, p), rtol=_POWER_RTOL)
                previous = (idx, sub.power_vector)
            sub_pattern = None if pattern is None else pattern.restrict(idx)
            if swapped_in:  # device: A grew by a swap's columns: the exact solve on the swapped support, not IHT
                refitted = _refit(sub, w[idx] != 0)
                _, w_ridge, r_ridge, f_ridge = refitted
                if f_ridge < trace[-1]:
                    w, r, exact = _embed(w_ridge, idx, p), r_ridge, True
                    trace.append(f_ridge)
                swapped_in = False
        # step 2 (skipped when w is the exact solve on its support, after a move inside A: IHT's first trials
        # would be support changes inside A, which step 3 tries too)
        if not exact:
            out = iht(sub, k, w[idx], line_search=True, max_iter=max_iter, tol=tol, pattern=sub_pattern,
                      refit=None if sync_free else refit, sync_free=sync_free, exact_changes=True,
                      batch_trials=batch, r0=r, return_residual=True)
            w_sub, sub_trace, it, r = out[0], out[2], out[3], out[4]
            iterations += it
            trace.extend(sub_trace if not trace else sub_trace[1:])
            w = _embed(w_sub, idx, p)
        exact = False
        f = trace[-1]
        if len(idx) == p:
            break  # the active set is everything: nothing left to bring in
        # step 3. w vanishes outside A, so sub's residual is the full problem's; device: every X·v below goes
        # through X_A plus the few columns outside A, and the gradient is one Xᵀr on all p columns
        full = _NearA(problem, sub, idx, active)
        g = problem.gradient(w, r)
        accepted = None
        if swap_candidates > 0:  # 3a
            accepted = _best_swap(full, w, r, g, f, swap_candidates, tol, pattern, evaluate=False,
                                  moves=_SWAPS if batch else 1)
        if accepted is None:  # 3b
            accepted = _line_search_move(full, w, r, f, k, tol, pattern, g, batch_trials=batch)
        if accepted is None:  # 3c, from one halving above the step that worked the last time
            accepted = _halving_step(full, w, g, f, k, 2.0 / sub.lipschitz(), max_halvings, tol, pattern, halving)
            if accepted is not None:
                halving, accepted = max(0, accepted[4] - 1), accepted[:4]
        if accepted is None:
            break
        moved = int(((w != 0) ^ accepted[1]).sum())  # coordinates the move changed
        w, mask, f_new, r = accepted  # r: the residual of w (None for a swap taken by its closed-form gain)
        inside = not bool((mask & ~active).any())
        if inside and pattern is None:  # device: a move inside A ends at the exact solve on its support
            if refitted is None or not torch.equal(refitted[0], mask[idx]):  # (else: the same support as last time)
                refitted = _refit(sub, mask[idx])  # (a few columns away from the last refit: cheap, SupportGram)
            _, w_ridge, r_ridge, f_ridge = refitted
            # f_new None: a swap accepted by its closed-form gain, whose refit is the minimiser on the same support
            if f_new is None or f_ridge < f_new:
                w, f_new, r, exact = _embed(w_ridge, idx, p), f_ridge, r_ridge, True
        if f_new is None:
            r = full.residual(w)
            f_new = full.objective(w, r)
        trace.append(f_new)
        iterations += 1
        if f - f_new <= round_tol * abs(f):
            break  # a round that gains next to nothing ends the search (each costs a few passes)
        if inside:
            continue  # improvement inside A: IHT resumes from the new point, on the same X_A
        active |= mask
        swapped_in = pattern is None and moved <= 2 * _SWAPS
        carried = (idx, getattr(sub, "_support_gram", None), sub)
        sub = None
    support = support_of(w, k, pattern)
    if polish:  # step 4, on X_A when the support lies in A (the same columns, no second gather)
        inside = type(problem).ridge is Problem.ridge and sub is not None and not bool((support & ~active).any())
        w_ridge = _embed(sub.ridge(support[idx]), idx, p) if inside else problem.ridge(support)
        f_ridge = problem.objective(w_ridge)
        if f_ridge < trace[-1]:
            w = w_ridge
            trace.append(f_ridge)
    if exact_search and pattern is None and problem.dense_x and swap_candidates > 0 \
            and move_cost(problem, k, _EXACT_CANDIDATES) <= max(_EXACT_PASSES * 2 * problem.n * p, _EXACT_FLOPS):
        w_ls, f_ls = exact_swaps(problem, w, k, candidates=_EXACT_CANDIDATES)  # step 5
        if f_ls < trace[-1]:
            w, support = w_ls, w_ls != 0
            trace.append(f_ls)
    return w, support, trace, iterations


# step 5: the exact swap search (:mod:`.local_search`) when one of its moves costs at most this many bare passes,
# or this many multiply-adds (small problems, where a pass is nothing), with this many candidates
_EXACT_PASSES, _EXACT_FLOPS, _EXACT_CANDIDATES = 2.0, 1e7, 8
# step 3a makes up to this many disjoint swaps at once when together they beat the best one
_SWAPS = 8
# the search ends after a round that lowered f by less than this fraction of f — the second value for a dense X whose
# bare pass costs more than _CHEAP_PASS multiply-adds: on MLPNet (n = 1000, l2 = 0.1, sparsity 0.7–0.95) the rounds
# after such a round gained 1–4·10⁻⁴ of f each, at about three bare passes each (bench/speed.py). On smaller
# problems a round costs next to nothing, and there the later rounds, the accurate L_A and the sorted X_A are what
# reach the brute-force optimum (with the cheap devices, 6 of 360 test instances ended up to 4 % higher)
_ROUND_TOL, _CHEAP_PASS = (1e-5, 3e-4), 1e7
# The power iteration for L_A stops when its estimate changes by less than this fraction; warm-started from
# the previous round's top singular vector it needs a few products with X_A instead of 30.
_POWER_RTOL = 1e-3


def _embed(v: torch.Tensor, idx: torch.Tensor, p: int) -> torch.Tensor:
    out = torch.zeros(p, dtype=v.dtype, device=v.device)
    out[idx] = v
    return out


def _refit(sub: Problem, mask: torch.Tensor):
    """The exact solve on the support ``mask`` of the restricted problem: (mask, w, r, f)."""
    w = sub.ridge(mask)
    r = sub.residual(w)
    return mask, w, r, sub.objective(w, r)


def _line_search_move(problem, w, r, f, k, tol, pattern, g, *, batch_trials: bool):
    """The line-search step of Alg 2 on the full problem, (w', mask, f', r') when it lowers f, else None."""
    w_ls, _, r_ls, f_ls = line_search_step(problem, w, r, f, k, tol, pattern=pattern, g=g, exact_changes=True,
                                           batch_trials=batch_trials)
    return (w_ls, w_ls != 0, f_ls, r_ls) if f_ls < f - tol * abs(f) else None


def _halving_step(problem, w, g, f, k, tau, max_halvings, tol, pattern, start: int = 0):
    """The first of w' = H_k(w − τg), τ = τ₀/2^j for j = start … max_halvings, that lowers f (by more than
    tol·|f|). Returns (w', mask, f', r', j) or None (r': the residual of w')."""
    for j in range(start, max_halvings + 1):
        w_new, mask = project(w - (tau * 0.5**j) * g, k, pattern)
        r_new = problem.residual(w_new)
        f_new = problem.objective(w_new, r_new)
        if f_new < f - tol * abs(f):
            return w_new, mask, f_new, r_new, j
    return None


def _warm_start(previous, idx: torch.Tensor, sub: Problem, p: int) -> torch.Tensor | None:
    """The previous round's top singular vector of X_A, placed on the (larger) active set ``idx``; in the first
    round X_Aᵀ1, the sum of the per-sample gradients: they share a direction, near which X_A's top singular
    vector lies (on MLPNet at 0.5 / 0.9: 6 / 5 products to rtol instead of 11 / 20 from a random start)."""
    if previous is None:
        start = sub.rmatvec(torch.ones_like(sub.y))
        return start if bool(start.any()) else None
    old_idx, v = previous
    start = torch.zeros(idx.numel(), dtype=v.dtype, device=v.device)
    start[_positions(idx, old_idx, p)] = v
    return start


def _positions(idx: torch.Tensor, old: torch.Tensor, p: int) -> torch.Tensor:
    """Where each coordinate of ``old`` sits in ``idx`` (A only grows: every old coordinate is in idx; neither
    needs to be sorted)."""
    pos = torch.full((p,), -1, dtype=torch.long, device=idx.device)
    pos[idx] = torch.arange(idx.numel(), device=idx.device)
    return pos[old]


def _grown(problem: Problem, sub: Problem, idx: torch.Tensor, active: torch.Tensor):
    """(idx', the problem restricted to idx') for the grown active set: idx' is ``idx`` followed by the new
    coordinates of ``active``, and X_A' is sub's X_A with their columns appended — one copy of X_A and a gather of
    a few columns, where :meth:`Problem.restrict` gathers |A| columns from all of X (on MLPNet at 0.9, 0.3 instead
    of 1.5 bare passes). The same problem as ``problem.restrict(idx')``."""
    outside = active.clone()
    outside[idx] = False
    new = torch.nonzero(outside).squeeze(1)
    grown = torch.cat([idx, new])
    X_new = problem.X.index_select(1, new)
    out = problem.restrict(grown, torch.cat([sub.X, X_new], dim=1))
    if sub._lipschitz is not None:  # the Frobenius bound of L_A grows by the new columns' squared norms
        out._lipschitz = sub._lipschitz + float(torch.linalg.vector_norm(X_new)) ** 2
    return grown, out


class _NearA:
    """The full problem, with X·v computed as X_A v_A + X_{out} v_{out} for a v that is mostly inside the
    active set A (a step from a point supported on A): |A|/p of a pass plus a gather of the few columns
    outside A, instead of a pass over all p columns. Everything else is the full problem's."""

    def __init__(self, problem: Problem, sub: Problem, idx: torch.Tensor, active: torch.Tensor):
        self._problem, self._sub, self._idx, self._outside = problem, sub, idx, ~active

    def __getattr__(self, name):
        return getattr(self._problem, name)

    def matvec(self, v):
        out = torch.nonzero((v != 0) & self._outside).squeeze(1)
        if out.numel() > _DENSE_UPDATE_FRACTION * v.numel():
            return self._problem.matvec(v)
        Xv = self._sub.matvec(v[self._idx])
        return Xv + self._problem.matvec_cols(out, v[out]) if out.numel() else Xv

    def residual(self, w):
        return self._problem.y - self.matvec(w)

    def matvecs(self, W):
        """X wᵢ for every row of an (m, p) W whose nonzeros are mostly inside A, the same way as :meth:`matvec`."""
        out = torch.nonzero((W != 0).any(0) & self._outside).squeeze(1)
        if out.numel() > _DENSE_UPDATE_FRACTION * W.shape[1]:
            return self._problem.matvecs(W)
        XW = self._sub.matvecs(W[:, self._idx])
        return XW + self._problem.matvec_cols(out, W[:, out].T).T if out.numel() else XW

    def lipschitz(self):
        """L of the full problem (the safe step 1/L of the line search's last resort): for a dense X, the upper
        bound ‖X‖_F² + 2λ (one read of X; 1/L stays a safe step), else the power iteration started from X_A's
        top singular vector."""
        problem = self._problem
        if problem._lipschitz is None:
            if problem.dense_x:
                problem._lipschitz = problem.frobenius_bound()
            else:
                problem.lipschitz(start=_embed(self._sub.power_vector, self._idx, problem.p), rtol=_POWER_RTOL)
        return problem.lipschitz()

    def objective(self, w, r=None):
        return self._problem.objective(w, self.residual(w) if r is None else r)


def _best_swap(problem: Problem, w, r, g, f, m: int, tol: float, pattern=None, evaluate: bool = True,
               moves: int = 1):
    """Best swap i ∈ S → j ∉ S with the other weights fixed, in closed form.

    Removing i changes f by  c_i = rᵀX_i w_i + ½‖X_i‖²w_i² + λ(w̄_i² − (w_i − w̄_i)²) − α_i w_i;
    then the best value t of w_j lowers f by ½ b²/a with a = ‖X_j‖² + 2λ and
    b = X_jᵀ(r + X_i w_i) + 2λ w̄_j − α_j (t = b/a). With an N:M ``pattern`` only swaps
    within one group are allowed (i is a kept weight of j's group), and when none lowers f with
    the other weights fixed, the best one is refit exactly (the ridge solve of Alg 5 on the swapped
    support, one solve) and taken if that lowers f. Returns (w, support, f, r) or None, r the residual of w;
    f and r are None when ``evaluate=False`` and the swap is taken by its closed-form gain (the caller refits
    it, or evaluates it: one product with X saved). ``moves`` > 1 (a plain X, no pattern): up to that many
    disjoint swaps of negative gain at once, taken when together they lower f (:func:`_several_swaps`).
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
    if moves > 1:
        several = _several_swaps(problem, w, r, f, tol, gain, I, J, CI, CJ, a, b, moves)
        if several is not None:
            return several
    j, i = divmod(best, I.numel())
    w_new = w.clone()
    w_new[I[i]] = 0.0
    w_new[J[j]] = b[j, i] / a[j]
    if change < -tol * abs(f) and not evaluate:
        return w_new, w_new != 0, None, None
    if change >= -tol * abs(f):  # N:M: with the other weights fixed no swap pays; refit the best one exactly on
        w_new = problem.ridge(pattern.support_of(w_new))  # its support (Alg 5)
    r_new = problem.residual(w_new)
    f_new = problem.objective(w_new, r_new)
    return (w_new, w_new != 0, f_new, r_new) if f_new < f - tol * abs(f) else None


def _several_swaps(problem, w, r, f, tol, gain, I, J, CI, CJ, a, b, moves):
    """Up to ``moves`` disjoint swaps (i, j) of negative closed-form gain, best first, made together; their point
    is evaluated exactly from the swapped columns alone (r' = r + X_I w_I − X_J t_J, no product with X), and
    returned as (w', support, f', r') when it lowers f below the best single swap's estimate, else None."""
    order = torch.argsort(gain.flatten())[:4 * moves].tolist()
    used_i, used_j, pairs = set(), set(), []
    for flat in order:
        j, i = divmod(flat, I.numel())
        if float(gain[j, i]) >= -tol * abs(f) or len(pairs) == moves:
            break
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            pairs.append((j, i))
    if len(pairs) < 2:
        return None
    js = torch.tensor([j for j, _ in pairs], device=w.device)
    is_ = torch.tensor([i for _, i in pairs], device=w.device)
    t = b[js, is_] / a[js]
    w_new = w.clone()
    w_new[I[is_]] = 0.0
    w_new[J[js]] = t
    r_new = r + CI[is_].T @ w[I[is_]] - CJ[js].T @ t
    f_new = problem.objective(w_new, r_new)
    if f_new < f + float(gain.min()) - tol * abs(f):
        return w_new, w_new != 0, f_new, r_new
    return None
