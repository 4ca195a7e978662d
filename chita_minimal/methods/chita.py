"""CHITA's variants as pruning methods: each one names a solver of :mod:`chita_minimal.solver` and its options.

| method | solver | paper |
|---|---|---|
| ``chita`` | active-set IHT with the line-search step | Alg 4 (with Alg 2/3) |
| ``chita-iht`` | line-search IHT | Alg 2/3 |
| ``chita-bso`` | one thresholding step, then the ridge solve on the support | Alg 5 |
| ``chita-block`` | per-layer blocks of ``block_size``, one global support, backsolve per block | Alg 6 |
| ``chita-block-iht`` | active set on the block-diagonal problem, then the per-block backsolve | Alg 6 + Alg 4 |
| ``chita++`` | a schedule of sparsities, X recomputed at every stage | Alg 1 |
"""

from __future__ import annotations

from dataclasses import dataclass

from chita_minimal.methods.base import REGISTRY, Method, ModelMethod, OptionError, Stage, Step, register
from chita_minimal.solver.blocks import PARTITIONS, layer_blocks
from chita_minimal.solver.schedules import SCHEDULES
from chita_minimal.solver.schedules import schedule as make_schedule
from chita_minimal.solver.solve import solve
from chita_minimal.utils import check_int


class ChitaSolve(Method):
    """A CHITA variant: ``prune`` solves problem (P) with :func:`chita_minimal.solver.solve.solve`."""

    solver = ""
    takes_mask = True
    takes_sharded = True

    def solver_options(self, stage: Stage) -> dict:
        return {}

    def working_bytes(self, n, p, k, itemsize):
        # the kept columns X_S gathered for the ridge solve, and its k×k (or n×n, Woodbury) system
        return super().working_bytes(n, p, k, itemsize) + (n * k + min(n, k) ** 2) * itemsize

    def step(self, stage: Stage) -> Step:
        res = solve(stage.X, stage.w, None if stage.pattern is not None else stage.k, l2=stage.l2, alpha=stage.alpha,
                    method=self.solver, mask=stage.mask, distributed=stage.sharded, pattern=stage.pattern,
                    **self.solver_options(stage))
        return Step(res.w, res.support, res.objective)


def _check_iterations(max_iter, tol) -> None:
    check_int("max_iter", max_iter)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")


