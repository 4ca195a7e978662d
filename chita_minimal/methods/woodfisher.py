"""WoodFisher (Singh & Alistarh, NeurIPS 2020): OBS with a block-diagonal empirical Fisher.

The empirical Fisher with damping, from n gradients g_i (the rows of X),

    F = l2·I + (1/n) Σ_i g_i g_iᵀ                                    (WoodFisher eq. 2)

is approximated by its diagonal blocks of ``block_size`` contiguous coordinates. Each
block's inverse is built as in the paper by n Woodbury (Sherman–Morrison) rank-one
updates starting from F_0⁻¹ = (1/l2)·I:

    F_i⁻¹ = F_{i-1}⁻¹ − (F_{i-1}⁻¹ g_i g_iᵀ F_{i-1}⁻¹) / (n + g_iᵀ F_{i-1}⁻¹ g_i)   (eq. 5)

Optimal Brain Surgeon (Hassibi & Stork 1993) then scores each weight by the loss
increase of removing it alone with the optimal compensation of the others,

    ρ_q = w_q² / (2 [F⁻¹]_qq)                                        (eq. 6, saliency)

removes the p − k weights of smallest ρ (one global threshold across blocks), and
updates the rest of each block:

    independent:  δw = −Σ_{q∈Q} (w_q / [F⁻¹]_qq) F⁻¹ e_q              (sum of single-weight
                                                                      OBS updates, eq. 4)
    joint:        δw = −F⁻¹_{:,Q} ([F⁻¹]_QQ)⁻¹ w_Q                    (multi-weight OBS)

where Q is the block's removed set; removed weights are then set exactly to 0. The joint
update is the exact minimiser of the quadratic ½ δwᵀ F_block δw with δw_Q = −w_Q,
i.e. of problem (P) restricted to the kept support (Benbaki et al. 2023, eq. (4)) when
there is a single block. Its loss ½ w_Qᵀ([F⁻¹]_QQ)⁻¹ w_Q is :func:`joint_obs_loss`.

Block layout: p is cut into ⌈p/B⌉ blocks of B = min(block_size, p) coordinates; the last
block, when shorter, is padded to B with coordinates whose gradient column is 0, so they
are decoupled (F⁻¹ = (1/l2)·I there) and never removed. All blocks then run as one
batched (nblocks, B, B) tensor. Memory: p·B entries; the full p×p F is never formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chita_minimal.methods.base import Method, Stage, Step, register
from chita_minimal.methods.magnitude import Pruned, check_fisher_inputs, finish
from chita_minimal.solver.threshold import hard_threshold
from chita_minimal.solver.problem import Problem, check_tensor
from chita_minimal.utils import check_int, check_number

_UPDATES = ("independent", "joint")


# -- block layout --------------------------------------------------------------------------
def _block_shape(p: int, block_size: int) -> tuple[int, int]:
    """(number of blocks, block width B) for p coordinates cut into blocks of block_size."""
    B = min(block_size, p)
    return -(-p // B), B


def to_blocks(v: torch.Tensor, nb: int, B: int, fill=0) -> torch.Tensor:
    """(..., p) → (..., nb, B), padding the last block with ``fill``."""
    pad = nb * B - v.shape[-1]
    if pad:
        v = torch.cat([v, v.new_full((*v.shape[:-1], pad), fill)], dim=-1)
    return v.reshape(*v.shape[:-1], nb, B)


# -- the block inverse ---------------------------------------------------------------------
def block_fisher_inverse(X: torch.Tensor, l2: float, block_size: int = 100) -> torch.Tensor:
    """Inverses of the diagonal blocks of F = l2·I + (1/n) XᵀX by n Woodbury updates (eq. 5).

    Args:
        X: (n, p) gradients, one per row.
        l2: damping > 0.
        block_size: block width; B = min(block_size, p).
    Returns:
        (nblocks, B, B) tensor; block b covers coordinates b·B … b·B + B − 1. Rows and
        columns past p (padding of the last block) hold (1/l2)·I.
    """
    check_tensor("X", X, 2)
    check_number("l2", l2, low=0, low_open=True)
    check_int("block_size", block_size)
    n, p = X.shape
    nb, B = _block_shape(p, block_size)
    G = to_blocks(X, nb, B)  # (n, nb, B)
    Finv = torch.eye(B, dtype=X.dtype, device=X.device).expand(nb, B, B) / l2  # F_0⁻¹
    Finv = Finv.contiguous()
    for i in range(n):
        g = G[i]  # (nb, B)
        u = (Finv * g.unsqueeze(1)).sum(2)  # F_{i-1}⁻¹ g_i, (nb, B); faster than bmm on CPU
        denom = n + (g * u).sum(1, keepdim=True)  # n + g_iᵀ F_{i-1}⁻¹ g_i, (nb, 1)
        Finv.baddbmm_((u / denom).unsqueeze(2), u.unsqueeze(1), alpha=-1.0)  # rank-one downdate
    return Finv


# -- OBS pieces shared with CBS -------------------------------------------------------------
def _joint_coefficients(Finv: torch.Tensor, w: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """z = ([F⁻¹]_QQ)⁻¹ w_Q per block, zero outside Q. Shapes: (nb,B,B), (nb,B), (nb,B) → (nb,B).

    Solved for all blocks at once: the system is [F⁻¹]_QQ on Q×Q and the identity elsewhere,
    with right-hand side w on Q and 0 elsewhere.
    """
    QQ = removed.unsqueeze(2) & removed.unsqueeze(1)  # (nb, B, B)
    eye = torch.eye(Finv.shape[-1], dtype=Finv.dtype, device=Finv.device)
    M = torch.where(QQ, Finv, eye)
    rhs = torch.where(removed, w, torch.zeros_like(w))
    return torch.linalg.solve(M, rhs)


def joint_obs_loss(Finv: torch.Tensor, w: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Loss of removing Q jointly with the optimal update, ½ w_Qᵀ([F⁻¹]_QQ)⁻¹ w_Q, per block.

    Args:
        Finv: (nb, B, B) block inverses (from :func:`block_fisher_inverse`).
        w: (nb, B) weights, removed: (nb, B) bool — e.g. ``to_blocks(w, nb, B)``.
    Returns:
        (nb,) losses. Summed over blocks it equals f(w)/n − f(w̄)/n for the pruned w of
        the joint update, f the objective of problem (P).
    """
    z = _joint_coefficients(Finv, w, removed)
    return 0.5 * (w * z).sum(1)


