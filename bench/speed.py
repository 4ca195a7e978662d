"""Benchmark: CHITA's speed figures on MLPNet (shared checkpoint), n = 1000 per-sample gradients, fp32.

Rows (one CSV, data/bench/speed.csv):
  active_set   single-stage active-set CHITA, solve time per sparsity 0.5 … 0.98
  active_set_refit  the same with refit=3 (jump to the exact solve once IHT's support is stable)
  backsolve    CHITA-BSO solve time per sparsity
  chita++      CHITA++ to 0.98 with 10 stages, gradients recomputed every stage, end to end
  profile      where the time of the active-set solve at 0.9 goes (cProfile, cumulative, parts nest)
l2 is the value chosen on the validation split by the MLPNet chapter for each method and sparsity
(data/results/mlpnet_l2.csv; below its smallest tuned sparsity the value chosen there), else --l2.
Usage: python bench/speed.py [--device cuda] [--n 1000]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

import chita_minimal as cm
from _common import write_table

ROOT = Path(__file__).resolve().parents[1]
SPARSITIES = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98]
PARTS = {"matvec": ["matvec", "matvec_cols"], "rmatvec": ["rmatvec"], "top-k": ["hard_threshold"],
         "tau_c": ["_step_to_keep_support"], "restrict": ["restrict"], "ridge": ["ridge_on_support"],
         "lipschitz": ["lipschitz"], "swap": ["_best_swap"]}


def tuned_l2(method: str, default: float) -> dict[float, float]:
    """The MLPNet chapter's validation choice of l2 per sparsity for ``method``, if available."""
    path = ROOT / "data" / "results" / "mlpnet_l2.csv"
    out = {}
    if path.exists():
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("method") == method and row.get("chosen", "").lower() == "true":
                    out[float(row["sparsity"])] = float(row["l2"])
    def pick(s):  # as the chapter does: below the smallest tuned sparsity, reuse the value chosen there
        above = [t for t in out if t >= s - 1e-12]
        return out[min(above)] if above else default

    return {s: pick(s) for s in SPARSITIES}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--out", default=str(ROOT / "data" / "bench" / "speed.csv"))
    args = ap.parse_args()
    device = cm.device(args.device)
    train = cm.data.load("mnist", "train")
    model = cm.models.load_pretrained("mlpnet", device=device)
    lay = cm.network.params.layout(model, cm.network.params.resolve(model))
    w_bar = cm.network.params.flatten(model, lay).to(device)
    X = cm.gradients(model, train, args.n, seed=0, device=device, progress=False).X
    rows = []

    def emit(**row):
        row = dict(device=str(device), n=args.n, p=lay.p, threads=torch.get_num_threads(), **row)
        rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    test = cm.data.load("mnist", "test")
    for what, method, opts in [("active_set", "active", {}), ("active_set_refit", "active", {"refit": 3}),
                               ("backsolve", "backsolve", {})]:
        l2s = tuned_l2("chita" if method == "active" else "chita-bso", args.l2)
        for s in SPARSITIES:
            k = cm.num_kept(s, lay.p)
            res = cm.solve(X, w_bar, k, l2=l2s[s], method=method, **opts)
            cm.network.params.write_back(model, lay, res.w)
            acc = 100 * cm.evaluate(model, test)
            cm.network.params.write_back(model, lay, w_bar)
            emit(what=what, sparsity=s, l2=l2s[s], seconds=round(res.seconds, 3), iterations=res.iterations,
                 objective=f"{res.objective:.6g}", part=f"test accuracy {acc:.2f} %")

    l2_pp = tuned_l2("chita++", args.l2)[0.98]
    pp_model = cm.models.load_pretrained("mlpnet", device=device)
    m = cm.network.measure.measure(cm.prune, pp_model, train, 0.98, "chita++", stages=10, n_grads=args.n, l2=l2_pp,
                           device=device)
    emit(what="chita++", sparsity=0.98, l2=l2_pp, seconds=round(m.seconds, 3), iterations=10,
         objective=f"{m.result.objective:.6g}", part=f"gradients {m.result.seconds['gradients']:.2f} s")

    l2 = tuned_l2("chita", args.l2)[0.9]
    res, total, parts = cm.network.measure.profile(cm.solve, X, w_bar, cm.num_kept(0.9, lay.p), l2=l2, method="active",
                                           functions=PARTS)
    for part, sec in parts.items():
        emit(what="profile", sparsity=0.9, l2=l2, seconds=round(sec, 3), iterations=res.iterations,
             objective=f"{res.objective:.6g}", part=f"{part} ({100 * sec / total:.0f} % of {total:.2f} s profiled)")
    write_table(rows, args.out, device.type)


if __name__ == "__main__":
    main()
