"""CHITA with ``torch.distributed``: the rows of X spread over the processes of a group.

Launched with ``torchrun --nproc-per-node G script.py`` (or any initialised process group:
``gloo`` on CPU, ``nccl`` on GPUs), every rank computes its share of the n gradient rows
(:func:`chita_minimal.network.fisher.gradients` does this by itself under a group of more than one
process) and holds only those rows, X_r (n_r × p). The solver is unchanged; only the
products that sum over rows talk to the other ranks:

    X v        local: each rank forms its own n_r entries of the residual
    Xᵀ r       Σ_r X_rᵀ r_r: one all_reduce of a p-vector per product
    ‖r‖², line-search scalars: one all_reduce of a number each

so every rank holds the same w, support and objective at every iteration. The exact ridge
solve on a support (backsolve, the active set's final polish) gathers the kept columns'
rows, X_S (n × |S|), and solves on rank 0, which broadcasts the weights.

:class:`ShardedProblem` is problem (P) on a row shard; ``solve(..., distributed=True)`` and
``prune`` under a group use it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from chita_minimal.solver.backsolve import first_step_support
from chita_minimal.solver.blocks import block_backsolve, make_blocks
from chita_minimal.solver.problem import Problem, ridge_on_support, ridge_outside


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def row_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of rank ``rank``: contiguous shares, the first n mod world ranks one row more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_same(**values) -> None:
    """Raise ValueError on every rank when some rank was given different values (k, p, seeds, …)."""
    if not active():
        return
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    for name in values:
        seen = [g[name] for g in gathered]
        if any(v != seen[0] for v in seen):
            raise ValueError(f"ranks disagree on {name}: " + ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(seen)))


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows of ``t`` (first dimension may differ across ranks), in rank order."""
    counts = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([t.shape[0]], dtype=torch.long, device=t.device))
    counts = [int(c) for c in counts]
    padded = t.new_zeros(max(counts), *t.shape[1:])
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


class ShardedProblem(Problem):
    """Problem (P) whose X is split by rows across the ranks of the default process group.

    Args:
        X: (n_r, p) this rank's rows; w_bar (p,), l2, alpha (p,): the same on every rank
            (checked: shapes and l2). λ = l2·n/2 uses the total n = Σ_r n_r.
    """

    dense_x = False  # X v needs the other ranks' rows

    def __init__(self, X, w_bar, l2: float = 0.0, alpha=None, *, y=None, offset: float = 0.0, n_total=None):
        if not active():
            raise RuntimeError("ShardedProblem needs an initialised torch.distributed process group of > 1 process "
                               "(e.g. launched with torchrun)")
        super().__init__(X, w_bar, l2, alpha, y=y, offset=offset)
        if n_total is None:
            check_same(p=self.p, l2=self.l2, dtype=str(X.dtype), alpha=alpha is not None)
            n_total = int(_all_reduce(torch.tensor([self.n], dtype=torch.long, device=X.device)))
        self.n_local, self.n = self.n, n_total
        self.lam = self.l2 * self.n / 2.0

    def rmatvec(self, r):
        return _all_reduce(self.X.T @ r)

    def rdot(self, a, b):
        return float(_all_reduce(torch.dot(a, b).reshape(1).double()))

    def objective(self, w, r=None):
        if r is None:
            r = self.residual(w)
        f = 0.5 * self.rdot(r, r) + self.lam * float(torch.sum((w - self.w_bar) ** 2))
        if self.alpha is not None:
            f += float(torch.dot(self.alpha, w))
        return f + self.offset

    def columns(self, idx):
        return gather_rows(self.X[:, idx]).T  # (m, n): all rows of the columns idx

    def residual_blocks(self, r):
        return gather_rows(r).view(1, -1)

    def restrict(self, idx):
        offset = self.offset + ridge_outside(self.w_bar, idx, self.lam)
        alpha = None if self.alpha is None else self.alpha[idx]
        return ShardedProblem(self.X[:, idx], self.w_bar[idx], self.l2, alpha, y=self.y, offset=offset,
                              n_total=self.n)

    def ridge(self, support):
        """The exact solve on the support: X_S's rows are gathered, rank 0 solves, every rank gets its w."""
        idx = torch.nonzero(support).squeeze(1)
        XS = gather_rows(self.X[:, idx])  # (n, |S|)
        y = gather_rows(self.y)
        w = torch.zeros_like(self.w_bar)
        if dist.get_rank() == 0:
            full = Problem(XS, self.w_bar[idx], self.l2, None if self.alpha is None else self.alpha[idx], y=y)
            w[idx] = ridge_on_support(full, torch.ones(idx.numel(), dtype=torch.bool, device=XS.device))
        dist.broadcast(w, 0)
        return w

    def __repr__(self) -> str:
        rank, world = rank_and_world()
        return f"ShardedProblem(rank {rank}/{world}, rows {self.n_local} of n={self.n}, p={self.p}, l2={self.l2:g})"


def block_backsolve_sharded(problem: ShardedProblem, k: int, blocks, support: torch.Tensor | None = None):
    """Alg 6 with row-sharded X: the blocks are dealt out to the ranks (block b to rank b mod W).

    Every rank sends its rows of the other ranks' block columns (one ``gather`` per rank, the
    volume of X moved once), solves its own blocks on all n rows with the batched
    :func:`chita_minimal.solver.blocks.block_backsolve`, and the solved blocks are combined by one
    all-reduce of the p-vector (disjoint columns). Returns (w, support), the same on every rank.
    """
    rank, world = rank_and_world()
    if support is None:
        support = first_step_support(problem, k)
    parts = make_blocks(problem.p, blocks)
    dev = problem.device
    X = problem.X  # (n_r, p) this rank's rows
    counts = [b - a for a, b in (row_range(problem.n, r, world) for r in range(world))]  # rows per rank
    n_max = max(counts)
    mine = None
    for q in range(world):
        cols = torch.cat(parts[q::world]).to(dev) if parts[q::world] else torch.zeros(0, dtype=torch.long, device=dev)
        send = X.new_zeros(n_max, cols.numel())
        send[:X.shape[0]] = X[:, cols]
        bufs = [torch.empty_like(send) for _ in range(world)] if rank == q else None
        dist.gather(send, bufs, dst=q)
        if rank == q:
            mine = (cols, torch.cat([buf[:c] for buf, c in zip(bufs, counts)]))  # (n, |cols|)
    cols, Xq = mine
    w = torch.zeros_like(problem.w_bar)
    if cols.numel():
        sizes = [len(b) for b in parts[rank::world]]
        alpha = None if problem.alpha is None else problem.alpha[cols]
        local = Problem(Xq, problem.w_bar[cols], problem.l2, alpha)
        w[cols], _ = block_backsolve(local, 1, sizes, support=support[cols])
    dist.all_reduce(w)
    return w, support
