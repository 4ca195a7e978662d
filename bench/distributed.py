"""Benchmark: time per phase of a CHITA prune with 1 and 2 ranks (torchrun; gloo on CPU, nccl on GPUs).

Each configuration runs ``torchrun --nproc-per-node W -m chita_minimal.scale.launch`` in a subprocess and
reads rank 0's JSON report. On a CPU machine the cores are shared: W ranks get cores/W threads each,
so the comparison is at equal hardware. Prints a table and writes data/bench/distributed.csv.
Usage: python bench/distributed.py [--models mlpnet resnet20] [--world 1 2] [--n 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _common import write_table

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mlpnet", "resnet20"])
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--method", default="chita")
    ap.add_argument("--out", default=str(ROOT / "data" / "bench" / "distributed.csv"))
    args = ap.parse_args()
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cores = os.cpu_count() or 1
    gpu = torch.cuda.is_available()
    rows = []
    for model in args.models:
        for world in args.world:
            threads = max(1, cores // world)
            with tempfile.TemporaryDirectory() as tmp:
                report = Path(tmp) / "report.json"
                cmd = [torchrun, "--nproc-per-node", str(world), "-m", "chita_minimal.scale.launch", "--model", model,
                       "--method", args.method, "--sparsity", str(args.sparsity), "--n-grads", str(args.n),
                       "--l2", "1e-3" if model == "mlpnet" else "1.0", "--threads", str(threads),
                       "--out", str(report)]
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
                out = json.loads(report.read_text())
            row = dict(device="cuda" if gpu else "cpu", model=model, method=args.method, sparsity=args.sparsity,
                       n=args.n, world_size=world, threads_per_rank=threads, backend=out["backend"],
                       gradients_s=round(out["gradients_s"], 2), solve_s=round(out["solve_s"], 2),
                       total_s=round(out["total_s"], 2), accuracy=round(out["accuracy"], 2))
            rows.append(row)
            print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    write_table(rows, args.out, "cuda" if gpu else "cpu")


if __name__ == "__main__":
    main()
