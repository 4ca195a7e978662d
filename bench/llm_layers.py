"""SparseGPT, ALPS and layer-wise CHITA on the same layer problems of SmolLM2-135M: error and time per layer.

    python bench/llm_layers.py                              # blocks 0 6 12 18 24 29, 50 / 70 / 80 % and 2:4
    python bench/llm_layers.py --blocks 0 --settings 0.8

The chapter compares the methods end to end: each prunes the model block after block on the outputs of its *own*
pruned prefix, so a layer's error there mixes the solver with everything upstream. Here every solver gets the same
inputs — the Grams of the dense model's decoder blocks on 64 × 512 calibration tokens drawn (seed 0) from the first
80 % of WikiText-2 valid — and is judged on the objective it minimises (damped, scaled by the pruned-to-zero error)
and on the undamped relative error f(Ŵ)/f(0) on the calibration Gram and on a held-out Gram (the first 40
non-overlapping 512-token windows of the last 20 % of valid). Solve time per setting as a ratio to SparseGPT's,
measured in this one run. Rows (one per setting and method) in data/bench/llm_layers.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import smollm2_wikitext, split_valid, write_table  # noqa: E402

METHODS = ["sparsegpt", "alps", "chita-layer"]
OUT = Path(__file__).resolve().parents[1] / "data" / "bench" / "llm_layers.csv"


def dense_grams(model, windows, blocks):
    """{weight name: (W, H)} on the dense model for the linear maps of ``blocks`` (H = XᵀX/N of the map's input)."""
    import torch

    from chita_minimal.network.language import decoder_blocks, stack_windows, weight_matrix
    from chita_minimal.network.sequential import block_layers, block_statistics, capture_inputs, run_block

    per_block = block_layers(model)
    _, dec = decoder_blocks(model)
    inputs = capture_inputs(model, stack_windows(windows), 8, torch.device("cpu"))
    out = {}
    for i in range(max(blocks) + 1):
        if i in blocks:
            stats = block_statistics(dec[i], inputs, per_block[i], "gram")
            out.update({n: (weight_matrix(m).detach().float(), stats.pop(n).float()) for n, m in per_block[i].items()})
        if i < max(blocks):
            inputs = run_block(dec[i], inputs)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", nargs="+", type=int, default=[0, 6, 12, 18, 24, 29])
    ap.add_argument("--settings", nargs="+", default=["0.5", "0.7", "0.8", "2:4"])
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()

    import torch

    import chita_minimal as cm
    from chita_minimal.solver.layer import damp, layer_error
    from chita_minimal.solver.problem import num_kept

    torch.manual_seed(0)
    model, tok, valid, _ = smollm2_wikitext(None, 512)
    calib_windows, held_windows, _, _ = split_valid(valid, tok, 64, 40, 512)
    calib = dense_grams(model, calib_windows, set(a.blocks))
    held = dense_grams(model, held_windows, set(a.blocks))
    # per layer: the Grams each error is measured on (damped with the solvers' default ridge, calibration, held
    # out) and the error of the all-zero layer on each, computed once for every setting and method
    refs = {}
    for layer, (W, H) in calib.items():
        grams = (damp(H.double(), 0.01).float(), H, held[layer][1])
        refs[layer] = [(G, layer_error(W, torch.zeros_like(W), G)) for G in grams]
    methods = {name: cm.methods.get(name) for name in METHODS}
    rows = []
    for setting in a.settings:
        pattern = setting if ":" in setting else None
        res = {}
        for name, method in methods.items():
            seconds, err = 0.0, []
            for layer, (W, H) in calib.items():
                k = None if pattern else num_kept(float(setting), W.numel())
                t = time.perf_counter()
                Wp, mask = method.prune_layer(W, H, k, pattern)
                seconds += time.perf_counter() - t
                Wp = Wp * mask
                err.append([layer_error(W, Wp, G) / base for G, base in refs[layer]])
            res[name] = (seconds, torch.tensor(err, dtype=torch.float64))
        for name, (seconds, err) in res.items():
            vs_alps = err / res["alps"][1]
            rows.append(dict(setting=setting, method=name, layers=len(err), seconds=round(seconds, 2),
                             time_vs_sparsegpt=round(seconds / res["sparsegpt"][0], 3),
                             damped_objective=round(float(err[:, 0].sum()), 5),
                             calib_error=round(float(err[:, 1].sum()), 5),
                             heldout_error=round(float(err[:, 2].sum()), 5),
                             median_damped_vs_alps=round(float(vs_alps[:, 0].median()), 4),
                             median_heldout_vs_alps=round(float(vs_alps[:, 2].median()), 4),
                             lower_than_alps_damped=int((vs_alps[:, 0] < 1).sum()),
                             lower_than_alps_heldout=int((vs_alps[:, 2] < 1).sum())))
            print(rows[-1], flush=True)
    write_table(rows, a.out)


if __name__ == "__main__":
    main()
