"""What the package's two method registries share: ``prune``'s pruning methods (:mod:`chita_minimal.methods`)
and ``shrink``'s structure methods (:mod:`chita_minimal.structure.methods`).

A method is a dataclass whose fields are its options: it checks them when it is made (:meth:`Options.check`)
and refuses an option it does not have with an :class:`OptionError` that lists the ones it has. A
:class:`Registry` maps names to method classes, refuses an option named like an argument of the call that runs
the methods (``prune``'s ``seed``, ``shrink``'s ``budget``), and turns ``method=`` (a name and options, a class,
or a method object) into a method object.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar


class OptionError(TypeError, ValueError):
    """An option the method does not have (a TypeError, as for a wrong keyword; a ValueError for older callers)."""


class Options:
    """Base of a registered method: a dataclass whose fields are its options. ``kind`` names the family in
    messages ("method", "structure method")."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    kind: ClassVar[str] = "method"

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ()

    @classmethod
    def create(cls, **options):
        """The method with these options; an unknown option is an :class:`OptionError` that lists the valid ones."""
        unknown = [k for k in options if k not in cls.option_names()]
        if unknown:
            valid = ", ".join(cls.option_names()) or "none"
            raise OptionError(f"{cls.kind} {cls.name!r} has no option {unknown[0]!r}; its options: {valid}")
        return cls(**options)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise TypeError/ValueError naming the option when an option value is invalid."""


class Registry(dict):
    """name → method class, for the methods derived from ``base`` that ``call`` (e.g. "prune") runs;
    ``reserved``: ``call``'s own argument names, which no option may take."""

    def __init__(self, base: type[Options], call: str, reserved: tuple[str, ...]):
        super().__init__()
        self.base, self.call, self.reserved = base, call, tuple(reserved)

    def register(self, cls):
        """Class decorator: make ``cls`` available to ``call(method=cls.name)``."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"register takes a {self.base.__name__} subclass, got {cls!r}")
        if not cls.name:
            raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
        clash = [o for o in cls.option_names() if o in self.reserved]
        if clash:
            raise ValueError(f"{cls.__name__}: option {clash[0]!r} is an argument of {self.call} itself; "
                             "choose another name")
        if cls.name in self and self[cls.name] is not cls:
            raise ValueError(f"a {cls.kind} named {cls.name!r} is registered already ({self[cls.name].__name__})")
        self[cls.name] = cls
        return cls

    def get(self, method, **options):
        """A method object from a registered name and options, a method class and options, or the object itself
        (then no options)."""
        base = self.base
        if isinstance(method, base):
            if options:
                raise TypeError(f"options ({', '.join(options)}) go into the {base.kind} object when method is one, "
                                f"e.g. {type(method).__name__}({next(iter(options))}=...)")
            return method
        if isinstance(method, type) and issubclass(method, base):
            return method.create(**options)
        if not isinstance(method, str):
            raise TypeError(f"method must be a {base.kind} name or a {base.__name__} object, got {type(method).__name__}")
        if method not in self:
            raise ValueError(f"unknown {base.kind} {method!r}; valid methods: {', '.join(self)}")
        return self[method].create(**options)

    def available(self) -> dict[str, str]:
        """Registered names with their one-line descriptions."""
        return {name: cls.summary for name, cls in self.items()}
