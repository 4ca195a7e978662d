"""Layer-wise post-training quantization: round-to-nearest and OBQ/GPTQ with OBS updates.

OBQ (the quantization half of OBC, Frantar & Alistarh, "Optimal Brain Compression", NeurIPS 2022)
quantizes one weight at a time and corrects the not-yet-quantized weights of the same row with the
Optimal Brain Surgeon update, minimising the layer reconstruction error

    tr(ΔW H ΔWᵀ)/2 = ‖ΔW X‖²_F / N,      H = (2/N) X Xᵀ  (cols, cols)                   (1)

(the calibration Hessian of :func:`layerwise.calibration_hessians`). As GPTQ (Frantar et al. 2023)
does, all rows quantize their columns in the same left-to-right order, so that one Cholesky factor
serves all rows: with H⁻¹ = UᵀU (U upper triangular), quantizing column j given columns < j frozen is

    err = (w_j − q(w_j)) / U_jj,      W[:, j:] −= err ⊗ U[j, j:]                           (2)

(OBC eq. 7 restricted to the remaining columns, U_jj² = [(H_{≥j})⁻¹]_jj). This is exactly the
machinery of :func:`layerwise.sparsegpt_layer`, with q = the grid point instead of 0; with a
``mask`` both happen (pruned weights → exactly 0, kept weights → the grid): sparse + quantized.

Grid: asymmetric min-max uniform quantization per output channel (row) to 2^b levels,
scale = (max − min)/(2^b − 1), zero = round(−min/scale), q(w) = scale·(clamp(round(w/scale) + zero,
0, 2^b − 1) − zero); min ≤ 0 ≤ max, so 0 is always on the grid. The scales come once from the W
given (before any update), as in GPTQ.

    report = quantize_model(model, calib_set, 4)                     # 4-bit OBQ, in place
    report = quantize_model(model, calib_set, 4, sparsity=0.5)       # SparseGPT 50 % + 4-bit OBQ
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from chita_minimal.network.fisher import prepared
from chita_minimal.methods.layerwise import (calibration_hessians, inverse_hessian_factor, layer_modules,
                                             reconstruction_error, sparsegpt_layer)
from chita_minimal.report import Report
from chita_minimal.solver.problem import check_tensor
from chita_minimal.utils import check_int as _check_int
from chita_minimal.utils import check_bits, check_sparsity, renamed


# -----------------------------------------------------------------------------
# the grid


def quant_grid(W: torch.Tensor, bits: int, per_channel: bool = True,
               symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (rows, 1) each of min-max uniform quantization of W (rows, cols) to 2^bits levels.

    Asymmetric: the range [min(w_min, 0), max(w_max, 0)] of each row (of the whole tensor when
    ``per_channel`` is False) is split into 2^bits − 1 steps; symmetric: [−a, a] with a = max |w|
    and zero = 2^(bits−1). An all-zero row gets the range [−1, 1]. The zero point is an integer (as
    a float), so q = zero gives exactly 0.
    """
    check_tensor("W", W, 2)
    maxq = 2 ** check_bits(bits) - 1
    W = W.detach()
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    X = W.to(dt) if per_channel else W.to(dt).reshape(1, -1)
    lo = X.min(1, keepdim=True).values.clamp_max(0)  # (rows, 1)
    hi = X.max(1, keepdim=True).values.clamp_min(0)
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -torch.ones_like(lo), lo), torch.where(flat, torch.ones_like(hi), hi)
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-lo / scale)
    if not per_channel:
        scale, zero = scale.expand(W.shape[0], 1).clone(), zero.expand(W.shape[0], 1).clone()
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The grid value scale·(clamp(round(w/scale) + zero, 0, 2^bits − 1) − zero), dequantized (broadcasts)."""
    maxq = 2 ** check_bits(bits) - 1
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def rtn_layer(W: torch.Tensor, bits: int, *, symmetric: bool = False) -> torch.Tensor:
    """Round-to-nearest: every weight to its nearest point of its row's grid (the W-only baseline)."""
    scale, zero = quant_grid(W, bits, symmetric=symmetric)
    return quantize(W.detach().to(scale.dtype), scale, zero, bits).to(W.dtype)


# -----------------------------------------------------------------------------
# OBQ / GPTQ on one layer


