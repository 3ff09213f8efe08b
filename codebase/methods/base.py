"""The method interface: a compression method is a list of named stages.

Stages run in one process, in order. Each stage reads what earlier stages saved in
`--train_path` and saves its own artefacts there before it is marked done, so `--resume`
restarts at the first unfinished stage (and, inside a training stage, at its last
checkpoint). Methods train only through `RunContext.train`, so they never touch the
strategy, XLA or gradient accumulation.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable

_METHODS: dict = {}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[], None]


class Method(abc.ABC):
    """Base of the compression methods; subclasses register with `@register("name")`."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.cfg = ctx.cfg

    @abc.abstractmethod
    def stages(self) -> list:
        """The ordered `Stage`s of this method."""


def register(name: str):
    def wrap(cls):
        if name in _METHODS:
            raise KeyError(f"method {name} registered twice")
        _METHODS[name] = cls
        return cls

    return wrap


def method_names() -> tuple:
    return tuple(_METHODS)


def get_method(name: str):
    return _METHODS[name]
