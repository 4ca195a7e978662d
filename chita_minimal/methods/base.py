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

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from chita_minimal.registry import OptionError, Options, Registry  # noqa: F401 (OptionError: part of this API)

if TYPE_CHECKING:
    from chita_minimal.network.params import Layout
    from chita_minimal.solver.patterns import NM

# prune's own arguments (see :class:`Settings`): a method's options must not take these names
PRUNE_ARGUMENTS = ("n_grads", "batch_size", "l2", "seed", "names", "device", "first_order", "keep_pruned", "pattern",
                   "progress", "loss_fn", "output_fn", "max_memory")


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


class Method(Options):
    """Base of every pruning method; subclasses are dataclasses whose fields are their options.

    Class attributes say what the method needs: ``needs_gradients`` (X is computed for it),
    ``needs_l2`` (l2 > 0: it damps the Fisher), ``takes_pattern`` (N:M patterns), ``takes_mask``
    (keeps given zeros itself: CHITA++ stages and ``keep_pruned``), ``takes_sharded`` (works on a
    row shard of X under ``torch.distributed``; other methods get the gathered X), ``exact_k``
    (keeps exactly k weights; False when it chooses the count, e.g. whole filters).
    """

    needs_gradients: ClassVar[bool] = True
    needs_l2: ClassVar[bool] = False
    takes_pattern: ClassVar[bool] = False
    takes_mask: ClassVar[bool] = False
    takes_sharded: ClassVar[bool] = False
    exact_k: ClassVar[bool] = True

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


REGISTRY = Registry(Method, "prune", PRUNE_ARGUMENTS)
register = REGISTRY.register  # class decorator: make a Method subclass available to prune(method=cls.name)
get = REGISTRY.get  # a method object from a registered name and options, a Method class, or the object itself
available = REGISTRY.available  # registered method names with their one-line descriptions


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
