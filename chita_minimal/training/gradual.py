"""Gradual pruning: prune, fine-tune with the masks fixed, repeat (the paper's §5, Zhu & Gupta 2017).

    result = gradual(model, train, 0.9, method="chita-block", stages=5, epochs_per_stage=2,
                     eval_data=test, checkpoint="runs/resnet20_chita")

Stage t prunes the current network to the t-th sparsity of a schedule (default the cubic
``poly`` schedule of Zhu & Gupta), keeping every weight pruned earlier at zero, then trains
it with SGD for ``epochs_per_stage`` epochs while :class:`~chita_minimal.network.params.MaskKeeper`
holds the pruned weights at zero. With ``checkpoint`` a file is written after every stage,
and a rerun with the same arguments resumes after the last finished stage. Under
``torch.distributed`` the gradients and solves are sharded (see :mod:`chita_minimal.scale.distributed`)
and fine-tuning uses ``DistributedDataParallel``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from chita_minimal.network.evaluate import evaluate
from chita_minimal.network.finetune import train_epochs
from chita_minimal.prune import prune
from chita_minimal.report import Report
from chita_minimal.scale import distributed
from chita_minimal.solver.schedules import schedule as make_schedule


@dataclass(kw_only=True)
class GradualResult(Report):
    """What :func:`gradual` did (a :class:`~chita_minimal.report.Report`).

    method: the pruning step's method; target: the final ``sparsity`` asked; achieved: the sparsity
    measured after the last pruning step (fine-tuning keeps the pruned weights at zero); masks: the
    final masks; seconds: {"total"}, the wall time of this call; stages: one dict per stage (stage,
    sparsity, method, achieved_sparsity, prune_seconds, resumed, epochs, train_loss, seconds and, with
    ``eval_data``, accuracy_pruned and accuracy). ``history`` is the old name of ``stages``.
    """

    @property
    def history(self) -> list[dict]:
        return self.stages

    @property
    def final_accuracy(self) -> float | None:
        return self.stages[-1].get("accuracy") if self.stages else None

    def _extra_lines(self) -> list[str]:
        lines = [f"  {'stage':>5}  {'sparsity':>8}  {'achieved':>8}  {'acc. pruned':>11}  {'acc. tuned':>10}  "
                 f"{'epochs':>6}  {'seconds':>8}"]
        for h in self.stages:
            acc = [("–" if h.get(k) is None else f"{h[k]:.2f}") for k in ("accuracy_pruned", "accuracy")]
            lines.append(f"  {h['stage']:>5}  {h['sparsity']:>8.4f}  {h['achieved_sparsity']:>8.4f}  {acc[0]:>11}  "
                         f"{acc[1]:>10}  {h.get('epochs', 0):>6}  {h.get('seconds', 0.0):>8.1f}"
                         + ("  (resumed)" if h.get("resumed") else ""))
        return lines


def gradual(model: nn.Module, train, sparsity: float, *, method: str = "chita-block", stages: int = 5,
            schedule: str = "poly", base: float = 0.0, epochs_per_stage: int = 1, final_epochs: int = 0,
            lr: float = 0.01, lr_end: float = 0.0, batch_size: int = 128, momentum: float = 0.9,
            weight_decay: float = 5e-4, augment=None, n_grads: int = 1000, l2: float = 1e-3,
            prune_options: dict | None = None, eval_data=None, checkpoint=None, seed: int = 0,
            progress: bool = True) -> GradualResult:
    """Prune ``model`` gradually to ``sparsity`` with fine-tuning between the pruning steps.

    Args:
        method: the pruning step (any :func:`chita_minimal.prune` method; "chita-block" is the
            paper's choice for large networks, "mp" gives gradual magnitude pruning).
        stages, schedule, base: the sparsity targets, :func:`chita_minimal.schedule`
            (default: Zhu & Gupta's cubic schedule from ``base`` = 0). ``stages=1`` is
            one-shot pruning followed by fine-tuning.
        epochs_per_stage: SGD epochs after each pruning step; ``final_epochs`` more after the last.
        lr, lr_end, batch_size, momentum, weight_decay, augment: fine-tuning (see :func:`train_epochs`;
            the cosine schedule restarts at ``lr`` in every stage).
        n_grads, l2, prune_options: passed to :func:`chita_minimal.prune` (seed + stage as its seed).
        eval_data: if given, accuracy after pruning and after fine-tuning is recorded per stage.
        checkpoint: a directory; ``gradual.pt`` there holds the model, masks and history after
            each stage, and a rerun with the same arguments resumes from it.
    """
    if method == "chita++":
        raise ValueError("method 'chita++' is itself multi-stage; use its stage solver, e.g. method='chita-block'")
    targets = make_schedule(schedule, sparsity, stages, base)
    config = dict(sparsity=float(sparsity), method=method, stages=stages, schedule=schedule, base=float(base),
                  epochs_per_stage=epochs_per_stage, final_epochs=final_epochs, lr=float(lr), lr_end=float(lr_end),
                  batch_size=batch_size, momentum=float(momentum), weight_decay=float(weight_decay),
                  n_grads=n_grads, l2=float(l2), seed=seed)
    rank, _ = distributed.rank_and_world()
    path = None if checkpoint is None else Path(checkpoint) / "gradual.pt"
    history, masks, first = [], None, 0
    if path is not None and path.exists():
        state = torch.load(path, weights_only=True, map_location=next(model.parameters()).device)
        changed = [k for k in config if state["config"].get(k) != config[k]]
        if changed:
            raise ValueError(f"checkpoint {path} was written with different arguments: "
                             + ", ".join(f"{k} = {state['config'].get(k)!r} there, {config[k]!r} now" for k in changed)
                             + "; use another checkpoint directory or delete the file")
        model.load_state_dict(state["model"])
        history, masks = state["history"], state["masks"]
        first = len(history)
        for h in history:
            h["resumed"] = True
    t_all = time.perf_counter()
    for t in range(first, stages):
        t0 = time.perf_counter()
        report = prune(model, train, targets[t], method, n_grads=n_grads, l2=l2, seed=seed + t, keep_pruned=True,
                       **(prune_options or {}))
        masks = report.masks
        row = dict(stage=t, sparsity=targets[t], method=method, achieved_sparsity=report.achieved_sparsity,
                   prune_seconds=report.seconds["total"], resumed=False)
        if eval_data is not None:
            row["accuracy_pruned"] = 100 * evaluate(model, eval_data)
        epochs = epochs_per_stage + (final_epochs if t == stages - 1 else 0)
        losses = train_epochs(model, train, epochs, lr=lr, lr_end=lr_end, batch_size=batch_size, momentum=momentum,
                              weight_decay=weight_decay, masks=masks, augment=augment, seed=seed + 7919 * (t + 1),
                              progress=progress)
        row.update(epochs=epochs, train_loss=losses[-1] if losses else None, seconds=time.perf_counter() - t0)
        if eval_data is not None:
            row["accuracy"] = 100 * evaluate(model, eval_data)
        history.append(row)
        if path is not None and rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(dict(config=config, model=model.state_dict(), masks=masks, history=history), tmp)
            os.replace(tmp, path)  # atomic: an interruption never leaves a half-written checkpoint
    return GradualResult(method=method, target=sparsity,
                         achieved=history[-1]["achieved_sparsity"] if history else float("nan"), masks=masks or {},
                         seconds={"total": time.perf_counter() - t_all}, stages=history)