@renamed(blocksize="block_size")
def obq_layer(W: torch.Tensor, H: torch.Tensor, bits: int, *, percdamp: float = 0.01, block_size: int = 128,
              mask: torch.Tensor | None = None, symmetric: bool = False) -> torch.Tensor:
    """Quantize W (rows, cols) to minimise (1) with OBS updates (2), column by column (GPTQ order).

    Like :func:`layerwise.sparsegpt_layer`: H (cols, cols) is damped by ``percdamp``·mean(diag H); dead
    inputs (diag H = 0) get weight 0 and diagonal 1; U = upper Cholesky factor of H⁻¹ (in float64).
    Columns are processed in blocks of ``block_size`` (``blocksize``: the deprecated old name): within a
    block, eq. (2) updates the block's remaining columns; the block's errors update the later columns
    lazily in one matmul.

    ``mask`` (rows, cols) bool, True = kept (e.g. from sparsegpt_layer): weights off the mask become
    exactly 0 (their error is still compensated by (2)) and only kept weights are quantized. The grid
    (:func:`quant_grid`) comes from W (masked) as given; every output value lies exactly on it
    for float32/float64 W.

    Returns:
        Q (rows, cols) in W's dtype.
    """
    check_tensor("W", W, 2)
    check_tensor("H", H, 2)
    check_bits(bits)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H must have shape ({cols}, {cols}) to match W {tuple(W.shape)}, got {tuple(H.shape)}")
    if H.device != W.device:
        raise ValueError(f"W ({W.device}) and H ({H.device}) must be on the same device")
    _check_int("block_size", block_size)
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp >= 0:
        raise ValueError(f"percdamp must be a number >= 0, got {percdamp!r}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != W.shape):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(W.shape)}")

    out_dtype, dt = W.dtype, (torch.float64 if W.dtype == torch.float64 else torch.float32)
    W = W.detach().to(dt).clone()  # (rows, cols), updated in place
    keep = torch.ones_like(W, dtype=torch.bool) if mask is None else mask.to(W.device)
    W[~keep] = 0
    scale, zero = quant_grid(W, bits, symmetric=symmetric)  # (rows, 1) each, from the W given
    scale, zero = scale[:, 0], zero[:, 0]  # (rows,)
    U = inverse_hessian_factor(H, W, percdamp)  # (cols, cols), H⁻¹ = UᵀU; dead columns of W zeroed

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (rows, b)
        E1 = torch.zeros_like(W1)  # (rows, b) scaled errors (w − q)/U_jj
        U1 = U[i1:i2, i1:i2]  # (b, b)
        for i in range(i2 - i1):
            w = W1[:, i]  # (rows,)
            q = torch.where(keep[:, i1 + i], quantize(w, scale, zero, bits), torch.zeros_like(w))
            err = (w - q) / U1[i, i]  # (rows,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # eq. (2) on the block's remaining columns
            W1[:, i] = q  # exactly on the grid (or exactly 0)
            E1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy update of the later blocks
    return W.to(out_dtype)


# -----------------------------------------------------------------------------
# the whole model


@dataclass(kw_only=True)
class QuantReport(Report):
    """What :func:`quantize_model` did (a :class:`~chita_minimal.report.Report`).

    method: "obq" or "rtn"; target: the ``bits`` asked; achieved: the bits stored per weight,
    8·total_bytes / Σ numel (grid point, plus the per-row scale and zero point and, when sparse, the
    bit mask); masks: with ``sparsity``, bool (True = kept) per weight on the CPU, else {}; seconds:
    per layer, "hessians", "total"; stages: []. sparsity: as given (None: no pruning); layer_error:
    tr(ΔW H ΔWᵀ)/2 of (1) per weight name, ΔW = original − final (pruning + quantization), with the
    undamped calibration H; layer_bytes: storage of the compressed layer = kept weights · bits/8 +
    rows · 8 (fp32 scale and zero) + numel/8 (1-bit mask, only when sparse); dense_bytes: fp32 size
    (numel · 4); total_bytes / dense_total_bytes: their sums; n_samples: calibration samples.
    ``bits`` is the old name of ``target``.
    """

    sparsity: float | None = None
    layer_error: dict[str, float] = field(default_factory=dict)
    layer_bytes: dict[str, float] = field(default_factory=dict)
    dense_bytes: dict[str, int] = field(default_factory=dict)
    total_bytes: float = 0.0
    dense_total_bytes: int = 0
    n_samples: int = 0

    @property
    def bits(self) -> int:
        return self.target

    def _extra_lines(self) -> list[str]:
        sparse = "" if self.sparsity is None else f", pruned to sparsity {self.sparsity:g} first"
        lines = [f"  {self.bits}-bit {self.method}{sparse}: {self.achieved:.4g} bits stored per weight, "
                 f"{self.total_bytes:,.0f} bytes (fp32: {self.dense_total_bytes:,}); {self.n_samples} calibration samples"]
        if self.layer_error:
            w = max(len("layer"), *(len(n) for n in self.layer_error))
            lines.append(f"  {'layer':<{w}}  {'error (1)':>10}  {'bytes':>12}  {'fp32 bytes':>12}")
            for n, e in self.layer_error.items():
                lines.append(f"  {n:<{w}}  {e:>10.4g}  {self.layer_bytes[n]:>12,.0f}  {self.dense_bytes[n]:>12,}")
        return lines


