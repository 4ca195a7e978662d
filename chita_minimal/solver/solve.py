"""``solve``: one entry point for every solver of problem (P), and its result."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from chita_minimal.solver.active_set import active_set
from chita_minimal.solver.backsolve import backsolve, first_step_support
from chita_minimal.solver.blocks import BlockProblem, block_backsolve
from chita_minimal.solver.iht import iht
from chita_minimal.solver.patterns import NM
from chita_minimal.solver.problem import Problem, check_k

METHODS = ("active", "iht", "iht-fixed", "backsolve", "block", "block-iht")
PATTERN_METHODS = ("active", "iht", "iht-fixed", "backsolve")  # the methods that take an N:M pattern


@dataclass
class SolveResult:
    """What a solver returns.

    w: (p,) weights with at most k nonzeros (at most N per group with an N:M pattern);
    support: (p,) bool mask of the k kept coordinates; objective: f(w) of problem (P);
    trace: f after every iteration (one entry for closed-form methods); iterations;
    seconds: wall time of the solve.
    """

    w: torch.Tensor
    support: torch.Tensor
    objective: float
    trace: list[float] = field(repr=False)
    iterations: int
    seconds: float
    method: str

    @property
    def nnz(self) -> int:
        return int((self.w != 0).sum())


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def solve(X: torch.Tensor, w_bar: torch.Tensor, k: int | None = None, *, l2: float = 0.0,
          alpha: torch.Tensor | None = None, method: str = "active", blocks=None, max_iter: int = 500,
          tol: float = 1e-7, mask: torch.Tensor | None = None, distributed: bool = False, pattern: NM | None = None,
          **options) -> SolveResult:
    """Solve problem (P) for k nonzeros with one of CHITA's algorithms.

    ``objective`` of the result is f(w) of the full problem (P) for every method; the
    ``trace`` of "block-iht" holds the objective of the block-diagonal problem it solves.

    Args:
        X: (n, p) gradient matrix (float32/float64, any device); w_bar: (p,) weights.
        k: number of weights to keep, 1 ≤ k ≤ p (or ≤ the number allowed by ``mask``); with a
            ``pattern``, None or pattern.k.
        l2: ridge weight (λ = l2·n/2); alpha: optional (p,) first-order term.
        method: "active" (Alg 4), "iht" (Alg 3 with the Alg 2 line search),
            "iht-fixed" (Alg 3 with step 1/L), "backsolve" (Alg 5), "block" (Alg 6: support of
            one thresholding step, then a backsolve per block), "block-iht" (the active set of
            Alg 4 on the block-diagonal problem — one global top-k across blocks — ending with
            the per-block backsolve; see :class:`chita_minimal.solver.blocks.BlockProblem`).
        blocks: block specification for "block"/"block-iht" (see :func:`chita_minimal.solver.blocks.make_blocks`).
        max_iter, tol: IHT stopping rule (relative objective change < tol).
        mask: optional (p,) bool; coordinates where it is False are fixed at 0 (CHITA++
            stages keep earlier pruned weights pruned).
        distributed: X holds this rank's rows only, under an initialised ``torch.distributed``
            process group (see :mod:`chita_minimal.scale.distributed`); every rank must call with its
            rows and the same w_bar, k, l2 and method, and gets the same result. Methods
            "active", "iht", "iht-fixed", "backsolve" and "block" (blocks dealt out to the ranks).
        pattern: an N:M constraint (:class:`chita_minimal.solver.patterns.NM`) instead of global top-k:
            exactly N kept in every group. Methods "active", "iht", "iht-fixed" and "backsolve";
            not with ``mask`` or ``distributed``.
        options: passed to the method (e.g. ``expand``, ``max_rounds``, ``polish`` for "active").
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if pattern is not None:
        if not isinstance(pattern, NM):
            raise TypeError(f"pattern must be a chita_minimal.solver.patterns.NM or None, got {type(pattern).__name__}")
        unsupported = [what for what, bad in ((f"method={method!r}", method not in PATTERN_METHODS),
                                              ("mask", mask is not None), ("distributed=True", distributed)) if bad]
        if unsupported:
            raise NotImplementedError(f"{' and '.join(unsupported)} is not supported with an N:M pattern "
                                      f"(methods: {', '.join(PATTERN_METHODS)}; no mask, not distributed)")
    if distributed:
        from chita_minimal.scale.distributed import ShardedProblem, block_backsolve_sharded, check_same

        if method not in ("active", "iht", "iht-fixed", "backsolve", "block"):
            raise ValueError(f"method {method!r} is not available with distributed=True; "
                             "use 'active', 'iht', 'iht-fixed', 'backsolve' or 'block'")
        check_same(k=k, method=method, mask=None if mask is None else int(mask.sum()))
        problem = ShardedProblem(X, w_bar, l2, alpha)
    else:
        problem = Problem(X, w_bar, l2, alpha)
    full = problem
    idx = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != w_bar.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(w_bar.shape)}")
        idx = torch.nonzero(mask.to(X.device)).squeeze(1)
        if idx.numel() == 0:
            raise ValueError("mask allows no coordinate")
        if method != "block-iht":  # block IHT restricts its own BlockProblem (keep=mask); no copy of X[:, idx] here
            problem = problem.restrict(idx)
    if pattern is None:
        k = check_k(k, problem.p if idx is None else idx.numel())
    else:
        if pattern.p != problem.p:
            raise ValueError(f"pattern covers p = {pattern.p} coordinates but w_bar has {problem.p}")
        k = pattern.check_k(k)
        pattern = pattern.to(X.device)
        options = {"pattern": pattern, **options}
    if method.startswith("block") and blocks is None:
        raise ValueError(f"method={method!r} needs blocks (a block size or a partition)")
    if not method.startswith("block") and blocks is not None:
        raise ValueError(f"blocks is only used by methods 'block' and 'block-iht', got method={method!r}")

    _sync(X)
    t0 = time.perf_counter()
    if method == "active":
        w, support, trace, iterations = active_set(problem, k, max_iter=max_iter, tol=tol, **options)
    elif method == "block-iht":  # the same solver on the block-diagonal problem (trace: its objective)
        block_problem = BlockProblem(X, w_bar, blocks, l2, alpha, keep=mask)
        w, support, trace, iterations = active_set(block_problem, k, max_iter=max_iter, tol=tol, **options)
    elif method in ("iht", "iht-fixed"):
        w, support, trace, iterations = iht(problem, k, line_search=(method == "iht"), max_iter=max_iter, tol=tol,
                                            **options)
    elif method == "backsolve":
        w, support = backsolve(problem, k, **options)
        trace, iterations = [problem.objective(w)], 1
    else:
        if idx is not None:  # blocks index the full vector: choose the support on the allowed coordinates
            support = torch.zeros(full.p, dtype=torch.bool, device=X.device)
            support[idx] = first_step_support(problem, k)
            problem, idx = full, None
            options = {"support": support, **options}
        solver = block_backsolve_sharded if distributed else block_backsolve
        w, support = solver(problem, k, blocks, **options)
        trace, iterations = [problem.objective(w)], 1
    _sync(X)
    seconds = time.perf_counter() - t0

    if idx is not None:  # back to the full coordinates
        w_full = torch.zeros_like(w_bar)
        w_full[idx] = w
        s_full = torch.zeros_like(mask, device=X.device)
        s_full[idx] = support
        w, support = w_full, s_full
    return SolveResult(w=w, support=support, objective=full.objective(w), trace=trace, iterations=iterations,
                       seconds=seconds, method=method)
