"""Layer-wise CHITA against ALPS over calibration seeds: SmolLM2-135M perplexity per setting and seed.

    python bench/llm_seeds.py                                  # 50 / 60 / 70 / 80 % and 2:4, seeds 0 1 2
    python bench/llm_seeds.py --settings 0.6 0.8 --seeds 1 2   # fill in part of the grid

The language-model chapter's protocol (64 calibration windows × 512 tokens of WikiText-2 valid, perplexity on the
first 40 non-overlapping 512-token test windows, every linear map of the decoder blocks pruned) with the
calibration windows drawn with each seed. One calibration set gives one number per method, and the pipeline is
sequential: a weight kept or pruned in an early block changes the inputs of every later block, so two solvers
whose layer errors differ by 1–2 % can trade places from one calibration draw to the next. The mean over seeds is
the comparison that does not hinge on one draw.

Rows are written to data/bench/llm_seeds.csv after every run; rows of the same (driver mode, setting, seed, method)
already there are replaced and the others kept, so the grid can be filled in parts. At the end, per driver mode and
setting: mean, min and max perplexity of each method over the seeds in the file, the ratio of the means and on how
many seeds CHITA is lower. ``within_block``: "true sequential" (the driver's mode: each linear map on the outputs of
the pruned maps before it in its block) or "one pass" (rows measured before, every map of a block on one pass).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DRIVER_MODE, read_table, replace_row, smollm2_wikitext, write_table  # noqa: E402

METHODS = {"alps": "ALPS", "chita-layer": "CHITA (layer-wise)"}
OUT = Path(__file__).resolve().parents[1] / "data" / "bench" / "llm_seeds.csv"
ORDER = {"0.5": 0, "0.6": 1, "0.7": 2, "0.8": 3, "2:4": 4}


def write(rows: list[dict], path: Path) -> None:
    """Write the rows by setting (in the chapter's order), seed and method."""
    write_table(sorted(rows, key=lambda r: (r["within_block"], ORDER.get(r["setting"], 9), r["setting"],
                                            int(r["seed"]), r["method"])), path)


def summary(rows: list[dict]) -> list[str]:
    """Per driver mode and setting: mean [min, max] perplexity per method, ratio of means CHITA/ALPS, seeds where
    CHITA is lower."""
    lines = [f"{'within block':<16} {'setting':<8} {'seeds':<8} {'ALPS mean [min, max]':<26} "
             f"{'CHITA mean [min, max]':<26} {'CHITA/ALPS':>10} {'CHITA lower':>12}"]
    for mode, setting in dict.fromkeys((r["within_block"], r["setting"]) for r in rows):
        by = {(r["method"], r["seed"]): float(r["perplexity"]) for r in rows
              if (r["within_block"], r["setting"]) == (mode, setting)}
        seeds = sorted({s for (_, s) in by if ("alps", s) in by and ("chita-layer", s) in by}, key=int)
        if not seeds:
            continue
        a = [by["alps", s] for s in seeds]
        c = [by["chita-layer", s] for s in seeds]
        mean_a, mean_c = sum(a) / len(a), sum(c) / len(c)
        lower = sum(ci < ai for ci, ai in zip(c, a))
        lines.append(f"{mode:<16} {setting:<8} {','.join(seeds):<8} {mean_a:>8.2f} [{min(a):.2f}, {max(a):.2f}]{'':<4} "
                     f"{mean_c:>8.2f} [{min(c):.2f}, {max(c):.2f}]{'':<4} {mean_c / mean_a:>10.3f} "
                     f"{lower:>6} of {len(seeds)}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=["0.5", "0.6", "0.7", "0.8", "2:4"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--eval", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    out = Path(a.out)

    import torch

    import chita_minimal as cm
    from chita_minimal.data.text import token_windows
    from chita_minimal.network.language import perplexity
    from chita_minimal.network.sequential import block_layers

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dense, tok, valid, test = smollm2_wikitext(a.eval, a.length)
    names = [n for layers in block_layers(dense) for n in layers]
    for setting in a.settings:
        sparsity, pattern = (0.5, setting) if ":" in setting else (float(setting), None)
        for seed in a.seeds:
            calib = token_windows(valid, tok, a.windows, a.length, seed=seed)
            for method in a.methods:
                model = copy.deepcopy(dense)
                t = time.perf_counter()
                cm.prune(model, calib, sparsity, method, pattern=pattern, names=names)
                seconds = time.perf_counter() - t
                row = dict(within_block=DRIVER_MODE, setting=setting, seed=str(seed), method=method,
                           perplexity=round(perplexity(model, test), 4), seconds=round(seconds, 1),
                           threads=torch.get_num_threads(), windows=a.windows, length=a.length, eval_windows=a.eval)
                del model
                print(row, flush=True)
                write(replace_row(out, row, ("within_block", "setting", "seed", "method")), out)
    print("\n".join(summary(read_table(out))))


if __name__ == "__main__":
    main()
