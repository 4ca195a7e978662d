"""The ridge λ = percdamp·mean(diag H) of ALPS and layer-wise CHITA, chosen on held-out WikiText-2 *valid* tokens.

    python bench/llm_ridge.py                                          # 70 and 80 %, λ 0.0025 0.005 0.01
    python bench/llm_ridge.py --settings 0.8 --methods alps --percdamp 0.02

Both solvers minimise the damped layer objective tr((W − Ŵ)(H + λI)(W − Ŵ)ᵀ) with ALPS's published ridge
percdamp = 0.01 by default. The ridge is a modelling choice, not part of either search, and the test split must not
choose it: here the WikiText-2 valid tokens are cut in two, the calibration windows (64 × 512, seeded) are drawn
from the first 80 % and the perplexity is measured on the first ``--eval`` non-overlapping 512-token windows of the
last 20 % — tokens no calibration window touches. Everything else is the language-model chapter's protocol.

Rows go to data/bench/llm_ridge.csv after every run (a row of the same driver mode, setting, method and percdamp is
replaced); at the end, per driver mode, setting and method: held-out perplexity per percdamp and the best one. The
column ``within_block`` says how the calibration driver treated a decoder block: "true sequential" (each linear map
on the outputs of the pruned maps before it, the driver's mode since it was chosen on these held-out tokens) or
"one pass" (rows measured with the driver before that: every map of a block on one pass of the unpruned block).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DRIVER_MODE, read_table, replace_row, smollm2_wikitext, split_valid, write_table  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "data" / "bench" / "llm_ridge.csv"


def summary(rows: list[dict]) -> list[str]:
    """Per (setting, method): held-out perplexity at each percdamp, and the percdamp with the lowest."""
    lines = []
    for key in dict.fromkeys((r["within_block"], r["setting"], r["method"]) for r in rows):
        got = sorted((float(r["percdamp"]), float(r["perplexity"])) for r in rows
                     if (r["within_block"], r["setting"], r["method"]) == key)
        best = min(got, key=lambda t: t[1])[0]
        lines.append(f"{key[0]:<16} {key[1]:<5} {key[2]:<12} " + "  ".join(f"{p:g}: {v:.2f}" for p, v in got)
                     + f"   best {best:g}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=["0.7", "0.8"])
    ap.add_argument("--methods", nargs="+", default=["alps", "chita-layer"], choices=["alps", "chita-layer"])
    ap.add_argument("--percdamp", nargs="+", type=float, default=[0.0025, 0.005, 0.01])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--eval", type=int, default=40)
    ap.add_argument("--heldout", type=float, default=0.2, help="share of the valid tokens held out for evaluation")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    out = Path(a.out)

    import torch

    import chita_minimal as cm
    from chita_minimal.network.language import perplexity
    from chita_minimal.network.sequential import block_layers

    torch.manual_seed(0)
    dense, tok, valid, _ = smollm2_wikitext(None, a.length)
    calib, heldout, n_calib, n_held = split_valid(valid, tok, a.windows, a.eval, a.length, a.heldout)
    names = [n for layers in block_layers(dense) for n in layers]
    for setting in a.settings:
        sparsity, pattern = (0.5, setting) if ":" in setting else (float(setting), None)
        for method in a.methods:
            for pd in a.percdamp:
                model = copy.deepcopy(dense)
                t = time.perf_counter()
                cm.prune(model, calib, sparsity, method, pattern=pattern, names=names, percdamp=pd)
                seconds = time.perf_counter() - t
                row = dict(within_block=DRIVER_MODE, setting=setting, method=method, percdamp=pd,
                           perplexity=round(perplexity(model, heldout), 4), seconds=round(seconds, 1),
                           threads=torch.get_num_threads(), windows=a.windows, length=a.length,
                           eval_windows=a.eval, calibration_tokens=n_calib, heldout_tokens=n_held)
                del model
                print(row, flush=True)
                write_table(replace_row(out, row, ("within_block", "setting", "method", "percdamp")), out)
    print("\n".join(summary(read_table(out))))


if __name__ == "__main__":
    main()
