"""Benchmark: time and peak memory to build the gradient matrix X (n×p).

Compares ``fisher.gradients`` (torch.func vmap, chunked) with ``fisher.gradients_loop``
(one backward pass per row) on MLPNet and ResNet20 with random weights and random
inputs (timing does not depend on the values), batch_size 1.

Timings use one CPU thread by default (``--threads``): on a small shared machine
torch's default thread pool can slow batch-1 convolutions down by 100× when another
process competes for the cores, which would make the loop look far worse than it is.

Each measurement runs in a fresh subprocess so peak memory is not polluted by the
previous one. Peak memory is reported relative to a baseline taken in that
subprocess after imports, model and data creation and a 2-row warm-up, i.e. it is
the extra memory the call needs (the n×p matrix X included):
  CPU:  resource.getrusage(RUSAGE_SELF).ru_maxrss  (high-water mark of the process)
  CUDA: torch.cuda.max_memory_allocated

    python bench/fisher.py                   # n = 1000 on CPU
    python bench/fisher.py --device cuda --n 1000
    python bench/fisher.py --repeat 3        # noisy shared machine: keep the fastest run
Writes data/bench/fisher.csv (model,device,method,n,p,seconds,peak_mib).
"""

import argparse
import csv
import json
import os
import subprocess
import sys

MODELS = {"mlpnet": (1, 28, 28), "resnet20": (3, 32, 32)}
METHODS = ["vmap", "loop"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _max_rss_mib() -> float:
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def worker(model_name: str, method: str, device: str, n: int, threads: int) -> dict:
    """One measurement (run in its own process); returns a row of the table."""
    import torch
    from torch.utils.data import TensorDataset

    from chita_minimal.network import fisher
    from chita_minimal import models

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = {"mlpnet": models.MLPNet, "resnet20": models.resnet20}[model_name]().to(device)
    ds = TensorDataset(torch.randn(n, *MODELS[model_name]), torch.randint(0, 10, (n,)))
    fn = {"vmap": fisher.gradients, "loop": fisher.gradients_loop}[method]
    fn(model, ds, 2, progress=False)  # warm-up: lazy initialisation of kernels

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _max_rss_mib()
    s = fn(model, ds, n, progress=False)
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _max_rss_mib() - base
    return dict(model=model_name, device=device, method=method, n=n, p=s.p,
                seconds=round(s.seconds, 3), peak_mib=round(peak, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--n", type=int, default=1000, help="rows of X (default 1000)")
    ap.add_argument("--models", default="mlpnet,resnet20", help="comma-separated: mlpnet,resnet20")
    ap.add_argument("--methods", default="vmap,loop", help="comma-separated: vmap,loop")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per measurement (default 1; 0 = torch's default)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="fresh processes per measurement; the fastest time and the largest peak are kept")
    ap.add_argument("--out", default=os.path.join(ROOT, "data", "bench", "fisher.csv"))
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")

    if args.worker:  # child process: one measurement, one JSON line on stdout
        print(json.dumps(worker(*args.worker, args.device, args.n, args.threads)))
        return

    names, methods = args.models.split(","), args.methods.split(",")
    for v, valid, flag in ((names, MODELS, "--models"), (methods, METHODS, "--methods")):
        bad = [x for x in v if x not in valid]
        if bad:
            raise ValueError(f"{flag}: unknown {bad}; valid: {list(valid)}")
    rows = []
    for name in names:
        for method in methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, method,
                   "--device", args.device, "--n", str(args.n),
                   "--threads", str(args.threads)]
            runs = []
            for _ in range(args.repeat):
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            rows.append(dict(runs[0], seconds=min(r["seconds"] for r in runs),
                             peak_mib=max(r["peak_mib"] for r in runs)))
            r = rows[-1]
            print(f"{r['model']:>9} {r['method']:>5}: {r['seconds']:8.2f} s  {r['peak_mib']:8.1f} MiB",
                  file=sys.stderr)

    cols = ["model", "device", "method", "n", "p", "seconds", "peak_mib"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
