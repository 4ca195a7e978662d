"""chita_minimal: CHITA one-shot pruning (Benbaki et al., ICML 2023) in compact torch code.

Five lines from a trained model to a pruned one::

    import chita_minimal as cm
    model = cm.models.load_pretrained("mlpnet")
    report = cm.prune(model, cm.data.load("mnist", "train"), sparsity=0.9)
    print(cm.evaluate(model, cm.data.load("mnist", "test")))
"""

from . import (baselines, data, fisher, imagenet, layerwise, lowrank, measure, models, params, patterns, quantize,
               saliency, sosp, sparse_training, streaming, structured, train)
from .evaluate import evaluate, recalibrate_bn
from .fisher import gradients
from .train import GradualResult, gradual, train_epochs
from .iht import hard_threshold
from .params import MaskKeeper
from .problem import Problem, num_kept
from .prune import PRUNE_METHODS, PruneReport, prune
from .schedules import SCHEDULES, schedule
from .solve import METHODS, SolveResult, solve
from .utils import device, seed_everything

__version__ = "0.1.0"

__all__ = ["baselines", "data", "fisher", "imagenet", "layerwise", "lowrank", "measure", "models", "patterns", "quantize",
           "saliency", "sosp", "structured",
           "sparse_training", "streaming", "train", "params", "evaluate", "recalibrate_bn", "gradients", "gradual", "GradualResult", "train_epochs",
           "hard_threshold", "MaskKeeper", "Problem", "num_kept", "PRUNE_METHODS", "PruneReport", "prune",
           "SCHEDULES", "schedule", "METHODS", "SolveResult", "solve", "device", "seed_everything"]
