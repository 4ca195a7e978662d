"""ResNet20 on CIFAR-10, gradual pruning to 90 %: CHITA (block backsolve) vs gradual magnitude pruning.

The full-length version of the gradual chapter's ResNet20 experiment (``book/gradual.ipynb``),
for a machine with a GPU: all 50,000 training images with the standard augmentation; the cubic
(Zhu & Gupta) sparsity schedule from 50 % (ResNet20 loses little at 50 %, so no stage is spent
near the dense network); CHITA-block with l2 = 1e-3, the block backsolve's validation choice at
0.9 in the ResNet20 chapter; SGD with a cosine learning rate within every stage and a longer final
stage; the same recipe and number of epochs for every method. The schedule is the longest
in ``SCHEDULES`` that the time budget allows, judged from a short timing of training steps and
of one CHITA pruning step on this device (pass ``--schedule`` to fix it instead). Results go to
``<out>/gradual_resnet20.csv`` (one row per method) and ``<out>/gradual_resnet20_history.csv``
(one row per stage), with the device, versions and timings in ``<out>/gradual_resnet20.json``.

    python scripts/gradual_resnet20.py --out data/results            # CUDA if present
    python scripts/gradual_resnet20.py --quick --device cpu           # a minute-long smoke run

Method order: CHITA gradual, MP gradual (the comparison at equal epochs), then one-shot pruning
followed by the same number of fine-tuning epochs for both, while the budget lasts.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import chita_minimal as cm
from chita_minimal.network.evaluate import cifar_augment

# (stages, epochs per stage, final epochs): total epochs = stages * epochs + final.
SCHEDULES = {
    "100": (10, 8, 20),
    "70": (10, 6, 10),
    "50": (8, 5, 10),
    "30": (6, 4, 6),
    "20": (5, 4, 0),
    "quick": (2, 1, 0),
}
RECIPE = dict(sparsity=0.9, lr=0.1, lr_end=0.0, batch_size=256, momentum=0.9, weight_decay=5e-4,
              n_grads=1000, l2=1e-3, block_size=500, schedule="poly", base=0.5)
QUICK_N_GRADS = 64  # --quick: gradient rows per CHITA step (the rest of the recipe as above)
QUICK_IMAGES = 512  # --quick: training and test images
METHODS = [  # label, pruning method, gradual?
    ("CHITA gradual", "chita-block", True),
    ("MP gradual", "mp", True),
    ("CHITA one-shot + FT", "chita-block", False),
    ("MP one-shot + FT", "mp", False),
]


def total_epochs(plan) -> int:
    stages, epochs, final = plan
    return stages * epochs + final


def run_method(label, method, gradual, plan, train, test, device, checkpoints, seed=0, recipe=RECIPE):
    """One method of the comparison: returns its summary row and its per-stage history."""
    stages, epochs, final = plan
    model = cm.models.load_pretrained("resnet20", device=device)
    if not gradual:  # one shot to the final sparsity, then as many epochs as the gradual runs
        stages, epochs, final = 1, total_epochs(plan), 0
    t0 = time.perf_counter()
    res = cm.gradual(model, train, recipe["sparsity"], method=method, stages=stages, schedule=recipe["schedule"],
                     base=recipe["base"], epochs_per_stage=epochs, final_epochs=final, lr=recipe["lr"],
                     lr_end=recipe["lr_end"], batch_size=recipe["batch_size"], momentum=recipe["momentum"],
                     weight_decay=recipe["weight_decay"], augment=cifar_augment, n_grads=recipe["n_grads"],
                     l2=recipe["l2"], prune_options=None if method == "mp" else {"block_size": recipe["block_size"]},
                     eval_data=test, checkpoint=checkpoints / label.replace(" ", "_").replace("+", ""), seed=seed,
                     progress=False)
    row = dict(network="resnet20", method=label, sparsity=recipe["sparsity"], epochs=total_epochs(plan),
               accuracy=round(res.final_accuracy, 2), achieved_sparsity=round(res.achieved, 4),
               seconds=round(time.perf_counter() - t0, 1))
    history = [dict(method=label, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()
                                     if k != "method"}) for h in res.stages]
    return row, history


def seconds_per_epoch(train, device, steps: int = 12, recipe=RECIPE) -> float:
    """Time ``steps`` SGD steps (after a warm-up of the same size) and scale to one epoch of ``train``."""
    model = cm.models.load_pretrained("resnet20", device=device)
    n = min(len(train), steps * recipe["batch_size"])
    part = TensorDataset(train.tensors[0][:n], train.tensors[1][:n])
    kw = dict(lr=0.01, batch_size=recipe["batch_size"], augment=cifar_augment, progress=False)
    cm.train_epochs(model, part, 1, **kw)  # warm-up (kernel selection, allocator)
    return cm.network.measure.measure(cm.train_epochs, model, part, 1, device=device, **kw).seconds * len(train) / n


def seconds_per_prune(train, device, recipe=RECIPE) -> float:
    """Time one CHITA block-backsolve pruning step of the dense network (the warm one of two)."""
    kw = dict(n_grads=recipe["n_grads"], l2=recipe["l2"], block_size=recipe["block_size"], seed=0)
    for _ in range(2):
        model = cm.models.load_pretrained("resnet20", device=device)
        timed = cm.network.measure.measure(cm.prune, model, train, 0.5, "chita-block", device=device, **kw)
    return timed.seconds


def estimate(plan, epoch_s: float, prune_s: float, eval_s: float, gradual: bool, chita: bool) -> float:
    """Seconds one method is expected to take (training, pruning steps, two evaluations per stage)."""
    stages = plan[0] if gradual else 1
    return total_epochs(plan) * epoch_s + stages * (prune_s * chita + 2 * eval_s)


def write_csv(rows, path: Path) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="torch device (default: CUDA when available)")
    ap.add_argument("--out", default="data/results", help="folder for the CSV/JSON results")
    ap.add_argument("--checkpoints", default="_build/checkpoints/gradual_resnet20",
                    help="folder for the per-stage checkpoints (a rerun resumes from them)")
    ap.add_argument("--budget", type=float, default=7200.0, help="seconds this run may take (chooses the schedule)")
    ap.add_argument("--schedule", choices=sorted(SCHEDULES), default=None, help="fix the schedule instead")
    ap.add_argument("--quick", action="store_true",
                    help="512 training and test images, the 'quick' schedule, 64 gradients per CHITA step")
    ap.add_argument("--seed", type=int, default=0, help="seed of the pruning steps' samples and of the batches")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    cm.seed_everything(0)
    device = cm.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gradual_resnet20" + ("_quick" if args.quick else "")
    recipe = dict(RECIPE, n_grads=QUICK_N_GRADS) if args.quick else RECIPE
    train, test = cm.data.load("cifar10", "train"), cm.data.load("cifar10", "test")
    if args.quick:
        train, test = cm.data.subset(train, QUICK_IMAGES, seed=0), cm.data.subset(test, QUICK_IMAGES, seed=0)
    if device.type == "cuda":  # the whole data set fits on the GPU: batches are gathered there
        train = TensorDataset(*(t.to(device) for t in train.tensors))
        test = TensorDataset(*(t.to(device) for t in test.tensors))

    dense_model = cm.models.load_pretrained("resnet20", device=device)
    dense = 100 * cm.evaluate(dense_model, test)  # also the warm-up of the timing below
    eval_s = cm.network.measure.measure(cm.evaluate, dense_model, test, device=device).seconds
    epoch_s = seconds_per_epoch(train, device, recipe=recipe)
    prune_s = seconds_per_prune(train, device, recipe=recipe)
    spent = time.perf_counter() - t_start
    need = {name: sum(estimate(plan, epoch_s, prune_s, eval_s, g, m != "mp") for _, m, g in METHODS[:2])
            for name, plan in SCHEDULES.items()}
    if args.quick:
        name = "quick"
    elif args.schedule:
        name = args.schedule
    else:  # the longest schedule whose two gradual runs fit in the budget with a 15 % margin
        fits = [n for n in SCHEDULES if n != "quick" and 1.15 * need[n] <= args.budget - spent]
        name = max(fits, key=lambda n: total_epochs(SCHEDULES[n])) if fits else "20"
    plan = SCHEDULES[name]
    print(f"device {device} | dense {dense:.2f} % | {epoch_s:.2f} s/epoch, {prune_s:.2f} s/CHITA step, "
          f"{eval_s:.2f} s/eval | schedule {name}: {plan[0]} stages x {plan[1]} epochs + {plan[2]} final "
          f"= {total_epochs(plan)} epochs (two gradual runs estimated {need[name]:.0f} s)", flush=True)

    meta = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
                platform.processor() or platform.machine(), torch=torch.__version__,
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                train_images=len(train), test_images=len(test), dense_accuracy=round(dense, 2),
                schedule=name, stages=plan[0], epochs_per_stage=plan[1], final_epochs=plan[2],
                total_epochs=total_epochs(plan), recipe=recipe, seconds_per_epoch=round(epoch_s, 2),
                seconds_per_chita_step=round(prune_s, 2), seconds_per_eval=round(eval_s, 3), budget=args.budget,
                seed=args.seed)
    rows, history = [], []
    for label, method, gradual in METHODS:
        left = args.budget - (time.perf_counter() - t_start)
        guess = estimate(plan, epoch_s, prune_s, eval_s, gradual, method != "mp")
        if len(rows) >= 2 and 1.1 * guess > left:  # the first two always run: they are the comparison
            print(f"skipped {label}: about {guess:.0f} s needed, {left:.0f} s left", flush=True)
            continue
        row, hist = run_method(label, method, gradual, plan, train, test, device,
                               Path(args.checkpoints) / f"{name}_seed{args.seed}", seed=args.seed, recipe=recipe)
        row.update(dense=round(dense, 2), seed=args.seed)
        rows.append(row)
        history += hist
        print(f"{label}: {row['accuracy']:.2f} % after {row['epochs']} epochs ({row['seconds']:.0f} s)", flush=True)
        write_csv(rows, out / f"{stem}.csv")  # after every method: an interrupted run keeps what finished
        write_csv(history, out / f"{stem}_history.csv")
        meta["seconds"] = round(time.perf_counter() - t_start, 1)
        (out / f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out / stem}.csv, _history.csv, .json in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