@register
@dataclass
class Chita(ChitaSolve):
    """Active-set CHITA (Alg 4): IHT with the line-search step on a growing active set, polished by a
    ridge solve on the final support. Options: see :func:`chita_minimal.solver.active_set.active_set`."""

    name = "chita"
    summary = "active-set IHT with line search, ridge polish (Alg 4)"
    solver = "active"
    takes_pattern = True
    expand: float = 1.5
    max_rounds: int = 10
    max_iter: int = 500
    tol: float = 1e-7
    max_halvings: int = 10
    swap_candidates: int = 50
    polish: bool = True
    refit: int | None = 15
    sync_free: bool = False
    exact_search: bool = True

    def check(self):
        _check_iterations(self.max_iter, self.tol)
        for name in ("sync_free", "exact_search"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def working_bytes(self, n, p, k, itemsize):
        # the active set's restricted copy of X (up to expand·k columns) on top of the ridge solve
        return super().working_bytes(n, p, k, itemsize) + n * min(p, int(self.expand * k) + 1) * itemsize

    def solver_options(self, stage):
        return dict(expand=self.expand, max_rounds=self.max_rounds, max_iter=self.max_iter, tol=self.tol,
                    max_halvings=self.max_halvings, swap_candidates=self.swap_candidates, polish=self.polish,
                    refit=self.refit, sync_free=self.sync_free, exact_search=self.exact_search)


@register
@dataclass
class ChitaIHT(ChitaSolve):
    """IHT with the line-search step size (Alg 2/3) on the full problem."""

    name = "chita-iht"
    summary = "IHT with the line-search step size (Alg 2/3)"
    solver = "iht"
    takes_pattern = True
    max_iter: int = 500
    tol: float = 1e-7
    refit: int | None = None
    sync_free: bool = False

    def check(self):
        _check_iterations(self.max_iter, self.tol)
        if not isinstance(self.sync_free, bool):
            raise TypeError(f"sync_free must be True or False, got {self.sync_free!r}")

    def solver_options(self, stage):
        return dict(max_iter=self.max_iter, tol=self.tol, refit=self.refit, sync_free=self.sync_free)


@register
@dataclass
class ChitaBSO(ChitaSolve):
    """CHITA-BSO (Alg 5): support from one thresholding step, then the ridge solve on it
    (the n×n Woodbury form when n < k; ``woodbury`` forces one path)."""

    name = "chita-bso"
    summary = "backsolve: one thresholding step, ridge solve on the support (Alg 5)"
    solver = "backsolve"
    takes_pattern = True
    woodbury: bool | None = None

    def solver_options(self, stage):
        return {} if self.woodbury is None else dict(woodbury=self.woodbury)


@register
@dataclass
class ChitaBlock(ChitaSolve):
    """Block CHITA (Alg 6): blocks of ``block_size`` weights inside each layer, one global support,
    an exact ridge solve per block (the paper's choice for large networks)."""

    name = "chita-block"
    summary = "block backsolve: per-layer blocks, one global support, ridge solve per block (Alg 6)"
    solver = "block"
    block_size: int = 500
    partition: str = "fixed"

    def check(self):
        check_int("block_size", self.block_size)
        check_partition(self.partition)

    def working_bytes(self, n, p, k, itemsize):
        # one Gram of at most block_size² numbers per block, and the gathered kept columns
        return Method.working_bytes(self, n, p, k, itemsize) + (p * self.block_size + n * k) * itemsize

    def solver_options(self, stage):
        return dict(blocks=layer_blocks(stage.layout, self.block_size, self.partition))

    def prune_streamed(self, model, dataset, sparsity, settings, names):
        """The same block backsolve from streamed gradients, never holding X (when X would not fit):
        :func:`chita_minimal.scale.streaming.block_backsolve_streamed`; None where it does not apply
        (first-order term, kept zeros or an N:M pattern). Returns (w, support) without writing the model."""
        if settings.first_order or settings.keep_pruned or settings.pattern is not None:
            return None
        from chita_minimal.scale.streaming import block_backsolve_streamed  # the scale layer, only when needed

        out = block_backsolve_streamed(model, dataset, sparsity, n_grads=settings.n_grads, block_size=self.block_size,
                                       partition=self.partition, l2=settings.l2, seed=settings.seed,
                                       batch_size=settings.batch_size,
                                       names=names, device=settings.device, write_back=False)
        return out


@register
@dataclass
class ChitaBlockIHT(Chita):
    """Active-set IHT on the block-diagonal Fisher with one global top-k, ending with the per-block
    backsolve. Options of the active set as for ``chita``, plus ``block_size``."""

    name = "chita-block-iht"
    summary = "active set on the block-diagonal problem, then the per-block backsolve (Alg 6 + 4)"
    solver = "block-iht"
    takes_pattern = False
    takes_sharded = False
    block_size: int = 500
    partition: str = "fixed"

    def check(self):
        super().check()
        check_int("block_size", self.block_size)
        check_partition(self.partition)

    def working_bytes(self, n, p, k, itemsize):
        # the block-diagonal operator holds a padded copy of X and one Gram per block
        return super().working_bytes(n, p, k, itemsize) + (n * p + p * self.block_size) * itemsize

    def solver_options(self, stage):
        return dict(blocks=layer_blocks(stage.layout, self.block_size, self.partition),
                    **super().solver_options(stage))


@register
@dataclass
class ChitaPlusPlus(Method):
    """CHITA++ (Alg 1): prune in ``stages`` steps along a sparsity ``schedule`` from ``base``, recomputing
    the gradients at the current (already pruned) weights every stage; each stage is solved by
    ``stage_method`` (a method object, or a name whose options may be given beside these)."""

    name = "chita++"
    summary = "multi-stage: a sparsity schedule, gradients recomputed each stage (Alg 1)"
    schedule: str = "exp"
    stages: int = 10
    base: float = 0.1
    stage_method: Method | str = "chita"

    @classmethod
    def create(cls, **options) -> Method:
        own = {k: v for k, v in options.items() if k in cls.option_names()}
        rest = {k: v for k, v in options.items() if k not in own}
        stage = own.get("stage_method", "chita")
        if rest:
            if not isinstance(stage, str) or stage not in REGISTRY:
                raise OptionError(f"method 'chita++' has no option {next(iter(rest))!r}; its options: "
                                  f"{', '.join(cls.option_names())} (and those of a stage_method given by name)")
            try:
                own["stage_method"] = REGISTRY[stage].create(**rest)
            except OptionError as e:
                raise OptionError(f"{e} (for chita++, the options of the stage method {stage!r} and "
                                  f"{', '.join(cls.option_names())})") from None
        return cls(**own)

    def check(self):
        if isinstance(self.stage_method, str):
            valid = [n for n, c in REGISTRY.items() if _stageable(c)]
            if self.stage_method not in valid:
                raise ValueError(f"unknown stage_method {self.stage_method!r}; valid: {', '.join(valid)}")
            self.stage_method = REGISTRY[self.stage_method].create()
        if not isinstance(self.stage_method, Method) or not _stageable(type(self.stage_method)):
            raise ValueError(f"stage_method must be a one-step method (not chita++ or a layer-wise method), "
                             f"got {self.stage_method!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid names: {', '.join(SCHEDULES)}")
        check_int("stages", self.stages)

    @property
    def needs_gradients(self) -> bool:
        return self.stage_method.needs_gradients

    def plan(self, sparsity):
        return [(s, self.stage_method) for s in make_schedule(self.schedule, sparsity, self.stages, self.base)]


def _stageable(cls) -> bool:
    """Whether a method can solve a stage of CHITA++: one step to exactly k weights."""
    return cls.exact_k and not issubclass(cls, (ChitaPlusPlus, ModelMethod))


def check_partition(partition) -> None:
    """``partition`` of the block methods: "fixed" (blocks of block_size, a shorter last one per layer) or
    "equal" (each layer cut into equal blocks); see :func:`chita_minimal.solver.blocks.layer_blocks`."""
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {', '.join(map(repr, PARTITIONS))}, got {partition!r}")
