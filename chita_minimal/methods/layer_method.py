"""Layer-wise methods: each says how to prune one weight matrix; one driver runs them over a model.

A :class:`LayerMethod` declares the statistic of its inputs it needs (``statistic``: "gram" → H = XᵀX/N,
"norms" → ‖X_j‖²/N, None → nothing) and implements ``prune_layer(W, stat, k, pattern) → (Ŵ, mask)`` on a weight
W (out × in). ``prune`` hands the whole call to :meth:`LayerMethod.prune_model`, which runs the sequential
calibration driver (:func:`chita_minimal.network.sequential.prune_blocks`) on a language model — decoder block by
decoder block, on the outputs of the already pruned blocks — or, on a model without decoder blocks, one
calibration pass over the whole model (:func:`chita_minimal.methods.layerwise.calibration_hessians`).

    cm.prune(llm, windows, 0.5, method="wanda")                    # n_samples: calibration windows (default ≤ 128)
    cm.prune(llm, windows, 0.5, method="chita-layer", pattern="2:4")
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from chita_minimal.methods.base import ModelMethod, dataset_size
from chita_minimal.network import params
from chita_minimal.network.language import decoder_blocks, embedding_weights
from chita_minimal.report import PruneReport
from chita_minimal.solver.patterns import parse_pattern
from chita_minimal.utils import check_int

N_SAMPLES = 128  # default calibration windows: all that are given, at most this many


def has_decoder_blocks(model) -> bool:
    """Whether ``model`` is a language model the sequential driver runs on: a Hugging Face model (it has a
    ``config``) with decoder blocks. Other models (CNNs, a user's ``nn.TransformerEncoder``) get one pass."""
    if getattr(model, "config", None) is None:
        return False
    try:
        decoder_blocks(model)
    except ValueError:
        return False
    return True


@dataclass(kw_only=True)
class LayerwiseReport(PruneReport):
    """A :class:`~chita_minimal.report.PruneReport` of a layer-wise method, with ``layer_error``: per pruned
    weight, its relative reconstruction error f(Ŵ)/f(0) = ‖(W − Ŵ)Xᵀ‖²/‖WXᵀ‖² on its calibration inputs."""

    layer_error: dict[str, float] = None

    def _extra_lines(self):
        lines = super()._extra_lines()
        if self.layer_error:
            errs = list(self.layer_error.values())
            lines.append(f"  layer reconstruction error f(Ŵ)/f(0): mean {sum(errs) / len(errs):.4g}, "
                         f"max {max(errs):.4g} over {len(errs)} layers")
        return lines


class LayerMethod(ModelMethod):
    """Base of the layer-wise methods (SparseGPT, Wanda, ALPS, magnitude per layer, layer-wise CHITA)."""

    statistic: ClassVar[str | None] = "gram"
    takes_pattern: ClassVar[bool] = True
    n_samples: int | None = None  # a dataclass field in every subclass (kept first by convention)

    def check(self):
        if self.n_samples is not None:
            check_int("n_samples", self.n_samples)

    def prune_layer(self, W: torch.Tensor, stat: torch.Tensor | None, k: int | None, pattern):
        """(Ŵ, mask) for W (out × in, float32): keep k weights of the layer, or the pattern (n, m) in every row."""
        raise NotImplementedError

    def _windows(self, data):
        """The calibration subset: all samples given, or a seeded choice of ``n_samples`` of them."""
        if self.statistic is None:
            return None
        if data is None:
            raise ValueError(f"method {self.name!r} needs calibration data (token windows); got None")
        size = dataset_size(data)
        if size == 0:
            raise ValueError("the calibration data is empty")
        n = min(size, N_SAMPLES) if self.n_samples is None else self.n_samples
        if n > size:
            raise ValueError(f"n_samples = {n} but the calibration data holds {size} samples")
        return data, n

    def prune_model(self, model, data, sparsity, settings) -> PruneReport:
        from chita_minimal.methods import layerwise
        from chita_minimal.network.language import stack_windows
        from chita_minimal.network.sequential import block_layers, prune_blocks

        pattern = None if settings.pattern is None else parse_pattern(settings.pattern)
        lm = has_decoder_blocks(model)
        if lm:
            names = [n for layers in block_layers(model, settings.names) for n in layers]
        else:
            names = params.resolve(model, settings.names) if settings.names is not None else \
                layerwise.supported_weights(model, self.name)
        lay = params.layout(model, names)
        original = params.flatten(model, lay)
        t0 = time.perf_counter()
        chosen = self._windows(data)
        ids, n_used = None, 0
        if chosen is not None:
            data, n_used = chosen
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(settings.seed))[:n_used]
            order = order.sort().values if n_used == len(data) else order
        try:
            if lm:
                if chosen is not None:
                    ids = stack_windows(data, order.tolist())
                masks, info = prune_blocks(model, ids, self, sparsity=None if pattern else sparsity, pattern=pattern,
                                           names=names, device=settings.device, progress=settings.progress)
            else:
                masks, info = self._prune_flat(model, data, n_used, names, sparsity, pattern, settings)
        except BaseException:
            params.write_back(model, lay, original)
            raise
        w = params.flatten(model, lay).detach().cpu()
        support = torch.cat([masks[nm].reshape(-1) for nm in lay.names])
        seconds = dict(info["seconds"], total=time.perf_counter() - t0)
        dense = params.dense_parameters(model, names)
        report = LayerwiseReport(
            method=self.name, target=sparsity, achieved=1.0 - int((w != 0).sum()) / lay.p, k=int(support.sum()),
            p=lay.p, layer_sparsity=params.per_layer_sparsity(lay, w), objective=None, seconds=seconds,
            masks=params.masks_from(lay, support), l2=0.0, n_grads=n_used, batch_size=1, seed=settings.seed,
            dense=dense, stages=[dict(stage=0, sparsity=sparsity, pattern=settings.pattern)],
            layer_error=info.get("layer_error") or {})
        emb = [n for n, prm in model.named_parameters() if id(prm) in embedding_weights(model)]
        if emb:
            report.notes.append("left dense (embeddings / LM head): " + ", ".join(emb))
        if n_used:
            report.notes.append(f"{n_used} calibration samples (n_samples), seed {settings.seed}")
        return report

    def _prune_flat(self, model, data, n_samples, names, sparsity, pattern, settings):
        """A model without decoder blocks: one calibration pass over the whole model, then every layer."""
        from chita_minimal.methods import layerwise
        from chita_minimal.solver.problem import num_kept

        mods = layerwise.layer_modules(model, names)
        t = time.perf_counter()
        hessians = {} if self.statistic is None else layerwise.calibration_hessians(
            model, data, n_samples, names=list(mods), device=settings.device, seed=settings.seed)
        seconds = {"calibration": time.perf_counter() - t}
        t = time.perf_counter()
        masks = {}
        for name, m in mods.items():
            W = m.weight.detach().reshape(m.weight.shape[0], -1).float()
            H = hessians.pop(name, None)
            stat = None if H is None else (H / 2).to(W.device)  # calibration_hessians returns (2/N) XXᵀ
            if stat is not None and self.statistic == "norms":
                stat = stat.diagonal().clone()
            k = None if pattern is not None else num_kept(sparsity, W.numel())
            Wp, mask = self.prune_layer(W, stat, k, pattern)
            with torch.no_grad():
                m.weight.copy_(torch.where(mask, Wp, 0.0).view_as(m.weight))
            masks[name] = mask.view(m.weight.shape).cpu()
        seconds["solve"] = time.perf_counter() - t
        return masks, {"seconds": seconds}
