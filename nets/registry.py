"""Registry of architectures: `build("ResNet-56", num_classes=10)`.

Each entry is a Net class plus its default config; registering a net adds it to the
parametrised tests in tests/nets automatically.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from nets.transforms import transform_class
from utils.errors import ConfigError

_REGISTRY: dict = {}


def register(arch: str, cls, **defaults) -> None:
    key = arch.lower()
    if key in _REGISTRY:
        raise KeyError(f"architecture {arch} registered twice")
    _REGISTRY[key] = (arch, cls, defaults)


def list_archs() -> list:
    return [arch for arch, _, _ in _REGISTRY.values()]


def lookup(arch: str):
    """(canonical name, class, default config) of an architecture; case-insensitive."""
    try:
        return _REGISTRY[arch.lower()]
    except KeyError:
        raise ConfigError(f"unknown --arch {arch!r}; known: {', '.join(list_archs())}") from None


def build(arch: str, widths: Mapping[str, int] | None = None, masked: bool = True, **config):
    """Build a registered net; `config` overrides the registered defaults."""
    name, cls, defaults = lookup(arch)
    return cls(arch=name, widths=widths, masked=masked, **{**defaults, **config})


def build_from_spec(spec: Mapping, masked: bool = False, **config):
    """Rebuild a (slimmed) net from `Net.spec()`, with its transforms attached (their state is
    loaded separately: `Net.load_transform_state`); `config` overrides the spec's config."""
    net = build(spec["arch"], widths=spec.get("widths"), masked=masked, **{**spec.get("config", {}), **config})
    for entry in spec.get("transforms", []):
        transform = transform_class(entry["kind"]).from_config(entry.get("config", {}), net)
        net.attach(transform, entry["targets"])
    return net


def build_from_params(arch: str, params: Mapping[str, np.ndarray], masked: bool = False, **config):
    """Build the net whose widths the params imply, and load the params into it.

    Slimmed EKG pickles carry their architecture only in their kernel shapes.
    """
    full = build(arch, masked=False, **config)
    widths = full.widths_from_shapes({k: np.shape(v) for k, v in params.items()})
    net = build(arch, widths=widths, masked=masked, **config)
    net.set_params(params)
    return net
