"""Layer-wise CHITA as a method of ``prune``: CHITA's block problem in Gram form for models whose X cannot be
stored (language models); the solver: :mod:`chita_minimal.solver.layer_chita`."""

from __future__ import annotations

from dataclasses import dataclass

from chita_minimal.methods.base import register
from chita_minimal.methods.layer_method import LayerMethod
from chita_minimal.solver.layer_chita import chita_layer
from chita_minimal.utils import check_int, check_number


@register
@dataclass
class ChitaLayer(LayerMethod):
    """CHITA on the layer-wise reconstruction problem tr((W − Ŵ)H(W − Ŵ)ᵀ), one decoder block after another:
    a penalty path for the support, CHITA's swap local search, the backsolve of all rows (see the solver).
    swap_rounds: local-search rounds; percdamp: ridge λ = percdamp·mean(diag H); exact: Cholesky backsolve."""

    name = "chita-layer"
    summary = "CHITA on the layer-wise problem (Gram form, no X): penalty path, swap local search, backsolve"
    n_samples: int | None = None
    swap_rounds: int = 1
    percdamp: float = 0.01
    exact: bool = False

    def check(self):
        super().check()
        check_int("swap_rounds", self.swap_rounds, low=0)
        check_number("percdamp", self.percdamp, low=0)

    def prune_layer(self, W, stat, k, pattern):
        Wp, mask, _ = chita_layer(W, stat.to(W.dtype), k, pattern=pattern, swap_rounds=self.swap_rounds,
                                  percdamp=self.percdamp, exact=self.exact)
        return Wp, mask
