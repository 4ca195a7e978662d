"""N:M semi-structured sparsity as the constraint of problem (P).

The coordinates of w are partitioned into groups of M; a feasible w has at most N nonzeros in
every group, and the kept support has exactly N per group (2:4 is what sparse tensor cores run).
The CHITA solvers (Alg 2-5 of Benbaki et al. 2023) only use the constraint through a projection
(H_k, the top-k of |u|) and the step τ_c that keeps a support (Alg 2); :class:`NM` provides
both for N:M — top-N of |u| within every group, and τ_c with the largest pruned |g_j| taken per
group. Global top-k is the special case of one group of p coordinates.

    n, m = parse_pattern("2:4")
    pattern = NM(n, m, nm_groups(layout, m))      # layout: params.Layout or a list of shapes
    solve(X, w_bar, pattern=pattern)              # k = pattern.k = G·N
"""

from __future__ import annotations

import itertools
import math

import torch


def parse_pattern(spec) -> tuple[int, int]:
    """The one N:M type of the package: ``"2:4"`` or ``(2, 4)`` → ``(2, 4)``, N kept out of every M, 1 ≤ N < M.
    Every entry point that takes a pattern (``prune``, ``layerwise_prune``, the layer solvers) reads it here."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        n, m = spec
        _check_nm(n, m)
        return n, m
    if not isinstance(spec, str):
        raise TypeError(f"pattern must be 'N:M' (e.g. '2:4') or a pair (N, M), got {spec!r}")
    parts = spec.strip().split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        n, m = (int(s) for s in parts)
    except ValueError:
        raise ValueError(f"pattern must look like 'N:M' with integers N and M (e.g. '2:4'), got {spec!r}") from None
    _check_nm(n, m)
    return n, m


def _check_nm(n, m) -> None:
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 1 <= n < m:
        raise ValueError(f"an N:M pattern needs 1 <= N < M, got N = {n}, M = {m}")


def row_length(shape, transposed: bool = False) -> int:
    """Length of the rows an N:M pattern runs along: the weight viewed as (out, rest); a 1-D weight is one row;
    a linear map stored in × out (``transposed``, GPT-2's Conv1D) has rows of length in = shape[0]."""
    numel = math.prod(shape)
    if transposed and len(shape) == 2:
        return shape[0]
    return numel if len(shape) <= 1 else numel // shape[0]


def nm_groups(layout, m: int) -> torch.LongTensor:
    """Groups of M consecutive entries along every row of every layer of a flat weight vector.

    ``layout`` is a :class:`chita_minimal.network.params.Layout` or a sequence of parameter shapes
    (stored one after the other, each row-major). Each weight is viewed as (out, rest), a 1-D
    weight as one row, and every row is cut into runs of M consecutive entries: the usual 2:4
    convention along the input dimension of a Linear layer (for a Conv weight (out, in, kh, kw)
    the runs go along the flattened (in, kh, kw)). A weight the layout marks ``transposed`` (a linear map
    stored in × out, GPT-2's Conv1D) has its runs along its stored columns, the input dimension as well.
    Returns a (G, M) LongTensor (on the CPU).
    """
    if isinstance(m, bool) or not isinstance(m, int):
        raise TypeError(f"m must be an int, got {type(m).__name__}")
    if m < 2:
        raise ValueError(f"m must be >= 2, got {m}")
    if hasattr(layout, "shapes") and hasattr(layout, "offsets"):  # a params.Layout
        names, shapes, offsets = layout.names, layout.shapes, layout.offsets
        transposed = getattr(layout, "transposed", ()) or (False,) * len(shapes)
    elif isinstance(layout, (list, tuple)) and layout:
        shapes = [torch.Size(s) for s in layout]
        names = [f"layer {i}" for i in range(len(shapes))]
        offsets = [0, *itertools.accumulate(s.numel() for s in shapes)][:-1]
        transposed = (False,) * len(shapes)
    else:
        raise TypeError(f"layout must be a params.Layout or a non-empty list of shapes, got {layout!r}")
    out = []
    for name, shape, offset, flip in zip(names, shapes, offsets, transposed):
        numel = math.prod(shape)
        flip = flip and len(shape) == 2
        row = row_length(shape, flip)
        if numel == 0 or row % m:
            raise ValueError(f"{name} (shape {tuple(shape)}): row length {row} is not divisible by M = {m}")
        index = torch.arange(offset, offset + numel)
        out.append((index.view(shape[0], shape[1]).T if flip else index).reshape(-1, m))
    return torch.cat(out)


class NM:
    """N:M sparsity over groups of coordinates: exactly ``n`` kept in every row of ``groups``.

    Args:
        n, m: keep n of every m, 1 ≤ n < m.
        groups: (G, m) LongTensor of coordinate indices; every coordinate 0..p−1 appears exactly
            once (p = G·m). Its device is the device of the solve (see :meth:`to`).

    Restricted patterns (:meth:`restrict`, used by the active set of Alg 4) may hold fewer than m
    coordinates in a group: the missing entries are −1.
    """

    def __init__(self, n: int, m: int, groups: torch.Tensor):
        _check_nm(n, m)
        if not isinstance(groups, torch.Tensor) or groups.dtype != torch.long:
            raise TypeError(f"groups must be a LongTensor, got {getattr(groups, 'dtype', type(groups).__name__)}")
        if groups.dim() != 2 or groups.shape[1] != m or groups.shape[0] == 0:
            raise ValueError(f"groups must have shape (G, M) = (G, {m}) with G >= 1, got {tuple(groups.shape)}")
        p = groups.numel()
        if not torch.equal(groups.flatten().sort().values, torch.arange(p, device=groups.device)):
            raise ValueError(f"groups must contain every coordinate 0..{p - 1} exactly once")
        self._set(n, m, groups, p)

    def _set(self, n, m, groups, p):
        self.n, self.m, self.p = n, m, p
        # rows in increasing index order (padding −1 sorts last), so stable sorts break ties by index
        key = torch.where(groups >= 0, groups, torch.full_like(groups, p))
        self.groups = groups.gather(1, key.argsort(dim=1))
        self._valid = self.groups >= 0
        rows = torch.arange(self.groups.shape[0], device=groups.device).unsqueeze(1).expand_as(self.groups)
        self.group_of = torch.empty(p, dtype=torch.long, device=groups.device)  # (p,) group of each coordinate
        self.group_of[self.groups[self._valid]] = rows[self._valid]

    @classmethod
    def for_layout(cls, spec: str, layout) -> "NM":
        """``NM.for_layout("2:4", layout)``: :func:`parse_pattern` and :func:`nm_groups` in one call."""
        n, m = parse_pattern(spec)
        return cls(n, m, nm_groups(layout, m))

    @property
    def k(self) -> int:
        """Number of kept coordinates, G·N."""
        return self.groups.shape[0] * self.n

    def check_k(self, k) -> int:
        """``k`` of a solver called with this pattern: None or G·N; returns G·N."""
        if k is not None and k != self.k:
            raise ValueError(f"k = {k} does not match the {self.n}:{self.m} pattern, which keeps "
                             f"k = G·N = {self.k}; pass k=None")
        return self.k

    def to(self, device) -> "NM":
        if self.groups.device == torch.device(device):
            return self
        out = NM.__new__(NM)
        out._set(self.n, self.m, self.groups.to(device), self.p)
        return out

    def keep_top(self, v: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """Bool mask of the n (default N) largest |v_i| of every group; ties: the lower index wins."""
        n = self.n if n is None else n
        a = torch.where(self._valid, v.abs()[self.groups.clamp(min=0)], -torch.ones((), dtype=v.dtype, device=v.device))
        order = torch.sort(a, dim=1, descending=True, stable=True).indices[:, :n]
        chosen = self.groups.gather(1, order)
        mask = torch.zeros(self.p, dtype=torch.bool, device=v.device)
        mask[chosen[chosen >= 0]] = True
        return mask

    def project(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The N:M projection (H_k of the paper for this constraint): (u outside the kept set zeroed, kept mask)."""
        mask = self.keep_top(u)
        return torch.where(mask, u, torch.zeros_like(u)), mask

    def support_of(self, w: torch.Tensor) -> torch.Tensor:
        """The N kept coordinates of every group: the nonzeros of w, filled up by lowest index."""
        return self.keep_top((w != 0).to(w.dtype))

    def counts(self, mask: torch.Tensor) -> torch.Tensor:
        """(G,) number of True entries of ``mask`` (or nonzeros of a vector) in every group."""
        nz = (mask != 0)[self.groups.clamp(min=0)] & self._valid
        return nz.sum(1)

    def max_pruned(self, g: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """(p,) max |g_j| over the pruned j of each coordinate's group: the M of τ_c (Alg 2), per group.

        −inf for a group with no pruned coordinate (a restricted group of N): its support cannot change.
        """
        idx = self.groups.clamp(min=0)
        pruned = self._valid & ~support[idx]
        best = torch.where(pruned, g.abs()[idx], torch.full((), -math.inf, dtype=g.dtype, device=g.device)).amax(1)
        return best[self.group_of]

    def restrict(self, idx: torch.Tensor) -> "NM":
        """The pattern on the coordinates ``idx`` (sorted), renumbered 0..len(idx)−1 as in
        :meth:`Problem.restrict`; coordinates outside idx become −1. Every group must keep ≥ N."""
        remap = torch.full((self.p,), -1, dtype=torch.long, device=idx.device)
        remap[idx] = torch.arange(idx.numel(), device=idx.device)
        groups = torch.where(self._valid, remap[self.groups.clamp(min=0)], torch.full_like(self.groups, -1))
        if bool(((groups >= 0).sum(1) < self.n).any()):
            raise ValueError(f"the restriction leaves fewer than N = {self.n} coordinates in some group")
        out = NM.__new__(NM)
        out._set(self.n, self.m, groups, idx.numel())
        return out

    def __repr__(self) -> str:
        return f"NM({self.n}:{self.m}, groups={self.groups.shape[0]}, p={self.p}, device={self.groups.device})"
