"""Block approximation (the paper's Alg 6): the Fisher is taken block-diagonal, so
after one global choice of the support each block is backsolved on its own columns.

Memory for a block's solve is n × |block|; time and memory are linear in p.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .backsolve import first_step_support, ridge_on_support
from .problem import Problem


def make_blocks(p: int, blocks) -> list[torch.Tensor]:
    """Normalise a block specification into a list of index tensors partitioning range(p).

    ``blocks`` may be an int B (contiguous blocks of B coordinates, the last shorter),
    a sequence of ints (contiguous block sizes summing to p, e.g. per-layer sizes), or
    a sequence of 1-D integer tensors that together cover every coordinate once.
    """
    if isinstance(blocks, bool):
        raise TypeError("blocks must be an int, a sequence of ints or a sequence of index tensors")
    if isinstance(blocks, int):
        if blocks < 1:
            raise ValueError(f"blocks (block size) must be >= 1, got {blocks}")
        return [torch.arange(s, min(s + blocks, p)) for s in range(0, p, blocks)]
    if not isinstance(blocks, Sequence) or len(blocks) == 0:
        raise TypeError("blocks must be an int, a non-empty sequence of ints or a sequence of index tensors")
    if all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
        if any(b < 1 for b in blocks) or sum(blocks) != p:
            raise ValueError(f"block sizes must be >= 1 and sum to p = {p}, got sum {sum(blocks)}")
        starts = [0]
        for b in blocks[:-1]:
            starts.append(starts[-1] + b)
        return [torch.arange(s, s + b) for s, b in zip(starts, blocks)]
    idx = [torch.as_tensor(b).long().flatten() for b in blocks]
    seen = torch.cat(idx)
    if seen.numel() != p or not torch.equal(torch.sort(seen).values, torch.arange(p)):
        raise ValueError(f"blocks must partition range(p) with p = {p}: every coordinate exactly once")
    return idx


def block_backsolve(problem: Problem, k: int, blocks, support: torch.Tensor | None = None):
    """Alg 6: global support (one thresholding step), then a ridge solve per block.

    Block b solves min ½‖X_b(w_b − w̄_b)‖² + λ‖w_b − w̄_b‖² + α_bᵀw_b on its share of
    the support: the cross-block terms of XᵀX are dropped. With one block this is
    exactly :func:`chita_minimal.backsolve.backsolve`. Returns (w, support).
    """
    if support is None:
        support = first_step_support(problem, k)
    w = torch.zeros_like(problem.w_bar)
    device = problem.X.device
    for b in make_blocks(problem.p, blocks):
        b = b.to(device)
        alpha_b = None if problem.alpha is None else problem.alpha[b]
        sub = Problem(problem.X[:, b], problem.w_bar[b], problem.l2, alpha_b)
        w[b] = ridge_on_support(sub, support[b])
    return w, support
