"""A pruning method is an object: it owns its options, validates them, says what it needs, and prunes.

``prune(model, data, sparsity, method=...)`` builds the flat problem of one pruning step — the
weights w̄ of the prunable layers, k = number to keep and, when the method asks for them, the
n×p per-sample gradients X of the empirical Fisher — and hands it to the method as a
:class:`Stage`. The method returns a :class:`Step` (new weights, support, objective of (P)).
A method that works layer by layer on the model itself (SparseGPT) is a :class:`ModelMethod`
and runs the whole call instead.

Adding a method is one new file::

    @register
    @dataclass
    class Random(Method):
        name = "random"
        summary = "keep k weights at random (a sanity baseline)"
        needs_gradients = False
        seed: int = 0

        def step(self, stage):
            ...

after which ``prune(model, data, 0.9, method="random", seed=3)`` works and ``available()`` lists it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from chita_minimal.network.params import Layout
    from chita_minimal.solver.patterns import NM

REGISTRY: dict[str, type[Method]] = {}
# prune's own arguments (see :class:`Settings`): a method's options must not take these names
PRUNE_ARGUMENTS = ("n_grads", "batch_size", "l2", "seed", "names", "device", "first_order", "keep_pruned", "pattern",
                   "progress", "loss_fn", "output_fn", "max_memory")


class OptionError(TypeError, ValueError):
    """An option the method does not have (a TypeError, as for a wrong keyword; a ValueError for older callers)."""


@dataclass
class Stage:
    """One pruning step as ``prune`` hands it to a method (the solver world: tensors only).

    X: (n, p) per-sample gradients (this rank's rows when ``sharded``), None for a method that
    does not need them; w: (p,) current weights w̄; k: number of weights to keep; l2, alpha:
    the ridge weight and first-order term of problem (P); mask: (p,) bool, False where a weight
    must stay zero (``keep_pruned``; only given to methods with ``takes_mask``); pattern: an N:M
    constraint instead of global top-k; layout: names and shapes of the prunable parameters
    behind the flat vector; sparsity: the target of this step.
    """

    X: torch.Tensor | None
    w: torch.Tensor
    k: int
    l2: float
    alpha: torch.Tensor | None
    mask: torch.Tensor | None
    sharded: bool
    pattern: NM | None
    layout: Layout
    sparsity: float


@dataclass
class Settings:
    """``prune``'s arguments that are not the method's own options (what a :class:`ModelMethod` gets)."""

    n_grads: int
    batch_size: int
    l2: float
    seed: int
    names: list[str] | None
    device: object
    first_order: bool
    keep_pruned: bool
    pattern: str | None
    progress: bool
    loss_fn: object = None
    output_fn: object = None
    max_memory: object = None


@dataclass
class Step:
    """What one pruning step returns: weights, kept coordinates, f(w) of (P) (None when not defined)."""

    w: torch.Tensor
    support: torch.Tensor
    objective: float | None


class Method:
    """Base of every pruning method; subclasses are dataclasses whose fields are their options.

    Class attributes say what the method needs: ``needs_gradients`` (X is computed for it),
    ``needs_l2`` (l2 > 0: it damps the Fisher), ``takes_pattern`` (N:M patterns), ``takes_mask``
    (keeps given zeros itself: CHITA++ stages and ``keep_pruned``), ``takes_sharded`` (works on a
    row shard of X under ``torch.distributed``; other methods get the gathered X), ``exact_k``
    (keeps exactly k weights; False when it chooses the count, e.g. whole filters).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_gradients: ClassVar[bool] = True
    needs_l2: ClassVar[bool] = False
    takes_pattern: ClassVar[bool] = False
    takes_mask: ClassVar[bool] = False
    takes_sharded: ClassVar[bool] = False
    exact_k: ClassVar[bool] = True

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ()

    @classmethod
    def create(cls, **options) -> Method:
        """The method with these options; an unknown option is a TypeError that lists the valid ones."""
        unknown = [k for k in options if k not in cls.option_names()]
        if unknown:
            valid = ", ".join(cls.option_names()) or "none"
            raise OptionError(f"method {cls.name!r} has no option {unknown[0]!r}; its options: {valid}")
        return cls(**options)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise TypeError/ValueError naming the option when an option value is invalid."""

    def plan(self, sparsity: float) -> list[tuple[float, Method]]:
        """The (sparsity, method) of each pruning step; one step unless the method is multi-stage (CHITA++)."""
        return [(sparsity, self)]

    def step(self, stage: Stage) -> Step:
        raise NotImplementedError(f"method {self.name!r} does not implement step()")

    def working_bytes(self, n: int, p: int, k: int, itemsize: int) -> int:
        """Bytes the step needs beyond X (n×p) itself, for the memory plan made before X is built:
        by default a few p- and n-vectors; methods with larger temporaries say so."""
        return (16 * p + 8 * n) * itemsize


class ModelMethod(Method):
    """A method that prunes the model itself, layer by layer, instead of one flat step (SparseGPT)."""

    needs_gradients: ClassVar[bool] = False

    def prune_model(self, model, data, sparsity: float, settings):
        """Prune ``model`` in place and return a :class:`~chita_minimal.report.PruneReport`; ``settings``
        holds prune's common arguments (n_grads, batch_size, seed, names, device, pattern, ...)."""
        raise NotImplementedError


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available to ``prune(method=cls.name)``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register takes a Method subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    clash = [o for o in cls.option_names() if o in PRUNE_ARGUMENTS]
    if clash:
        raise ValueError(f"{cls.__name__}: option {clash[0]!r} is an argument of prune itself; choose another name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is registered already ({REGISTRY[cls.name].__name__})")
    REGISTRY[cls.name] = cls
    return cls


def get(method, **options) -> Method:
    """A method object from a registered name and options, or the object itself (then no options)."""
    if isinstance(method, Method):
        if options:
            raise TypeError(f"options ({', '.join(options)}) go into the method object when method is one, "
                            f"e.g. {type(method).__name__}({next(iter(options))}=...)")
        return method
    if isinstance(method, type) and issubclass(method, Method):
        return method.create(**options)
    if not isinstance(method, str):
        raise TypeError(f"method must be a method name or a chita_minimal.methods.Method, got {type(method).__name__}")
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(REGISTRY)}")
    return REGISTRY[method].create(**options)


def available() -> dict[str, str]:
    """Registered method names with their one-line descriptions."""
    return {name: cls.summary for name, cls in REGISTRY.items()}


def table() -> str:
    """The registered methods as a Markdown table (name, class, options, summary) — the README's table."""
    rows = ["| method | class | options | what it does |", "|---|---|---|---|"]
    for name, cls in REGISTRY.items():
        opts = ", ".join(f"`{o}`" for o in cls.option_names()) or "–"
        rows.append(f"| `{name}` | `{cls.__name__}` | {opts} | {cls.summary} |")
    return "\n".join(rows)


def dataset_size(dataset) -> int:
    """Number of samples of an indexable dataset; TypeError in the user's words otherwise."""
    try:
        return len(dataset)
    except TypeError:
        raise TypeError("dataset must be a sized, indexable dataset of (x, y) pairs") from None
