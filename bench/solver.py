"""Benchmark: time of one line-search IHT iteration against one bare ``X @ w`` + ``X.T @ r`` pass.

The bare pair is the memory-bandwidth floor of an IHT iteration (each reads X once). A line-search
iteration that keeps its support costs one X·d and one Xᵀr; one that changes the support also
evaluates thresholded candidates (a gather or one more pass each). Both kinds are timed during a whole
solve from the magnitude-pruning point. Then the whole solve per iteration, with the sequential line search
against the sync-free one (``iht(..., sync_free=True)``: no host read per iteration, for GPUs; columns
ratio_solve_sequential and ratio_solve_sync_free, in bare passes). Prints a table and writes data/bench/solver.csv.
Usage: python bench/solver.py [--device cuda] [--p 32360 270000 1000000]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import chita_minimal as cm
from _common import write_table
from chita_minimal.solver.iht import iht, line_search_step

ROOT = Path(__file__).resolve().parents[1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, repeat):
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pruning_like(n, p, device, seed=0):
    """Gradients with a decaying spectrum and a w̄ whose large entries matter most, like a trained layer."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(n, p, generator=g) * (torch.rand(p, generator=g) + 0.1)
    w_bar = torch.randn(p, generator=g) * torch.rand(p, generator=g) ** 2
    return X.to(device), w_bar.to(device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--p", type=int, nargs="+", default=[32_360, 270_000, 1_000_000])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=str(ROOT / "data" / "bench" / "solver.csv"))
    args = ap.parse_args()
    device = cm.device(args.device)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for p in args.p:
        X, w_bar = pruning_like(args.n, p, device)
        problem = cm.Problem(X, w_bar, l2=1e-4)
        k = cm.num_kept(args.sparsity, p)
        w = torch.where(cm.hard_threshold(w_bar, k), w_bar, torch.zeros_like(w_bar))
        r = problem.residual(w)
        bare = timeit(lambda: (X @ w, X.T @ r), device, repeat=max(3, args.iters // 2))

        # a whole line-search IHT solve from the magnitude-pruning point, timing every iteration
        state = [w, r, problem.objective(w, r)]
        cg = {}
        kept_times, changed_times = [], []
        for _ in range(args.iters):
            before = state[0] != 0
            f_old = state[2]

            def one_step():
                w_new, _, r_new, f_new = line_search_step(problem, state[0], state[1], state[2], k, 1e-7, cg)
                state[:] = [w_new, r_new, f_new]

            t = timeit(one_step, device, repeat=1)
            (kept_times if torch.equal(before, state[0] != 0) else changed_times).append(t)
            if abs(f_old - state[2]) <= 1e-7 * abs(f_old):
                break
        all_times = kept_times + changed_times
        kept = statistics.median(kept_times) if kept_times else float("nan")
        # the whole solve, per iteration: the sequential line search (host reads per trial) against the sync-free
        # one (every candidate step at once, selected on the device), both from the same point for args.iters
        # iterations (tol = 0) with L cached
        problem.lipschitz()
        per_iter = {}
        for label, sync_free in (("sequential", False), ("sync_free", True)):
            out = []
            sec = timeit(lambda: out.append(iht(problem, k, w, max_iter=args.iters, tol=0.0, sync_free=sync_free)),
                         device, repeat=2)
            per_iter[label] = sec / out[-1][3]
        row = dict(device=str(device), dtype="float32", n=args.n, p=p, sparsity=args.sparsity,
                   bare_pass_ms=round(1e3 * bare, 3), iter_support_kept_ms=round(1e3 * kept, 3),
                   ratio_support_kept=round(kept / bare, 3), iters_support_kept=len(kept_times),
                   iters_support_changed=len(changed_times),
                   iter_support_changed_ms=round(1e3 * statistics.mean(changed_times), 3) if changed_times else "",
                   ratio_mean_all_iters=round(statistics.mean(all_times) / bare, 3),
                   ratio_solve_sequential=round(per_iter["sequential"] / bare, 3),
                   ratio_solve_sync_free=round(per_iter["sync_free"] / bare, 3),
                   cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
        rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    write_table(rows, args.out, device.type)


if __name__ == "__main__":
    main()
