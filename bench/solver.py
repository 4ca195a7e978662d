"""Benchmark: time of one line-search IHT iteration against one bare ``X @ w`` + ``X.T @ r`` pass.

The bare pair is the memory-bandwidth floor of an IHT iteration (each reads X once). Prints a table and
writes data/bench/solver.csv. Usage: python bench/solver.py [--device cuda] [--p 32360 270000 1000000]
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch

import chita_minimal as cm
from chita_minimal.iht import line_search_step

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
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "data" / "bench" / "solver.csv"))
    args = ap.parse_args()
    device = cm.device(args.device)
    torch.set_grad_enabled(False)
    rows = []
    for p in args.p:
        X, w_bar = pruning_like(args.n, p, device)
        problem = cm.Problem(X, w_bar, l2=1e-4)
        k = cm.num_kept(args.sparsity, p)
        w = torch.where(cm.hard_threshold(w_bar, k), w_bar, torch.zeros_like(w_bar))
        r = problem.residual(w)
        bare = timeit(lambda: (X @ w, X.T @ r), device, repeat=max(3, args.iters // 2))

        state = [w, r, problem.objective(w, r)]
        step_times, explored = [], 0

        def one_step():
            w_new, support, r_new, f_new = line_search_step(problem, state[0], state[1], state[2], k, 0.0)
            state[:] = [w_new, r_new, f_new]

        for _ in range(args.iters):
            supp_before = state[0] != 0
            step_times.append(timeit(one_step, device, repeat=1))
            explored += int(not torch.equal(supp_before, state[0] != 0))
        it = statistics.median(step_times)
        row = dict(device=str(device), dtype="float32", n=args.n, p=p, sparsity=args.sparsity,
                   bare_pass_ms=round(1e3 * bare, 3), iht_iter_ms=round(1e3 * it, 3),
                   iht_iter_mean_ms=round(1e3 * statistics.mean(step_times), 3),
                   ratio_median=round(it / bare, 3), ratio_mean=round(statistics.mean(step_times) / bare, 3),
                   support_changes=explored, iters=args.iters, cpu=platform.processor() or platform.machine(),
                   threads=torch.get_num_threads())
        rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        del X, problem
    out = Path(args.out)
    if device.type != "cpu":
        out = out.with_name(out.stem + f"_{device.type}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
