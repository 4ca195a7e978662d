"""Layer-wise OBS reconstruction: SparseGPT (Frantar & Alistarh 2023) and SPDY/OBC-style allocation.

Unlike CHITA, which prunes all layers jointly against the loss, each prunable layer ℓ is pruned
on its own to reproduce its dense outputs on calibration inputs X_ℓ (cols, N):

    min_Ŵ ‖W X_ℓ − Ŵ X_ℓ‖²_F   s.t. Ŵ sparse,      H_ℓ = (2/N) X_ℓ X_ℓᵀ  (cols, cols)

A Linear weight is W (out, in) and X_ℓ holds its input vectors; a Conv2d weight (out, C, kh, kw)
is used as W.reshape(out, C·kh·kw) and X_ℓ holds the unfolded input patches (one column per
sample and output position). With this H, tr(ΔW H ΔWᵀ)/2 = ‖ΔW X_ℓ‖²_F / N.

    report = layerwise_prune(model, calib_set, 0.5)                  # uniform 50 % per layer
    report = layerwise_prune(model, calib_set, None, pattern=(2, 4))  # 2:4
    errs = layer_errors(model, calib_set, grid, n_samples=128)        # SPDY/OBC error tables
    alloc = allocate(errs, sizes, grid, target=0.7)                   # non-uniform, DP
    report = layerwise_prune(model, calib_set, None, allocation=alloc)
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from chita_minimal.network.evaluate import batches
from chita_minimal.network.fisher import prepared
from chita_minimal.network.params import owners
from chita_minimal.report import Report
from chita_minimal.solver.patterns import parse_pattern
from chita_minimal.solver.problem import check_tensor, num_kept
from chita_minimal.utils import check_int as _check_int
from chita_minimal.utils import check_sparsity, renamed


# -----------------------------------------------------------------------------
# checks and small helpers


def _round(x: float) -> int:
    """Round half up (not Python's half-to-even), so that differences of rounded cumulative sums telescope."""
    return int(math.floor(x + 0.5))


def unsupported(name: str, m: nn.Module | None, attr: str) -> str | None:
    """Why layer-wise pruning cannot take parameter ``name`` (attribute ``attr`` of module ``m``), or None."""
    if attr != "weight" or not isinstance(m, (nn.Linear, nn.Conv2d)):
        return (f"{name!r} is not the weight of a Linear or Conv2d layer ({type(m).__name__}); "
                "layer-wise pruning supports those only: exclude it via names")
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        return (f"layer {name!r} is a grouped/depthwise Conv2d (groups={m.groups}), which is not "
                "supported (its weight is not one matrix over the unfolded patches): exclude it via names")
    if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
        return f"layer {name!r} uses padding_mode={m.padding_mode!r}; only 'zeros' is supported: exclude it via names"
    return None


def supported_weights(model: nn.Module, who: str = "layer-wise pruning") -> list[str]:
    """The default prunable weights a layer-wise method can reconstruct: those of Linear and ungrouped Conv2d
    modules that are called as modules (their inputs are recorded with forward hooks); the others — attention
    projections, which ``nn.MultiheadAttention`` applies as functions, and depthwise convs — stay dense,
    with a warning naming them."""
    default = owners(model, None)
    in_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    ok = [n for n, (m, attr) in default.items() if unsupported(n, m, attr) is None and id(m) not in in_attention]
    skipped = [n for n in default if n not in ok]
    if skipped:
        warnings.warn(f"{who} reconstructs Linear and ungrouped Conv2d weights only; left dense: "
                      + ", ".join(skipped), stacklevel=5)
    if not ok:
        raise ValueError(f"{who} found no Linear or ungrouped Conv2d weight to prune in this model")
    return ok


def layer_modules(model: nn.Module, names) -> dict[str, nn.Module]:
    """The Linear / Conv2d module owning each weight name; clear errors for anything else."""
    out = {}
    for name, (m, attr) in owners(model, names).items():
        why = unsupported(name, m, attr)
        if why is not None:
            raise ValueError(why)
        out[name] = m
    return out


def _rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as sample rows (N_batch, cols): Linear inputs, or Conv2d unfolded patches."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1])  # (B·..., in)
    if x.dim() == 3:  # unbatched (C, H, W)
        x = x.unsqueeze(0)
    padding = m.padding
    if isinstance(padding, str):  # "valid" = no padding; "same" pads like nn.Conv2d (extra on the right)
        if padding == "same":
            tot = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
            x = F.pad(x, (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2))
        padding = 0
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)  # (B, C·kh·kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B·L, C·kh·kw), columns ordered like W.reshape(out, -1)


