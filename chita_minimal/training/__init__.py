"""Sparsity during training: gradual pruning with fine-tuning, RigL, L0 gates, GaP, EarlyCroP.

| module | what |
|---|---|
| ``gradual`` | prune → fine-tune → repeat on a schedule (the paper's §5), resumable checkpoints |
| ``sparse_training`` | RigL, L0 hard-concrete gates, uniform/ERK layer-wise densities (GaP uses them too) |
| ``gap`` | GaP: scheduled grow-and-prune over layer partitions |
| ``earlycrop`` | EarlyCroP: early pruning by gradient-flow saliency, unstructured or channels |

Every entry point returns a :class:`chita_minimal.report.Report` (``GradualResult``,
``SparseTrainResult``, ``EarlyCropResult``): ``stages`` holds the per-stage / per-update history.
"""

from chita_minimal.utils import lazy_submodules

__getattr__ = lazy_submodules(__name__, ("gradual", "sparse_training", "gap", "earlycrop"))
