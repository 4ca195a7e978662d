"""Structured pruning of SmolLM2-135M: perplexity and measured speed of the shrunk models, in one process.

    python bench/lm_structure.py                                  # 10 / 20 / 30 / 50 %, every LM structure method
    python bench/lm_structure.py --fractions 0.3 --methods lm-chita lm-wanda

For every fraction of the decoder's linear multiply-adds and every method (``cm.shrink``): WikiText-2 perplexity
(calibration: ``--windows`` × ``--length`` tokens of valid, seed 0; evaluation: the first ``--eval`` windows of
test), the shrink time, the parameters and stored size (safetensors), and the prefill and greedy-generation
tokens per second (:func:`chita_minimal.network.language.throughput`) as ratios to the dense model measured in the
same process with the same thread count (the dense model is measured before and after the runs; its mean is the
reference). Writes data/bench/lm_structure.csv.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import smollm2_wikitext, write_table  # noqa: E402

METHODS = ("lm-magnitude", "lm-wanda", "lm-taylor", "lm-chita")


def stored_mib(model) -> float:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        seen, unique = set(), {}
        for k, v in state.items():  # tied weights once
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                unique[k] = v
        save_file(unique, str(path))
        return path.stat().st_size / 2**20


def main():
    import chita_minimal as cm
    from chita_minimal.data.text import token_windows
    from chita_minimal.network.language import perplexity, throughput

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--eval", type=int, default=40)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "bench" / "lm_structure.csv"))
    a = ap.parse_args()
    torch.manual_seed(0)
    dense, tok, valid, test = smollm2_wikitext(a.eval, a.length)
    calib = token_windows(valid, tok, a.windows, a.length, seed=0)
    speed_ids = test.ids[:4]  # 4 × length tokens per prefill pass
    dense_ppl = perplexity(dense, test)
    speed = [throughput(dense, speed_ids)]
    rows = [dict(method="dense", fraction=0.0, achieved=0.0, perplexity=round(dense_ppl, 3), seconds=0.0,
                 params_m=round(sum(p.numel() for p in dense.parameters()) / 1e6, 2),
                 stored_mib=round(stored_mib(dense), 1), **speed[0])]
    print(rows[-1], flush=True)
    for fraction in a.fractions:
        for method in a.methods:
            t = time.perf_counter()
            report = cm.shrink(dense, calib, fraction, method)
            seconds = time.perf_counter() - t
            small = report.model
            row = dict(method=method, fraction=fraction, achieved=round(report.achieved, 4),
                       perplexity=round(perplexity(small, test), 3), seconds=round(seconds, 1),
                       params_m=round(sum(p.numel() for p in small.parameters()) / 1e6, 2),
                       stored_mib=round(stored_mib(small), 1), **throughput(small, speed_ids))
            rows.append(row)
            print(row, flush=True)
            del small, report
    speed.append(throughput(dense, speed_ids))
    ref = {k: (speed[0][k] + speed[1][k]) / 2 for k in speed[0]}
    for r in rows:
        r["prefill_speedup"] = round(r["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"], 3)
        r["generate_speedup"] = round(r["generate_tokens_per_s"] / ref["generate_tokens_per_s"], 3)
        r["prefill_tokens_per_s"] = round(r["prefill_tokens_per_s"], 1)
        r["generate_tokens_per_s"] = round(r["generate_tokens_per_s"], 2)
    print(f"dense speed before/after the runs: {speed[0]} / {speed[1]} ({torch.get_num_threads()} threads)")
    write_table(rows, a.out)


if __name__ == "__main__":
    main()