def obs_update(Finv: torch.Tensor, w: torch.Tensor, removed: torch.Tensor, update: str) -> torch.Tensor:
    """w + δw per block for the removed set (removed entries are zeroed later). Shapes (nb, B)."""
    if update == "joint":
        u = _joint_coefficients(Finv, w, removed)  # ([F⁻¹]_QQ)⁻¹ w_Q
    else:  # independent: u_q = w_q / [F⁻¹]_qq on Q
        u = torch.where(removed, w / torch.diagonal(Finv, dim1=1, dim2=2), torch.zeros_like(w))
    return w - torch.bmm(Finv, u.unsqueeze(2)).squeeze(2)  # δw = −F⁻¹ u


def saliency_support(Finv: torch.Tensor, w_bar: torch.Tensor, k: int) -> torch.Tensor:
    """(p,) bool: the k weights of largest OBS saliency ρ_q = w_q² / (2[F⁻¹]_qq) (ties: lower index)."""
    p = w_bar.numel()
    diag = torch.diagonal(Finv, dim1=1, dim2=2).reshape(-1)[:p]  # (p,)
    rho = w_bar**2 / (2.0 * diag)
    return hard_threshold(rho, k)


# -- the method -----------------------------------------------------------------------------
def woodfisher(X: torch.Tensor, w_bar: torch.Tensor, k: int, *, l2: float, block_size: int = 100,
               update: str = "independent") -> Pruned:
    """One-shot WoodFisher pruning to k weights with a block-diagonal Fisher.

    Args:
        X: (n, p) gradients (rows), float32/float64, any device.
        w_bar: (p,) dense weights, same dtype and device as X.
        k: number of weights kept, 1 ≤ k ≤ p.
        l2: damping of F = l2·I + (1/n)XᵀX, > 0.
        block_size: Fisher block width (the last block may be shorter).
        update: "independent" (sum of single-weight OBS updates, WoodFisher) or "joint"
            (exact multi-weight OBS update per block).
    Returns:
        ``Pruned(w, support)``: support has exactly k True entries, w is 0 off it.
    """
    check_fisher_inputs(X, w_bar, k, l2)
    check_int("block_size", block_size)
    if update not in _UPDATES:
        raise ValueError(f"update must be one of {_UPDATES}, got {update!r}")
    p = w_bar.numel()
    Finv = block_fisher_inverse(X, l2, block_size)  # (nb, B, B)
    nb, B = Finv.shape[:2]
    support = saliency_support(Finv, w_bar, k)  # (p,)
    removed = ~to_blocks(support, nb, B, fill=True)  # (nb, B); padding counts as kept
    w = obs_update(Finv, to_blocks(w_bar, nb, B), removed, update)
    return finish(w.reshape(-1)[:p], support)


@register
@dataclass
class WoodFisher(Method):
    """WoodFisher: OBS saliency and update with the block-diagonal Fisher (blocks of ``block_size``);
    ``update`` "independent" (each weight's own OBS update) or "joint" (the removed set together)."""

    name = "wf"
    summary = "WoodFisher: OBS with a block-diagonal inverse Fisher"
    needs_l2 = True
    block_size: int = 100
    update: str = "independent"

    def working_bytes(self, n, p, k, itemsize):
        return super().working_bytes(n, p, k, itemsize) + 3 * p * self.block_size * itemsize  # block inverses

    def step(self, stage: Stage) -> Step:
        out = woodfisher(stage.X, stage.w, stage.k, l2=stage.l2, block_size=self.block_size, update=self.update)
        return Step(out.w, out.support, Problem(stage.X, stage.w, stage.l2, stage.alpha).objective(out.w))
