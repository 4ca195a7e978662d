"""Layer-wise pruning of SmolLM2-135M: time and peak memory of each method, as ratios to SparseGPT in one run.

    python bench/llm.py                                   # the language-model chapter's protocol at 50 %
    python bench/llm.py --windows 16 --length 128         # a smaller calibration set
    python bench/llm.py --methods sparsegpt wanda --sparsity 0.7

Each method prunes a fresh copy of the model in its own process (so that its peak resident memory is its own:
ru_maxrss of the child, minus the resident memory after the model was loaded), on the same calibration windows
(WikiText-2 valid, seed 0); the perplexity is on the first ``--eval`` non-overlapping test windows. Writes
data/bench/llm.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import smollm2_wikitext, write_table  # noqa: E402

METHODS = ("sparsegpt", "mp-layer", "wanda", "alps", "chita-layer")


def child(method: str, sparsity: float, windows: int, length: int, n_eval: int) -> dict:
    import torch

    import chita_minimal as cm
    from chita_minimal.data.text import token_windows
    from chita_minimal.network.language import perplexity

    torch.manual_seed(0)
    model, tok, valid, test = smollm2_wikitext(n_eval, length)
    calib = token_windows(valid, tok, windows, length, seed=0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    report = cm.prune(model, calib, sparsity, method=method)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(method=method, sparsity=sparsity, seconds=round(seconds, 2),
                calibration_s=round(report.seconds.get("calibration", 0.0), 2),
                solve_s=round(report.seconds.get("solve", 0.0), 2), peak_extra_mib=round((peak - base) / 1024, 1),
                perplexity=round(perplexity(model, test), 4), achieved=round(report.achieved, 4))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--eval", type=int, default=40)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "bench" / "llm.csv"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.sparsity, a.windows, a.length, a.eval)))
        return
    if "sparsegpt" not in a.methods:
        a.methods.insert(0, "sparsegpt")
    rows = []
    for m in a.methods:
        cmd = [sys.executable, __file__, "--child", m, "--sparsity", str(a.sparsity), "--windows", str(a.windows),
               "--length", str(a.length), "--eval", str(a.eval)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        if out.returncode:
            raise SystemExit(f"{m} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ref = next(r for r in rows if r["method"] == "sparsegpt")
    for r in rows:
        r["time_vs_sparsegpt"] = round(r["seconds"] / ref["seconds"], 3)
        r["memory_vs_sparsegpt"] = round(r["peak_extra_mib"] / max(ref["peak_extra_mib"], 1e-9), 3)
        r["perplexity_vs_sparsegpt"] = round(r["perplexity"] / ref["perplexity"], 3)
        r.update(windows=a.windows, length=a.length, eval_windows=a.eval, threads=__import__("torch").get_num_threads())
    print(f"{'method':<12} {'s':>8} {'×sgpt':>6} {'MiB':>8} {'×sgpt':>6} {'ppl':>9} {'×sgpt':>6}")
    for r in rows:
        print(f"{r['method']:<12} {r['seconds']:>8.1f} {r['time_vs_sparsegpt']:>6.2f} {r['peak_extra_mib']:>8.0f} "
              f"{r['memory_vs_sparsegpt']:>6.2f} {r['perplexity']:>9.2f} {r['perplexity_vs_sparsegpt']:>6.2f}")
    write_table(rows, a.out)


if __name__ == "__main__":
    main()
