"""ALPS (Meng et al., NeurIPS 2024) as a layer-wise method of ``prune``; the solver: :mod:`chita_minimal.solver.alps`."""

from __future__ import annotations

from dataclasses import dataclass

from chita_minimal.methods.base import register
from chita_minimal.methods.layer_method import LayerMethod
from chita_minimal.solver.alps import alps
from chita_minimal.utils import check_int, check_number


@register
@dataclass
class ALPS(LayerMethod):
    """ALPS: ADMM with a top-k (or N:M) projection and a growing penalty, then a conjugate-gradient refit on the
    support (Alg 1 of the paper). rho: the initial penalty; max_iter: ADMM iterations at most; cg_iters: refit
    steps; percdamp: ridge λ = percdamp·mean(diag H)."""

    name = "alps"
    summary = "ALPS: ADMM on the layer-wise problem with a growing penalty, then a CG refit (CHITA authors, 2024)"
    n_samples: int | None = None
    rho: float = 0.1
    max_iter: int = 300
    cg_iters: int = 10
    percdamp: float = 0.01

    def check(self):
        super().check()
        check_number("rho", self.rho, low=0, low_open=True)
        check_int("max_iter", self.max_iter)
        check_int("cg_iters", self.cg_iters, low=0)
        check_number("percdamp", self.percdamp, low=0)

    def prune_layer(self, W, stat, k, pattern):
        Wp, mask, _ = alps(W, stat.to(W.dtype), k, pattern=pattern, rho=self.rho, max_iter=self.max_iter,
                           cg_iters=self.cg_iters, percdamp=self.percdamp)
        return Wp, mask
