"""Small helpers shared by the package: device choice, seeding, a model's train/eval mode for a block, argument checks,
renamed arguments."""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import random
import warnings
from contextlib import contextmanager

import numpy as np
import torch


def device(prefer: str | None = None) -> torch.device:
    """The device to run on: ``prefer`` if given, else CUDA when available, else CPU."""
    if prefer is not None:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def model_mode(model: torch.nn.Module, training: bool):
    """``model`` in training (``training=True``) or evaluation mode inside the block; its own mode back afterwards,
    also on an error."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


def check_int(name: str, value, low: int | None = 1, high: int | None = None) -> int:
    """``value`` as an int if it is an integer (Python or NumPy, not a bool) in [``low``, ``high``] (None: no bound);
    TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f"be >= {low}" if high is None else f"lie in [{'-inf' if low is None else low}, {high}]"
        raise ValueError(f"{name} must {bound}, got {value}")
    return int(value)


def check_number(arg, value, low=None, high=None, low_open=False, high_open=False) -> float:
    """``value`` as a float if it is a finite real number (not a bool) in the bounds (``*_open``: strict);
    TypeError/ValueError naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{arg} must be a finite number, got {value}")
    if (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and (value >= high if high_open else value > high)):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{arg} must lie in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}, "
                         f"got {value}")
    return float(value)


def check_fraction(name: str, value) -> float:
    """``value`` as a float strictly between 0 and 1 (a fraction to remove or keep); TypeError/ValueError naming
    ``name``."""
    return check_number(name, value, 0, 1, low_open=True, high_open=True)


def check_bits(value) -> int:
    """``value`` as an int bit width of a quantization grid, 2 to 16; TypeError/ValueError naming ``bits``."""
    return check_int("bits", value, low=2, high=16)


def check_choice(name: str, value, choices):
    """``value`` if it is one of ``choices``; ValueError naming ``name`` and listing the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be {' or '.join(map(repr, choices))}, got {value!r}")
    return value


def lazy_submodules(package: str, names: tuple[str, ...]):
    """A module ``__getattr__`` (PEP 562) that imports ``package.<name>`` on first access.

    Each subpackage's ``__init__`` uses it so that ``cm.structure.smcp`` works without importing
    every module (and every dependency between layers) at ``import chita_minimal``.
    """

    def __getattr__(name: str):
        if name in names:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}; its modules: {', '.join(names)}")

    return __getattr__


def check_sparsity(name: str, value) -> float:
    """``value`` as a float in [0, 1): the fraction of weights removed; TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return float(value)


def deprecated(fn, name: str, instead: str):
    """``fn`` kept for one release under its old public ``name`` as a deprecated alias: each call emits
    ``DeprecationWarning("<name>(...) is deprecated ...; use <instead>")`` and runs ``fn`` unchanged. The wrapper
    has ``fn``'s docstring and signature, the old name, and ``__deprecated__`` = ``instead``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        warnings.warn(f"{name}(...) is deprecated and will be removed in the next release; use {instead}",
                      DeprecationWarning, stacklevel=2)
        return fn(*args, **kwargs)

    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__deprecated__ = instead
    return wrapper


def renamed(**aliases: str):
    """Decorator: keep each old keyword name of a function working for one release as a deprecated alias.

        @renamed(blocksize="block_size")
        def sparsegpt_layer(W, H, sparsity=None, *, block_size=128): ...

        sparsegpt_layer(W, H, 0.5, blocksize=64)    # DeprecationWarning, the same as block_size=64

    A call with an old name emits ``DeprecationWarning("<fn>(<old>=...) is now <fn>(<new>=...)")`` and
    passes the value on under the new name; giving both names is a TypeError. Positional calls are not
    affected. The wrapper keeps the function's name, docstring and signature (``functools.wraps``) and
    lists the aliases in ``__renamed__`` (old → new).
    """
    for old, new in aliases.items():
        if not isinstance(new, str) or not new.isidentifier() or new == old:
            raise ValueError(f"renamed: the new name of {old!r} must be another identifier, got {new!r}")

    def decorate(fn):
        name = fn.__name__

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in aliases.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{name}() got both {new}= and its deprecated old name {old}=; give {new}= only")
                    warnings.warn(f"{name}({old}=...) is now {name}({new}=...)", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        wrapper.__renamed__ = dict(aliases)
        return wrapper

    return decorate
