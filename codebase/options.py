"""Declaring options: frozen dataclass fields with their help text, and the checks they share.

Every option of a run lives in a frozen dataclass next to the code that reads it: the run and
engine options and the optimisation in `codebase/config.py`, each method's own options in its
module (`codebase/methods/`). A field is declared with `option(default, help)`; the scripts'
flags, `--help`, the `--config` JSON fields and the run's saved `config.json` all come from these
declarations. Flags are flat (`--search_target_rate`, `--kd_temperature`): methods prefix their
option names, and two methods may share a field only by sharing the dataclass that declares it.

`run_control=True` marks options that may differ between the processes of one run (`--resume`,
memory knobs that change no result): they are not compared when a run is resumed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Iterable

from utils.errors import ConfigError


def option(default: Any, help: str, *, run_control: bool = False, choices: Iterable | None = None):  # noqa: A002
    """A dataclass field with its help text (shown by `--help`)."""
    metadata = {"help": help, "run_control": run_control}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, dict, set)):
        raise TypeError("options are frozen: use a tuple for a sequence default")
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of the option dataclasses: the shared checks of every field with choices."""

    def validate(self, **context) -> None:
        """Raise ConfigError naming the first bad value's flag. `context` holds the run's other
        settings (`run=`, `optim=`) for checks that depend on them."""
        del context
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            if choices is not None and getattr(self, field.name) not in choices:
                raise ConfigError(f"--{field.name} must be one of {', '.join(map(str, choices))}; "
                                  f"got {getattr(self, field.name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class NoOptions(Options):
    """A method without options of its own."""


# === Field introspection ===
def field_kind(field: dataclasses.Field, owner) -> tuple[type, bool, bool]:
    """`(scalar type, optional, sequence)` of a field, from its (postponed) annotation."""
    hints = typing.get_type_hints(owner)
    kind = hints[field.name]
    optional = False
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional, kind = True, args[0]
        origin = typing.get_origin(kind)
    if origin is tuple:
        return typing.get_args(kind)[0], optional, True
    return kind, optional, False


def coerce(owner, name: str, value, where: str):
    """`value` (from JSON) converted to the type of field `name` of `owner`, or a ConfigError."""
    field = {f.name: f for f in dataclasses.fields(owner)}[name]
    kind, optional, sequence = field_kind(field, owner)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {name} may not be null")
    try:
        if sequence:
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise TypeError
            return tuple(_scalar(kind, v) for v in value)
        return _scalar(kind, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be {'a list of ' if sequence else ''}{kind.__name__}, "
                          f"got {value!r}") from None


def _scalar(kind, value):
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    raise TypeError


def build(owner, values: dict, where: str):
    """`owner(**values)` with every value coerced to its field's type."""
    return owner(**{name: coerce(owner, name, value, where) for name, value in values.items()})


def run_control_fields(owner) -> set:
    return {f.name for f in dataclasses.fields(owner) if f.metadata.get("run_control")}


# === Shared checks: each names the flag ===
def thread_counts(**values) -> None:
    """Thread-pool sizes: 0 (TensorFlow's default, one per core) or a positive count."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"--{name} must be 0 (one per core) or a count of threads, got {value!r}")


def positive(**values) -> None:
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"--{name} must be positive, got {value!r}")


def fraction(name: str, value, low_open=True, high_open=True) -> None:
    """`value` in the interval (0, 1) with the given openness at each end."""
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (isinstance(value, (int, float)) and low_ok and high_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ConfigError(f"--{name} must be in {interval}, got {value!r}")


def json_object(path: str, flag: str, what: str) -> dict:
    """The JSON object in the file `path` given by `--flag`; a ConfigError naming the flag if the file
    is unreadable, not JSON, or not an object (`what` describes the expected one: "{group: ratio}")."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--{flag} {path}: not readable JSON ({type(err).__name__})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--{flag} {path}: expected an object {what}")
    return value