@renamed(blocksize="block_size")
def quantize_model(model: nn.Module, dataset, bits: int, *, method: str = "obq", n_samples: int = 128, names=None,
                   sparsity: float | None = None, symmetric: bool = False, block_size: int = 128,
                   percdamp: float = 0.01, batch_size: int = 32, device=None, seed: int = 0) -> QuantReport:
    """Quantize every named Linear / groups=1 Conv2d weight in place (one calibration pass, dense inputs).

    method "obq": :func:`obq_layer` with the layer's calibration Hessian; "rtn": :func:`rtn_layer` (the
    Hessians are still computed, for the reported errors). With ``sparsity`` s in [0, 1), each layer is
    first pruned by :func:`layerwise.sparsegpt_layer` (exactly numel − num_kept(s, numel) zeros), then
    its kept weights are quantized (by OBQ with the fixed mask, or RTN), its zeros kept exactly.
    Biases, BatchNorm and other parameters are not changed. ``block_size``, ``percdamp``: of
    :func:`obq_layer` and :func:`layerwise.sparsegpt_layer` (``blocksize``: the deprecated old name).
    Returns a :class:`QuantReport`.
    """
    t0 = time.perf_counter()
    check_bits(bits)
    if method not in ("obq", "rtn"):
        raise ValueError(f"method must be 'obq' or 'rtn', got {method!r}")
    if sparsity is not None:
        sparsity = check_sparsity("sparsity", sparsity)
    mods = layer_modules(model, names)
    seconds, errors, sizes, dense, masks = {}, {}, {}, {}, {}
    with prepared(model, device):
        t = time.perf_counter()
        hessians = calibration_hessians(model, dataset, n_samples, names=list(mods), batch_size=batch_size,
                                        device=device, seed=seed)
        seconds["hessians"] = time.perf_counter() - t
        for name, mod in mods.items():
            t = time.perf_counter()
            H = hessians.pop(name)
            W = mod.weight.detach()
            W2 = W.reshape(W.shape[0], -1)  # (out, cols)
            Hd = H.to(W.device)
            keep = None
            Wq = W2
            if sparsity is not None:
                Wq, keep = sparsegpt_layer(W2, Hd, sparsity, block_size=block_size, percdamp=percdamp)
                masks[name] = keep.view(W.shape).cpu()
            if method == "obq":
                Wq = obq_layer(Wq, Hd, bits, percdamp=percdamp, block_size=block_size, mask=keep, symmetric=symmetric)
            else:
                Wq = rtn_layer(Wq, bits, symmetric=symmetric)
            errors[name] = reconstruction_error(W2.to(Hd) - Wq.to(Hd), Hd)
            with torch.no_grad():
                mod.weight.copy_(Wq.view_as(W))
            kept = W.numel() if keep is None else int(keep.sum())
            sizes[name] = kept * bits / 8 + W.shape[0] * 8 + (W.numel() / 8 if keep is not None else 0)
            dense[name] = W.numel() * 4
            seconds[name] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    total, dense_total = sum(sizes.values()), sum(dense.values())
    return QuantReport(method=method, target=bits, achieved=32 * total / dense_total, masks=masks, seconds=seconds,
                       sparsity=sparsity, layer_error=errors, layer_bytes=sizes, dense_bytes=dense, total_bytes=total,
                       dense_total_bytes=dense_total, n_samples=n_samples)
