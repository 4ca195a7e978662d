"""chita_minimal: CHITA one-shot pruning (Benbaki et al., ICML 2023) in compact torch code.

Five lines from a trained model to a pruned one::

    import chita_minimal as cm
    model = cm.models.load_pretrained("mlpnet")
    report = cm.prune(model, cm.data.load("mnist", "train"), sparsity=0.9)
    print(cm.evaluate(model, cm.data.load("mnist", "test")))

The package, one folder per layer (data flows down the list; each layer imports only the ones above it):

| folder | what |
|---|---|
| ``solver/`` | problem (P) and CHITA's solvers (Alg 2–6), N:M patterns, CHITA++ schedules: tensors only |
| ``network/`` | prunable parameters, per-sample gradients (Fisher), evaluation, measurement, fine-tuning |
| ``methods/`` | the method registry and one module per pruning method: CHITA variants, MP, WF, M-FAC, CBS, saliency, SparseGPT |
| ``prune.py`` | ``prune(model, data, sparsity, method=...)``: the one entry point; ``report.py``: what it returns |
| ``storage.py`` | ``save_pruned`` / ``load_pruned``: weights, masks and report in safetensors |
| ``structure/`` | channels really removed, channel scores, low rank, quantization |
| ``training/`` | gradual pruning, RigL, L0, GaP, EarlyCroP |
| ``scale/`` | ``torch.distributed`` sharding, streamed block backsolve, ``torchrun`` launcher |
| ``data/``, ``models/`` | datasets and file lookup; the paper's networks and checkpoints (know nothing of pruning) |
"""

import importlib
import warnings

from chita_minimal import data, methods, models, network, scale, solver, structure, training
from chita_minimal.network.evaluate import evaluate, recalibrate_bn
from chita_minimal.network.finetune import train_epochs
from chita_minimal.network.fisher import gradients
from chita_minimal.network.params import MaskKeeper
from chita_minimal.prune import prune
from chita_minimal.report import PruneReport, Report
from chita_minimal.solver.problem import Problem, num_kept
from chita_minimal.solver.schedules import SCHEDULES, schedule
from chita_minimal.solver.solve import METHODS, SolveResult, solve
from chita_minimal.solver.threshold import hard_threshold
from chita_minimal.storage import LoadedModel, load_pruned, save_pruned
from chita_minimal.training.gradual import GradualResult, gradual
from chita_minimal.utils import device, seed_everything

__version__ = "0.1.0"

__all__ = ["data", "methods", "models", "network", "scale", "solver", "structure", "training",
           "evaluate", "recalibrate_bn", "train_epochs", "gradients", "MaskKeeper", "PruneReport", "Report",
           "prune", "hard_threshold", "Problem", "num_kept", "SCHEDULES", "schedule", "METHODS", "SolveResult",
           "solve", "GradualResult", "gradual", "device", "seed_everything", "save_pruned", "load_pruned", "LoadedModel",
           "shrink"]

# Module paths before the package was arranged in layers (0.1): ``cm.fisher`` still works for one release.
_MOVED = {"problem": "solver.problem", "iht": "solver.iht", "active_set": "solver.active_set",
          "backsolve": "solver.backsolve", "blocks": "solver.blocks", "patterns": "solver.patterns",
          "schedules": "solver.schedules", "params": "network.params", "fisher": "network.fisher",
          "measure": "network.measure", "train": "network.finetune", "saliency": "methods.saliency",
          "layerwise": "methods.layerwise", "structured": "structure.channels", "sosp": "structure.sosp",
          "spectral": "structure.spectral", "ispasp": "structure.ispasp", "smcp": "structure.smcp",
          "lowrank": "structure.lowrank", "quantize": "structure.quantize",
          "sparse_training": "training.sparse_training", "gap": "training.gap", "earlycrop": "training.earlycrop",
          "distributed": "scale.distributed", "streaming": "scale.streaming", "launch": "scale.launch",
          "imagenet": "data.imagenet"}


# Imported on first use (they pull in Torch-Pruning): cm.shrink is structure.methods.shrink
_LAZY = {"shrink": "structure.methods"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"chita_minimal.{_LAZY[name]}"), name)
    if name in _MOVED:
        new = f"chita_minimal.{_MOVED[name]}"
        warnings.warn(f"chita_minimal.{name} moved to {new}; the old name goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)
    raise AttributeError(f"module 'chita_minimal' has no attribute {name!r}")
