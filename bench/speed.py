"""Benchmark: CHITA's solvers as ratios measured in one process, against the bare pass and a plain reference.

Every time is divided by the *bare pass* (one ``X @ w`` plus one ``X.T @ r`` on the same X, the least work any
first-order method does per iteration), measured in the same process just before; and compared with a reference
written plainly in numpy in the same process, so that a reader can check the ratios on their own machine:

  active_set   MLPNet (shared checkpoint), n = 1000 per-sample gradients, fp32, l2 = 1e-3 and 0.1,
               sparsity 0.5 … 0.98: the package's active set (Alg 4) against ``cm.solver.reference.iht`` (IHT with a
               backtracking line search on the step, the textbook form of Alg 3, same tolerance, ≤ 300 iterations)
  block        ResNet20 (shared checkpoint), n = 1000, blocks of 500 per layer, sparsity 0.7 / 0.8 / 0.9: the
               block backsolve of Alg 6 on a fixed support (rows block_batched: the batched buckets it uses off
               a CPU, forced here) against
               ``cm.solver.reference.block_backsolve`` (one ridge solve per block in a Python loop); rows
               block_gram_floor: only gathering each block's kept columns and forming their Gram (no solve)
  iteration    one line-search IHT iteration (MLPNet, ResNet20, sparsity 0.9) in bare passes: the sequential line
               search against the sync-free one (``iht(..., sync_free=True)``, no host read in the loop)
  profile      where the active set's time goes at 0.9 and 0.98, l2 1e-3 and 0.1 (cProfile, cumulative; parts
               nest), in bare passes

Our solves are timed as the fastest of three runs (a 2-core VM's timings move by up to 2x within minutes), the
references (10-100x longer runs) once, the bare pass as the median of seven.
Columns: seconds (ours), passes (ours / bare pass), reference_seconds, speedup (reference / ours), objective
and reference_objective (f of problem (P); lower is better). CSV: data/bench/speed.csv.
Usage: python bench/speed.py [--device cuda] [--n 1000] [--quick]
Threads: torch and numpy's BLAS (the references, and the symmetric Gram products of the active set's refits on a CPU) both
read OMP_NUM_THREADS; unset, it is set to 1 here so that both sides of every ratio use one thread.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy and torch load their thread pools

import argparse  # noqa: E402
import contextlib  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import chita_minimal as cm  # noqa: E402
from _common import write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"matvec": ["matvec", "matvec_cols"], "rmatvec": ["rmatvec"], "top-k": ["hard_threshold"],
         "line search": ["line_search_step"], "halvings": ["_halving_step"], "restrict": ["restrict"],
         "ridge": ["ridge_on_support", "_ridge_by_gram_updates"],
         "lipschitz": ["lipschitz"], "swap": ["_best_swap"]}


# ----------------------------------------------------------------------------- measuring


def seconds(fn, repeats=1):
    """Smallest wall time of ``repeats`` calls (the last result is returned too), synchronised on a GPU."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def gradients_of(name, dataset, n, device):
    model = cm.models.load_pretrained(name, device=device)
    lay = cm.network.params.layout(model, cm.network.params.resolve(model))
    w_bar = cm.network.params.flatten(model, lay).to(device)
    X = cm.gradients(model, dataset, n, seed=0, device=device, progress=False).X
    return X, w_bar, lay


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="fewer points (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "data" / "bench" / "speed.csv"))
    args = ap.parse_args()
    device = cm.device(args.device)
    torch.manual_seed(0)
    rows = []

    def emit(**row):
        row = dict(device=str(device), threads=torch.get_num_threads(), **row)
        rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    # -- the active set on MLPNet ------------------------------------------------------------------
    X, w_bar, lay = gradients_of("mlpnet", cm.data.load("mnist", "train"), args.n, device)
    Xn, wn = X.cpu().numpy(), w_bar.cpu().numpy()
    sparsities = [0.5, 0.9, 0.98] if args.quick else [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
    for l2 in [1e-3, 0.1]:
        for s in sparsities:
            k = cm.num_kept(s, lay.p)
            bare = cm.network.measure.bare_pass(X)
            ref, (w_ref, f_ref, it_ref) = seconds(lambda: cm.solver.reference.iht(Xn, wn, k, l2, max_iter=300))
            ours, res = seconds(lambda: cm.solve(X, w_bar, k, l2=l2, method="active"), repeats=3)
            emit(what="active_set", net="mlpnet", n=args.n, p=lay.p, sparsity=s, l2=l2, seconds=round(ours, 3),
                 bare_pass=round(bare, 5), passes=round(ours / bare, 1), iterations=res.iterations,
                 reference="numpy IHT + line search", reference_seconds=round(ref, 3),
                 reference_iterations=it_ref, speedup=round(ref / ours, 2), objective=f"{res.objective:.6g}",
                 reference_objective=f"{f_ref:.6g}")

    # -- where the active set's passes go ----------------------------------------------------------
    bare = cm.network.measure.bare_pass(X)
    for s, l2 in [(0.9, 1e-3), (0.98, 1e-3), (0.9, 0.1), (0.98, 0.1)]:
        k = cm.num_kept(s, lay.p)
        res, total, parts = cm.network.measure.profile(cm.solve, X, w_bar, k, l2=l2, method="active", functions=PARTS)
        for part, sec in parts.items():
            emit(what="profile", net="mlpnet", n=args.n, p=lay.p, sparsity=s, l2=l2, seconds=round(sec, 3),
                 bare_pass=round(bare, 5), passes=round(sec / bare, 1), iterations=res.iterations,
                 reference=f"{part} ({100 * sec / total:.0f} % of {total:.2f} s profiled)")
    per_iteration("mlpnet", X, w_bar, lay, emit, args.n)
    del X, Xn

    # -- the block backsolve on ResNet20 -----------------------------------------------------------
    X, w_bar, lay = gradients_of("resnet20", cm.data.load("cifar10", "train"), args.n, device)
    Xn, wn = X.cpu().numpy(), w_bar.cpu().numpy()
    blocks = cm.solver.blocks.layer_blocks(lay, 500)
    spans = cm.solver.blocks.contiguous_spans(blocks)
    l2 = 1e-3
    for s in [0.7, 0.8, 0.9]:
        k = cm.num_kept(s, lay.p)
        problem = cm.solver.problem.Problem(X, w_bar, l2)
        support = cm.solver.backsolve.first_step_support(problem, k)
        bare = cm.network.measure.bare_pass(X)
        sup = support.cpu().numpy()
        ref, w_ref = seconds(lambda: cm.solver.reference.block_backsolve(Xn, wn, spans, sup, l2))

        def block_objective(v):  # f of the block-diagonal problem: Σ_b ½‖X_b(v_b − w̄_b)‖² + λ‖v − w̄‖²
            d = v - w_bar
            return float(0.5 * cm.solver.blocks.block_matvecs(X, d, blocks).square().sum()
                         + l2 * args.n / 2 * d.square().sum())

        for what, sliced in (("block", True), ("block_batched", False)):
            with _slicing(sliced):
                ours, w = seconds(lambda: cm.solver.blocks.block_backsolve(problem, k, blocks, support)[0], repeats=3)
            emit(what=what, net="resnet20", n=args.n, p=lay.p, sparsity=s, l2=l2, seconds=round(ours, 3),
                 bare_pass=round(bare, 5), passes=round(ours / bare, 1), iterations=1,
                 reference="numpy loop of per-block ridge solves", reference_seconds=round(ref, 3),
                 reference_iterations=1, speedup=round(ref / ours, 2),
                 objective=f"{block_objective(w):.6g}",
                 reference_objective=f"{block_objective(torch.from_numpy(w_ref).to(device)):.6g}")

        def grams_only():  # the least any exact per-block solve does: gather each block's kept columns, form VᵀV
            for a, width in spans:
                kept = np.flatnonzero(sup[a:a + width])
                if kept.size:
                    V = Xn[:, a:a + width][:, kept]
                    V.T @ V  # BLAS syrk

        floor, _ = seconds(grams_only, repeats=3)
        emit(what="block_gram_floor", net="resnet20", n=args.n, p=lay.p, sparsity=s, l2=l2, seconds=round(floor, 3),
             bare_pass=round(bare, 5), passes=round(floor / bare, 1), iterations=1,
             reference="gather + syrk of every block's kept columns, no solve")
    per_iteration("resnet20", X, w_bar, lay, emit, args.n)
    write_table(rows, args.out, device.type)


@contextlib.contextmanager
def _slicing(sliced: bool):
    """block_ridge as it runs on a CPU (contiguous blocks one slice of X at a time), or, ``sliced=False``, the
    batched buckets it runs on other devices."""
    blocks_mod = cm.solver.blocks
    real = blocks_mod._sliceable
    if not sliced:
        blocks_mod._sliceable = lambda X: False
    try:
        yield
    finally:
        blocks_mod._sliceable = real


def per_iteration(net, X, w_bar, lay, emit, n, iterations=40):
    """One line-search IHT iteration in bare passes: the sequential line search (host reads per trial) against
    the sync-free one (every candidate at once, no host read in the loop; one more product with X), at 0.9."""
    k = cm.num_kept(0.9, lay.p)
    problem = cm.solver.problem.Problem(X, w_bar, 1e-3)
    problem.lipschitz()  # outside the timing: both use the cached value
    bare = cm.network.measure.bare_pass(X)
    for what, sync_free in (("iteration", False), ("iteration_sync_free", True)):
        sec, out = seconds(lambda: cm.solver.iht.iht(problem, k, max_iter=iterations, tol=0.0, sync_free=sync_free),
                           repeats=2)
        emit(what=what, net=net, n=n, p=lay.p, sparsity=0.9, l2=1e-3, seconds=round(sec / out[3], 5),
             bare_pass=round(bare, 5), passes=round(sec / out[3] / bare, 2), iterations=out[3],
             reference=f"line-search IHT, {'sync-free' if sync_free else 'sequential'}, seconds per iteration",
             objective=f"{out[2][-1]:.6g}")


if __name__ == "__main__":
    main()
