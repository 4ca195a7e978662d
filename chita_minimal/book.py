"""Helpers the book's chapters share: written once, in the chapter that introduces them, imported by the others.

The idea is d2l's: a cell that several chapters need lives here instead of being redefined in each of
them, and each docstring names the chapter that introduced it. The chapters import the module as::

    import chita_minimal.book as bk

These helpers serve the book's experiments (fresh pretrained copies, accuracy in percent, the tuned
``l2``); they are not part of the pruning method, and no other module of the package imports this one.
Helpers that differ between chapters (what a run scores, how ``l2`` is chosen) stay in their chapters.
"""

from __future__ import annotations

import time

import torch.nn as nn
from torch.utils.data import Dataset

from chita_minimal.models import load_pretrained
from chita_minimal.network.evaluate import evaluate, recalibrate_bn
from chita_minimal.prune import prune
from chita_minimal.report import PruneReport

__all__ = ["prune_fresh", "accuracy", "recalibrated_accuracy", "l2_for"]


def prune_fresh(arch: str, data: Dataset, sparsity: float, method, *, device=None, sparsity_tol: float | None = 1e-3,
                **options) -> tuple[nn.Module, PruneReport, float]:
    """Prune a fresh copy of the pretrained ``arch`` with ``cm.prune``; return ``(model, report, seconds)``.

    Each call loads the checkpoint again (``load_pretrained(arch, device=device)``), so no run sees another's
    changes; ``seconds`` is the wall time of the ``prune`` call alone (the load is not timed). ``options`` go to
    ``prune`` unchanged (``n_grads``, ``l2``, ``seed``, the method's own options). With ``sparsity_tol`` set,
    the achieved sparsity must lie within it of ``sparsity`` (an ``AssertionError`` otherwise).

    Introduced in the MLPNet chapter (``book/mlpnet.ipynb``, inside ``prune_and_score``); also used by the
    ResNet20, ResNet20-at-high-sparsity and CHITA++ chapters.
    """
    model = load_pretrained(arch, device=device)
    t0 = time.perf_counter()
    report = prune(model, data, sparsity, method, **options)
    seconds = time.perf_counter() - t0
    if sparsity_tol is not None:
        assert abs(report.achieved_sparsity - sparsity) < sparsity_tol, report.achieved_sparsity
    return model, report, seconds


def accuracy(model: nn.Module, data: Dataset, *, batch_size: int = 100) -> float:
    """Top-1 accuracy of ``model`` on ``data`` in percent (``100 * cm.evaluate``), BatchNorm as it is.

    Batches of 100 images: on a 2-core CPU they run about 3x faster than 1000 for ResNet20 (cache).

    Introduced in the ResNet20 chapter (``book/resnet20.ipynb``); also used by the ResNet20-at-high-sparsity,
    peers and structured chapters.
    """
    return 100 * evaluate(model, data, batch_size=batch_size)


def recalibrated_accuracy(model: nn.Module, data: Dataset, recal_set: Dataset, *, batch_size: int = 100) -> float:
    """:func:`accuracy` in percent after re-estimating every BatchNorm layer's statistics on ``recal_set``.

    The recalibration is exact (``cm.recalibrate_bn(..., exact=True)``: the cumulative average over one pass
    in batches of ``batch_size``, shuffled with seed 0) and stays in the model: it is modified in place.

    Introduced in the ResNet20 chapter (``book/resnet20.ipynb``, the ``accuracy_bn_recal`` column); also used
    by the ResNet20-at-high-sparsity, peers and structured chapters.
    """
    recalibrate_bn(model, recal_set, batch_size=batch_size, seed=0, exact=True)
    return accuracy(model, data, batch_size=batch_size)


def l2_for(chosen: dict, label: str, sparsity: float) -> float:
    """The ``l2`` tuned on validation for method ``label`` at ``sparsity``; 0.0 for ``"MP"`` (no ``l2``).

    ``chosen`` maps ``(label, tuning sparsity)`` to the chosen value. A sparsity that was tuned uses its own
    value; any other uses the value of the smallest tuning sparsity above it (of the largest, when none is
    above).

    Introduced in the MLPNet chapter (``book/mlpnet.ipynb``); also used by the ResNet20 chapter.
    """
    if label == "MP":
        return 0.0
    tuned_at = [s for lab, s in chosen if lab == label]
    if not tuned_at:
        raise KeyError(f"no l2 was chosen for {label!r}")
    s_ref = min([t for t in tuned_at if t >= sparsity - 1e-12], default=max(tuned_at))
    return chosen[(label, s_ref)]
