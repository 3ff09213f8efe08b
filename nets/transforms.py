"""Parameter transforms: rewrites of a layer's parameters (or of its output) in the forward pass.

Channel masks, ResRep's compactors and, next, magnitude masks and fake quantizers all change
what a layer computes without changing the parameters it stores. They share one mechanism:

* A `Transform` is a `tf.Module` created once, before anything is traced, and attached by
  `Net.attach(transform, targets)` to parameters (`"BasicBlock0.0/conv1/kernel"`), to layer
  outputs (`"BasicBlock0.0/bn1:out"`) or to activation sites of the net (`"BasicBlock0.0/bn1:act"`,
  `"BasicBlock1.2"`: see `nets.sites`). One transform may serve several targets (a residual
  stream's compactor follows every BatchNorm of the stream).
* `Layer.param(name)` returns the stored variable with its transforms applied in order, and
  a layer's output passes through its output transforms. A transform is a pure op of its input
  and its own state; its settings are variables, so changing them never retraces. A quantizer
  writes its straight-through gradient inside `__call__`.
* Its state (`state()`) is kept apart from the EKG-format params dict, so a reference pickle
  still loads into any net, and is saved beside it (`<params>.state.npz`) with its `config()`
  in the net's spec, so a net with transforms rebuilds from its files (`nets.build_from_spec`,
  then `load_transform_state`).
* It declares the channel axes of its state (`state_axes()`), so slimming gathers and padding
  grows it with the layer's channels; `slim` carries every saved transform to the narrower net.

Channel masks (`GroupMask`) are created by a masked net for its masked groups: their state is
the groups' `mask` variables, which the net already owns, so they are never listed in a spec.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import tensorflow as tf

from nets import axes as ax

_EPS = 1e-12
_REGISTRY: dict = {}


def register_transform(cls):
    """Class decorator: make a saved transform kind rebuildable from a spec."""
    if not cls.kind or cls.kind in _REGISTRY:
        raise KeyError(f"transform kind {cls.kind!r} is empty or registered twice")
    _REGISTRY[cls.kind] = cls
    return cls


def transform_class(kind: str):
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown transform kind {kind!r} in a spec; known: {', '.join(sorted(_REGISTRY))}") from None


class Transform(tf.Module):
    """Base of the transforms (see the module docstring).

    Subclasses set `kind`, implement `__call__`, and, when they hold state that must survive a
    save, `state`, `state_axes`, `config` and `from_config`, and register with
    `@register_transform`.
    """

    kind = ""
    saved = True  # listed in the net's spec; False for structural transforms (group masks)

    def __call__(self, value):
        raise NotImplementedError

    def state(self) -> dict:
        """`{name: tf.Variable}` saved beside the params (not part of the EKG params dict)."""
        return {}

    def state_axes(self) -> dict:
        """`{name: tuple of nets.axes.Axis}`: the channel axes of each state array."""
        return {}

    def config(self) -> dict:
        """JSON-able arguments that rebuild this transform on a net with `from_config`."""
        return {}

    @classmethod
    def from_config(cls, config: Mapping, net):
        return cls(**config)

    def attached(self, layer, target: str) -> None:
        """Called by `Net.attach` for each target, before anything is traced (may create state).
        `layer` is None for an activation-site target."""
        del layer, target

    def check_resize(self, how: str) -> None:
        """Raise ConfigError if a net with this transform cannot be `how` ("slimmed" or "padded")."""
        del how

    def state_arrays(self) -> dict:
        return {name: np.asarray(var.numpy()) for name, var in self.state().items()}

    def load_state(self, arrays: Mapping[str, np.ndarray], what: str = "transform") -> None:
        state = self.state()
        missing = sorted(set(state) - set(arrays))
        if missing:
            raise ValueError(f"{what}: no saved value for {self.kind} state {missing[0]!r}")
        for name, var in state.items():
            value = np.asarray(arrays[name], var.dtype.as_numpy_dtype)
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"{what}: {self.kind} state {name!r} has shape {value.shape}, expected {tuple(var.shape)}")
            var.assign(value)


class GroupMask(Transform):
    """Zeroes the masked channels of a parameter: `w * prod(masks along its channel axes)`.

    With `renorm` (kernels only) and the net's `options.renorm` on, the masked kernel is
    rescaled to the full kernel's Frobenius norm, `W' = (W*M)|W|/|W*M|` (EKG's convention);
    `Layer.sliced` applies this same op before gathering, so a slimmed net holds exactly the
    values the masked forward pass computes with.
    """

    kind = "group_mask"
    saved = False

    def __init__(self, axes, options, renorm: bool = False):
        super().__init__(name="group_mask")
        self.axes = tuple(axes)
        self.options = options
        self.renorm = bool(renorm)

    def __call__(self, w):
        mask = ax.mask_tensor(self.axes, len(w.shape))
        masked = w * mask
        if not self.renorm or self.options is None:
            return masked
        scale = tf.norm(w) / tf.maximum(tf.norm(masked), _EPS)
        return masked * (1.0 + self.options.renorm * (scale - 1.0))
