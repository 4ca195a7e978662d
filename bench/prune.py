"""Benchmark: wall time per pruning method for MLPNet (shared checkpoint) at 90 % and 98 % sparsity.

Time per phase (gradients, solve) from ``PruneReport.seconds`` and the test accuracy after pruning.
Prints a table and writes data/bench/prune.csv.
Usage: python bench/prune.py [--device cuda] [--n 1000] [--sparsity 0.9 0.98]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import chita_minimal as cm
from _common import write_table

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["mp", "wf", "cbs", "mfac", "chita", "chita-bso", "chita-block", "chita++"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.98])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--out", default=str(ROOT / "data" / "bench" / "prune.csv"))
    args = ap.parse_args()
    device = cm.device(args.device)
    train, test = cm.data.load("mnist", "train"), cm.data.load("mnist", "test")
    rows = []
    for s in args.sparsity:
        for method in args.methods:
            model = cm.models.load_pretrained("mlpnet", device=device)
            report = cm.prune(model, train, s, method=method, n_grads=args.n, l2=args.l2, seed=0)
            acc = cm.evaluate(model, test)
            row = dict(device=str(device), method=method, sparsity=s, n=args.n, l2=args.l2,
                       gradients_s=round(report.seconds["gradients"], 3), solve_s=round(report.seconds["solve"], 3),
                       total_s=round(report.seconds["total"], 3), accuracy=round(100 * acc, 2),
                       threads=torch.get_num_threads())
            rows.append(row)
            print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    write_table(rows, args.out, device.type)


if __name__ == "__main__":
    main()
