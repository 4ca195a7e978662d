"""SparseGPT / OBS layer-wise reconstruction as a method of ``prune`` (the solver: :mod:`chita_minimal.methods.layerwise`).

Unlike CHITA it needs no gradients and no flat problem: every layer is pruned on its own calibration
Hessian H = (2/N) X Xᵀ from n_grads · batch_size forward samples, so it runs the whole call
(a :class:`~chita_minimal.methods.base.ModelMethod`).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from chita_minimal.methods import layerwise
from chita_minimal.methods.base import dataset_size, register
from chita_minimal.methods.layer_method import LayerMethod, has_decoder_blocks
from chita_minimal.network import params
from chita_minimal.report import PruneReport
from chita_minimal.solver.patterns import parse_pattern
from chita_minimal.utils import check_int

DP_GRID = (0.0, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99)  # levels of allocation="dp"
ALLOCATIONS = ("uniform", "dp")


@register
@dataclass
class SparseGPT(LayerMethod):
    """SparseGPT (Frantar & Alistarh 2023): layer-wise OBS reconstruction from calibration samples.

    allocation: "uniform" (the same sparsity in every layer), "dp" (SPDY-like dynamic programming
    over per-layer error tables on ``grid``; the achieved sparsity is then ≥ the target), or a dict
    name → sparsity. block_size, percdamp: of :func:`~chita_minimal.methods.layerwise.sparsegpt_layer`;
    sequential: calibrate each layer on the outputs of the already pruned layers before it.
    n_samples: calibration samples; on a Hugging Face language model (decoder blocks) the sequential driver of every
    layer-wise method runs, block by block and within a block map after map (always sequential), on at most 128
    windows by default; on other models the default is
    n_grads · batch_size (as before the option existed) and ``allocation``/``sequential`` apply.
    """

    name = "sparsegpt"
    summary = "SparseGPT: layer-wise OBS reconstruction from calibration samples (no gradients)"
    takes_pattern = True
    n_samples: int | None = None
    allocation: str | dict = "uniform"
    grid: tuple = DP_GRID
    block_size: int = 128
    percdamp: float = 0.01
    sequential: bool = False

    @classmethod
    def create(cls, **options):
        if "blocksize" in options:
            warnings.warn("option 'blocksize' of method 'sparsegpt' is now 'block_size'", DeprecationWarning,
                          stacklevel=3)
            options["block_size"] = options.pop("blocksize")
        return super().create(**options)

    def check(self):
        super().check()
        check_int("block_size", self.block_size)
        if not isinstance(self.allocation, dict) and self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be {' or '.join(map(repr, ALLOCATIONS))} or a dict name → sparsity, "
                             f"got {self.allocation!r}")

    def prune_layer(self, W, stat, k, pattern):
        sparsity = None if k is None else 1.0 - k / W.numel()  # num_kept(sparsity, numel) == k
        return layerwise.sparsegpt_layer(W, stat.to(W.dtype), sparsity, pattern=pattern, block_size=self.block_size,
                                         percdamp=self.percdamp)

    def prune_model(self, model, data, sparsity, settings) -> PruneReport:
        if has_decoder_blocks(model):
            if self.allocation != "uniform" or self.sequential:
                raise ValueError("on a language model sparsegpt prunes block by block, each linear map on the "
                                 "outputs of the pruned maps before it, with a uniform allocation; allocation and "
                                 "sequential apply to other models")
            return super().prune_model(model, data, sparsity, settings)
        n_samples = self.n_samples or settings.n_grads * settings.batch_size
        pattern = settings.pattern
        size = dataset_size(data)
        if size < n_samples:
            raise ValueError(f"dataset has {size} samples but {n_samples} calibration samples are needed")
        names = params.resolve(model, settings.names) if settings.names is not None else layerwise.supported_weights(model, 'sparsegpt')
        lay = params.layout(model, names)
        original = params.flatten(model, lay)
        allocation = self.allocation
        t0 = time.perf_counter()
        seconds = {"gradients": 0.0}
        try:
            if isinstance(allocation, str) and allocation == "dp":
                if pattern is not None:
                    raise ValueError("allocation='dp' cannot be combined with an N:M pattern")
                t1 = time.perf_counter()
                H = layerwise.calibration_hessians(model, data, n_samples, names=names, device=settings.device,
                                                   seed=settings.seed)
                errors = layerwise.layer_errors(model, data, self.grid, names=names, hessians=H,
                                                block_size=self.block_size, percdamp=self.percdamp)
                allocation = layerwise.allocate(errors, dict(zip(lay.names, lay.numels)), self.grid, sparsity)
                seconds["allocation"] = time.perf_counter() - t1
            rep = layerwise.layerwise_prune(model, data, None if pattern is not None else sparsity,
                                            n_samples=n_samples, names=names, device=settings.device,
                                            seed=settings.seed,
                                            pattern=None if pattern is None else parse_pattern(pattern),
                                            allocation=allocation, block_size=self.block_size,
                                            percdamp=self.percdamp, sequential=self.sequential)
        except BaseException:
            params.write_back(model, lay, original)
            raise
        seconds["gradients"] = rep.seconds["hessians"]  # the calibration passes play the role of the gradients
        seconds["solve"] = rep.seconds["total"] - rep.seconds["hessians"]
        seconds["total"] = time.perf_counter() - t0
        w = params.flatten(model, lay).detach().cpu()
        support = torch.cat([rep.masks[nm].reshape(-1) for nm in lay.names])
        return PruneReport(method=self.name, target=sparsity, achieved=1.0 - int((w != 0).sum()) / lay.p,
                           k=int(support.sum()), p=lay.p, layer_sparsity=params.per_layer_sparsity(lay, w),
                           objective=None, seconds=seconds, masks=params.masks_from(lay, support), l2=0.0,
                           n_grads=n_samples, batch_size=1, seed=settings.seed,
                           dense=params.dense_parameters(model, names),
                           stages=[dict(stage=0, sparsity=sparsity, allocation=allocation
                                        if isinstance(allocation, dict) else "uniform")])