def reconstruction_error(dW: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ)/2 = ‖ΔW X‖²_F / N for H = (2/N) X Xᵀ; dW (rows, cols), H (cols, cols)."""
    dW = dW.to(H.dtype)
    return float(((dW @ H) * dW).sum()) / 2


# -----------------------------------------------------------------------------
# calibration


def calibration_hessians(model: nn.Module, dataset, n_samples: int, *, batch_size: int = 32, names=None,
                         device=None, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """H_ℓ = (2/N) Σ x xᵀ of every layer's inputs on ``n_samples`` calibration samples.

    One pass of the model (eval mode, no gradients) over a seeded random subset of ``dataset``
    (items (x, y); labels unused); forward pre-hooks read each layer's input. All layers see the
    inputs of the *current* model in one pass: on a dense model, the dense inputs (the
    non-sequential mode of :func:`layerwise_prune`).

    Linear: x = the input vector (for inputs (B, ..., in), every position is a sample); H is (in, in).
    Conv2d (groups=1): x = an unfolded input patch (``F.unfold`` with the layer's kernel, stride,
    padding, dilation); N = samples · output positions; H is (C·kh·kw, C·kh·kw), matching the rows
    W.reshape(out, -1). Σ x xᵀ is accumulated batch by batch in ``dtype``: only one batch's patches
    (batch_size·L, C·kh·kw) are held at a time, so lower ``batch_size`` for large images.

    Returns:
        {weight name: H (cols, cols)} in ``dtype`` on the compute device.
    """
    mods = layer_modules(model, names)
    _check_int("n_samples", n_samples)
    _check_int("batch_size", batch_size)
    _check_int("seed", seed, low=-2**63)
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"dataset must be indexable with a length, got {type(dataset).__name__}")
    if n_samples > len(dataset):
        raise ValueError(f"n_samples = {n_samples} exceeds the dataset size {len(dataset)}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n_samples]
    sums, counts = {}, {name: 0 for name in mods}

    def hook(name):
        def pre(m, args):
            x = _rows(m, args[0].detach())  # (N_b, cols)
            if x.dtype not in (torch.float32, torch.float64):
                x = x.float()
            s = (x.T @ x).to(dtype)  # (cols, cols), batch product in the input precision
            if name in sums:
                sums[name] += s
            else:
                sums[name] = s
            counts[name] += x.shape[0]
        return pre

    wdtype = next(iter(mods.values())).weight.dtype
    handles = [m.register_forward_pre_hook(hook(name)) for name, m in mods.items()]
    try:
        with prepared(model, device) as dev, torch.no_grad():
            for x, _ in batches(dataset, batch_size, order):
                model(x.to(dev, dtype=wdtype) if x.is_floating_point() else x.to(dev))
    finally:
        for h in handles:
            h.remove()
    silent = [name for name, c in counts.items() if c == 0]
    if silent:
        raise ValueError(f"layer(s) {silent} received no input during the forward pass")
    return {name: sums[name] * (2.0 / counts[name]) for name in mods}


# -----------------------------------------------------------------------------
# SparseGPT on one layer


def inverse_hessian_factor(H: torch.Tensor, W: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of the damped H⁻¹ (H⁻¹ = UᵀU), in W's dtype: the OBS machinery shared by
    SparseGPT and OBQ. Dead inputs (H_jj = 0) get H_jj = 1 and their column of W (modified in place)
    is zeroed; then H += percdamp·mean(diag H)·I. Cholesky in fp64."""
    H = H.detach().to(torch.float64).clone()  # (cols, cols)
    dead = H.diagonal() == 0  # (cols,) inputs that were always 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info:
        raise ValueError("H is not positive definite after damping: increase percdamp")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(W.dtype)


