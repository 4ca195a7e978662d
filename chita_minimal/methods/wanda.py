"""Wanda (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models", 2023) and
magnitude pruning per layer, as layer-wise methods of ``prune`` (solvers: :mod:`chita_minimal.solver.layer`).
"""

from __future__ import annotations

from dataclasses import dataclass

from chita_minimal.methods.base import register
from chita_minimal.methods.layer_method import LayerMethod
from chita_minimal.solver import layer


@register
@dataclass
class Wanda(LayerMethod):
    """Wanda: keep the weights of largest |W_ij|·‖X_j‖₂ within each output row; no weight update (Eq. 1)."""

    name = "wanda"
    summary = "Wanda: weight magnitude times input norm ‖X_j‖, compared within each output row (no weight update)"
    statistic = "norms"
    n_samples: int | None = None

    def prune_layer(self, W, stat, k, pattern):
        return layer.wanda(W, stat, k, pattern=pattern)


@register
@dataclass
class MagnitudeLayer(LayerMethod):
    """Magnitude pruning with the same sparsity in every layer (the layer-wise baseline; "mp" is global)."""

    name = "mp-layer"
    summary = "magnitude pruning, the same sparsity in every layer (no data)"
    statistic = None

    def prune_layer(self, W, stat, k, pattern):
        return layer.magnitude(W, k, pattern=pattern)
