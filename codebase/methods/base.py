"""The method interface: a compression method is a step of a run, made of named stages.

A method is a plugin. It declares, next to its code:

* `Options`: a frozen dataclass of its own options (`codebase.options.option` fields with help
  text, and `validate`), from which the scripts' flags, `--help`, the `--config` fields and the
  run's saved `config.json` come;
* `recipe_for(pretrained)`: which dataset recipe its training starts from (`codebase.presets`:
  `scratch` or `finetune`), and `optim_defaults(dataset)`: its own changes to it;
* how it sits in a chain: `needs_trained` (it prunes a trained net: without `--trained_param`
  the run trains a baseline first), `trains` (it trains the net it is given, so a pruning step
  right before it leaves the fine-tuning to it), `check_chain` (its own checks of its place);
* `stages()`: the ordered `Stage`s of the step. Stages run in one process, in order. Each reads
  what earlier stages saved in the step's folder and saves its own artefacts there before it is
  marked done, so `--resume` restarts at the first unfinished stage (and, inside a training
  stage, at its last checkpoint). The step's output net goes to `step.output`.

Methods train only through `StepContext.train` with a task (`op_utils.task`), so they never
touch the strategy, XLA or gradient accumulation.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable

from codebase.options import NoOptions

_METHODS: dict = {}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[], None]


class Method(abc.ABC):
    """Base of the compression methods; subclasses register with `@register("name")`."""

    name = ""
    Options = NoOptions
    needs_trained = False  # starts from a trained net (pruning): a baseline runs first without one
    trains = False  # trains the net it is given (so the step before it need not fine-tune)
    produces_trained = True  # its output is a trained net (a later step may prune or distil it)

    def __init__(self, step):
        self.step = step  # a codebase.context.StepContext
        self.ctx = step.ctx
        self.options = step.options

    @abc.abstractmethod
    def stages(self) -> list:
        """The ordered `Stage`s of this step."""

    # === Declarations read while the config is built ===
    @classmethod
    def from_scratch(cls, options) -> bool:
        """True if, with these options, the step ignores its input and trains a fresh net (then it
        needs no trained net and takes the scratch recipe)."""
        del options
        return False

    @classmethod
    def recipe_for(cls, pretrained: bool) -> str:
        """The dataset recipe of this step's optimisation, given whether its input is trained."""
        return "finetune" if pretrained else "scratch"

    @classmethod
    def optim_defaults(cls, dataset: str) -> dict:
        """This method's changes to the recipe (OptimConfig fields)."""
        del dataset
        return {}

    @classmethod
    def trains_optional(cls, options) -> bool:
        """True if `--train_epoch 0` is allowed (nothing to train after a lossless conversion)."""
        del options
        return False

    @classmethod
    def check_chain(cls, cfg, index: int) -> None:
        """Raise ConfigError if this method cannot be step `index` of `cfg.steps`."""
        del cfg, index


def register(name: str):
    def wrap(cls):
        if name in _METHODS:
            raise KeyError(f"method {name} registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def method_names() -> tuple:
    return tuple(_METHODS)


def get_method(name: str):
    return _METHODS[name]