@renamed(blocksize="block_size")
def sparsegpt_layer(W: torch.Tensor, H: torch.Tensor, sparsity: float | None = None, *, pattern=None,
                    mask: torch.Tensor | None = None, block_size: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1): prune W to minimise tr(ΔW H ΔWᵀ) with OBS updates.

    H is dampened by ``percdamp``·mean(diag H); dead inputs (diag H = 0) get their W column zeroed and
    H diagonal set to 1. U = upper Cholesky factor of H⁻¹: row j of U is the OBS direction for
    removing weight j when columns < j are frozen, and U_jj² = [(H_{≥j})⁻¹]_jj. Columns are processed
    left to right in blocks of ``block_size``; inside a block, each column j is pruned (q = 0 off the
    mask) and the remaining columns of the block get the OBS update W[:, j:] -= (w − q)/U_jj ⊗ U[j, j:];
    the block's accumulated errors update the later columns lazily in one matmul.

    The mask is chosen adaptively from the current (already updated) weights by the OBS saliency
    w² / U_jj²:
      - unstructured (``sparsity``): at the start of each block, the block's z_b entries of least
        saliency, selected jointly over all rows of the block (as in SparseGPT). Exact count: the layer
        has Z = numel − num_kept(sparsity, numel) zeros, split over blocks by rounding the cumulative
        share, z_b = rnd(Z·i2/cols) − rnd(Z·i1/cols), which telescopes to exactly Z;
      - N:M (``pattern=(n, m)``, needs m | cols): at each group of m consecutive columns, keep the n of
        largest saliency in every row (the block size is rounded down to a multiple of m, at least m);
      - ``mask`` (rows, cols) bool, True = kept: a fixed mask, only the OBS updates are done.
    Saliency ties: the lower column index is kept. Kept weights are ``mask`` True; weights off the mask
    are exactly 0 (a kept weight may also be 0, e.g. on a dead input). sparsity = 0 returns W unchanged.
    ``blocksize`` is the deprecated old name of ``block_size``.

    Args:
        W: (rows, cols) weights, float32/float64 (half precision is computed in float32), any device.
        H: (cols, cols) = (2/N) X Xᵀ on the same device; inverted in float64.
    Returns:
        (W_pruned (rows, cols) in W's dtype, mask (rows, cols) bool).
    """
    check_tensor("W", W, 2)
    check_tensor("H", H, 2)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H must have shape ({cols}, {cols}) to match W {tuple(W.shape)}, got {tuple(H.shape)}")
    if H.device != W.device:
        raise ValueError(f"W ({W.device}) and H ({H.device}) must be on the same device")
    if sum(a is not None for a in (sparsity, pattern, mask)) != 1:
        raise ValueError("give exactly one of sparsity, pattern or mask")
    _check_int("block_size", block_size)
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp >= 0:
        raise ValueError(f"percdamp must be a number >= 0, got {percdamp!r}")
    n = m = 0
    if sparsity is not None:
        sparsity = check_sparsity("sparsity", sparsity)
        if sparsity == 0:
            return W.clone(), torch.ones_like(W, dtype=torch.bool)
        Z = rows * cols - num_kept(sparsity, rows * cols)  # exact number of zeros of the layer
    elif pattern is not None:
        n, m = parse_pattern(pattern)
        if cols % m:
            raise ValueError(f"N:M pattern {n}:{m} needs the row length {cols} to be divisible by m = {m}")
        block_size = max(m, block_size // m * m)
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != W.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(W.shape)}")

    out_dtype, dt = W.dtype, (torch.float64 if W.dtype == torch.float64 else torch.float32)
    W = W.detach().to(dt).clone()  # (rows, cols), updated in place
    U = inverse_hessian_factor(H, W, percdamp)  # (cols, cols), H⁻¹ = UᵀU; dead columns of W zeroed
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device) if mask is None else mask.to(W.device).clone()

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (rows, b)
        E1 = torch.zeros_like(W1)  # (rows, b) scaled errors (w − q)/U_jj
        U1 = U[i1:i2, i1:i2]  # (b, b)
        d = U1.diagonal()  # (b,)
        if sparsity is not None:
            z = _round(Z * i2 / cols) - _round(Z * i1 / cols)  # zeros of this block
            score = (W1 / d) ** 2  # (rows, b) OBS saliency w²/[(H_F)⁻¹]_jj
            kept = torch.sort(score.flatten(), descending=True, stable=True).indices[:score.numel() - z]
            k1 = torch.zeros(score.numel(), dtype=torch.bool, device=W.device)
            k1[kept] = True
            keep[:, i1:i2] = k1.view_as(score)
        for i in range(i2 - i1):
            if m and i % m == 0:  # N:M: choose this group's mask from the current weights
                score = (W1[:, i:i + m] / d[i:i + m]) ** 2  # (rows, m)
                top = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :n]  # (rows, n)
                g = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)
                keep[:, i1 + i:i1 + i + m] = g
            w = W1[:, i]  # (rows,)
            q = torch.where(keep[:, i1 + i], w, torch.zeros_like(w))
            err = (w - q) / d[i]  # (rows,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # OBS update of the block's remaining columns
            W1[:, i] = q  # exact zeros
            E1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy update of the later blocks
    return W.to(out_dtype), keep


# -----------------------------------------------------------------------------
# the whole model


@dataclass(kw_only=True)
class LayerwiseReport(Report):
    """What :func:`layerwise_prune` did (a :class:`~chita_minimal.report.Report`, method "sparsegpt").

    target: the ``sparsity`` argument as given (None with a pattern, or with an allocation dict when
    no sparsity is given); achieved: the fraction of exact zeros over all pruned weights; masks: bool
    (True = kept) per weight, on the CPU; seconds: per layer name (its SparseGPT solve, plus its
    calibration pass when sequential), "hessians" (all calibration passes) and "total"; stages: [].
    pattern: the N:M pattern or None; layer_sparsity: fraction of exact zeros per pruned weight;
    n_samples, sequential: as given. ``sparsity`` and ``achieved_sparsity`` are the old names of
    ``target`` and ``achieved``.
    """

    pattern: tuple[int, int] | None = None
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    n_samples: int = 0
    sequential: bool = False

    @property
    def sparsity(self) -> float | None:
        return self.target

    @property
    def achieved_sparsity(self) -> float:
        return self.achieved

    def _extra_lines(self) -> list[str]:
        pattern = "none" if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}"
        return [f"  N:M pattern {pattern}; {self.n_samples} calibration samples; "
                f"{'sequential (one pass per layer)' if self.sequential else 'one pass on the model as given'}"]


def _targets(mods, sparsity, pattern, allocation) -> dict[str, float | None]:
    """Per-layer sparsity (None under an N:M pattern), checked before anything is modified."""
    if pattern is not None:
        n, m = parse_pattern(pattern)
        if sparsity is not None and abs(check_sparsity("sparsity", sparsity) - (1 - n / m)) > 1e-9:
            raise ValueError(f"sparsity {sparsity} contradicts pattern {n}:{m} (sparsity {1 - n / m}); give None")
        if not (isinstance(allocation, str) and allocation == "uniform"):
            raise ValueError("an allocation cannot be combined with an N:M pattern")
        for name, mod in mods.items():
            cols = mod.weight[0].numel()
            if cols % m:
                raise ValueError(f"layer {name!r} has rows of length {cols}, not divisible by m = {m} of the "
                                 f"{n}:{m} pattern; exclude it via names=[...]")
        return {name: None for name in mods}
    if isinstance(allocation, str):
        if allocation != "uniform":
            raise ValueError(f"allocation must be 'uniform' or a dict name -> sparsity, got {allocation!r}")
        if sparsity is None:
            raise ValueError("give a sparsity (or a pattern, or an allocation dict)")
        s = check_sparsity("sparsity", sparsity)
        return {name: s for name in mods}
    if not isinstance(allocation, dict):
        raise TypeError(f"allocation must be 'uniform' or a dict, got {type(allocation).__name__}")
    if set(allocation) != set(mods):
        raise ValueError(f"allocation must give a sparsity for exactly the pruned layers {list(mods)}; "
                         f"missing {sorted(set(mods) - set(allocation))}, "
                         f"unknown {sorted(set(allocation) - set(mods))}")
    return {name: check_sparsity(f"allocation[{name!r}]", allocation[name]) for name in mods}


@renamed(blocksize="block_size")
def layerwise_prune(model: nn.Module, dataset, sparsity: float | None, *, n_samples: int = 128, pattern=None,
                    allocation="uniform", names=None, device=None, seed: int = 0, batch_size: int = 32,
                    block_size: int = 128, percdamp: float = 0.01, sequential: bool = False) -> LayerwiseReport:
    """Prune every layer in place with :func:`sparsegpt_layer` on calibration Hessians.

    Args:
        sparsity: per-layer sparsity in [0, 1) for ``allocation="uniform"``; each layer gets exactly
            numel − num_kept(sparsity, numel) zeros. May be None with a pattern or an allocation dict
            (with a dict it is only recorded in the report).
        pattern: (n, m): N:M sparsity along each weight row (a layer whose row length is not a multiple
            of m is an error: exclude it via ``names``).
        allocation: "uniform" or {name: sparsity} for every pruned layer (e.g. from :func:`allocate`).
        names: the weights to prune (default: every Conv/Linear weight; Linear and groups=1 Conv2d only).
        sequential: False (default): one calibration pass on the model as given (dense inputs for a
            dense model), all Hessians held at once. True: as in SparseGPT, layer ℓ's Hessian is
            computed after layers < ℓ (in ``names`` order) are pruned, so it sees their pruned outputs;
            one calibration pass per layer, one Hessian in memory at a time.
        n_samples, batch_size, seed, device: the calibration subset, see :func:`calibration_hessians`.
        block_size, percdamp: of :func:`sparsegpt_layer` (``blocksize``: the deprecated old name).

    Only the named weights change (biases, BatchNorm statistics and other parameters do not).
    """
    t0 = time.perf_counter()
    mods = layer_modules(model, names)
    targets = _targets(mods, sparsity, pattern, allocation)
    _check_int("n_samples", n_samples)
    calib = dict(n_samples=n_samples, batch_size=batch_size, device=device, seed=seed)
    seconds, masks, layer_sparsity = {"hessians": 0.0}, {}, {}
    with prepared(model, device):
        if not sequential:
            t = time.perf_counter()
            hessians = calibration_hessians(model, dataset, names=list(mods), **calib)
            seconds["hessians"] += time.perf_counter() - t
        for name, mod in mods.items():
            t = time.perf_counter()
            if sequential:
                H = calibration_hessians(model, dataset, names=[name], **calib)[name]
                seconds["hessians"] += time.perf_counter() - t
            else:
                H = hessians.pop(name)
            W = mod.weight.detach()
            W2 = W.reshape(W.shape[0], -1)  # (out, cols)
            Wp, keep = sparsegpt_layer(W2, H.to(W.device), targets[name],
                                       pattern=None if pattern is None else tuple(pattern),
                                       block_size=block_size, percdamp=percdamp)
            with torch.no_grad():
                mod.weight.copy_(Wp.view_as(W))
            masks[name] = keep.view(W.shape).cpu()
            layer_sparsity[name] = float((mod.weight == 0).sum()) / W.numel()
            seconds[name] = time.perf_counter() - t
    total = sum(m.weight.numel() for m in mods.values())
    achieved = sum(layer_sparsity[nm] * mods[nm].weight.numel() for nm in mods) / total
    seconds["total"] = time.perf_counter() - t0
    return LayerwiseReport(method="sparsegpt", target=sparsity, achieved=achieved, masks=masks, seconds=seconds,
                           pattern=None if pattern is None else tuple(pattern), layer_sparsity=layer_sparsity,
                           n_samples=n_samples, sequential=bool(sequential))


@renamed(blocksize="block_size")
def layer_errors(model: nn.Module, dataset, sparsities, *, n_samples: int = 128, names=None, relative: bool = True,
                 hessians: dict[str, torch.Tensor] | None = None, batch_size: int = 32, device=None, seed: int = 0,
                 block_size: int = 128, percdamp: float = 0.01) -> dict[str, list[float]]:
    """Error tables of SPDY / OBC: each layer pruned alone with SparseGPT at each candidate sparsity.

    Entry [name][i] = tr(ΔW H ΔWᵀ)/2 = ‖(W − Ŵ)X‖²_F / N for Ŵ = SparseGPT at ``sparsities[i]``, with
    the (undamped) calibration Hessian H = (2/N) X Xᵀ of the model as given. ``relative=True`` (default)
    divides by the layer's dense output energy tr(W H Wᵀ)/2 = ‖W X‖²_F / N, so that the errors of
    layers of different scales are comparable and can be summed by :func:`allocate`. The model is not
    changed. ``hessians`` (from :func:`calibration_hessians`) skips the calibration pass. ``block_size``,
    ``percdamp``: of :func:`sparsegpt_layer` (``blocksize``: the deprecated old name).
    """
    mods = layer_modules(model, names)
    grid = [check_sparsity("sparsities[i]", s) for s in sparsities]
    if not grid:
        raise ValueError("sparsities is empty")
    if hessians is None:
        hessians = calibration_hessians(model, dataset, n_samples, names=list(mods), batch_size=batch_size,
                                        device=device, seed=seed)
    out = {}
    for name, mod in mods.items():
        if name not in hessians:
            raise ValueError(f"hessians has no entry for layer {name!r}")
        H = hessians[name]
        W2 = mod.weight.detach().reshape(mod.weight.shape[0], -1).to(H.device)  # (out, cols)
        energy = reconstruction_error(W2, H) if relative else 1.0
        energy = energy if energy > 0 else 1.0
        out[name] = [reconstruction_error(W2 - sparsegpt_layer(W2, H, s, block_size=block_size, percdamp=percdamp)[0], H)
                     / energy for s in grid]
    return out


def allocate(errors: dict[str, list[float]], sizes: dict[str, int], sparsities, target: float, *,
             resolution: int = 10_000) -> dict[str, float]:
    """Non-uniform per-layer sparsities by dynamic programming (SPDY, Frantar et al. 2022; OBC §5).

    Chooses one level s_ℓ ∈ ``sparsities`` per layer to minimise Σ_ℓ errors[ℓ][s_ℓ] subject to
    Σ_ℓ (1 − s_ℓ)·sizes[ℓ] ≤ (1 − target)·Σ_ℓ sizes[ℓ] (kept weights; each layer then rounds its own
    count, see :func:`sparsegpt_layer`). The errors are summed as given: use tables normalised per
    layer (``layer_errors(relative=True)``, error / dense output energy) so that layers are comparable.

    Exact DP over a discretised budget: each layer's kept count is measured above its minimum over
    the grid, in units u = slack / ``resolution`` where slack = budget − Σ_ℓ min kept, and costs are
    rounded *up* (ceil). Any DP-feasible choice therefore satisfies the real constraint (up to float
    round-off), and the all-sparsest choice costs 0 units, so the DP finds a solution whenever one
    exists. The result is optimal among choices whose rounded cost fits; it can miss only choices
    within L·u of the budget (L = number of layers). Ties: the lower grid index, then fewer kept weights.

    Raises ValueError when infeasible (target above what the largest grid level gives).
    """
    grid = [check_sparsity("sparsities[i]", s) for s in sparsities]
    target = check_sparsity("target", target)
    _check_int("resolution", resolution)
    if not grid:
        raise ValueError("sparsities is empty")
    if not isinstance(errors, dict) or not errors:
        raise ValueError("errors must be a non-empty dict name -> list of errors")
    if not isinstance(sizes, dict) or set(sizes) != set(errors):
        raise ValueError(f"sizes must have exactly the keys of errors {sorted(errors)}")
    for name, errs in errors.items():
        if len(errs) != len(grid):
            raise ValueError(f"errors[{name!r}] has {len(errs)} entries but there are {len(grid)} sparsities")
        if not all(math.isfinite(float(e)) for e in errs):
            raise ValueError(f"errors[{name!r}] contains NaN or Inf")
        _check_int(f"sizes[{name!r}]", sizes[name])
    names = list(errors)
    kept = {nm: [(1 - s) * sizes[nm] for s in grid] for nm in names}
    budget = (1 - target) * sum(sizes.values())
    slack = budget - sum(min(k) for k in kept.values())
    if slack < -1e-9 * budget:
        raise ValueError(f"target sparsity {target} is infeasible: the largest grid level {max(grid)} "
                         f"keeps {budget - slack:.1f} > {budget:.1f} weights")
    slack = max(slack, 0.0)
    unit = slack / resolution if slack > 0 else 1.0
    cap = resolution if slack > 0 else 0
    inf = float("inf")
    dp = torch.full((cap + 1,), inf, dtype=torch.float64)  # dp[c]: least error using exactly c units
    dp[0] = 0.0
    costs, args = [], []
    for nm in names:
        lo = min(kept[nm])
        cost = [math.ceil((k - lo) / unit - 1e-9) for k in kept[nm]]  # units above the layer's minimum
        new = torch.full_like(dp, inf)
        arg = torch.full((cap + 1,), -1, dtype=torch.long)
        for s, c in enumerate(cost):
            if c > cap:
                continue
            cand = torch.full_like(dp, inf)
            cand[c:] = dp[:cap + 1 - c] + float(errors[nm][s])
            better = cand < new
            new, arg = torch.where(better, cand, new), torch.where(better, torch.full_like(arg, s), arg)
        dp = new
        costs.append(cost)
        args.append(arg)
    c = int(torch.argmin(dp))  # first (fewest units) among the minima
    choice = {}
    for nm, cost, arg in zip(reversed(names), reversed(costs), reversed(args)):
        s = int(arg[c])
        choice[nm] = grid[s]
        c -= cost[s]
    return {nm: choice[nm] for nm in names}
