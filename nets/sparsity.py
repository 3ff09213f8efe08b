"""Magnitude masks: weight sparsity as a parameter transform.

A `MagnitudeMask` multiplies a kernel by a 0/1 mask of its own shape. The mask is transform
state (saved beside the params, gathered by slimming like the kernel's channels), so a sparse net
is an ordinary net with masks attached. The stored kernel is the *backup* PocketFlow keeps:
where the mask is 1 it is the live weight, and where it is 0 the optimizer leaves it unchanged
(`op_utils.task.Task.update_mask`), so the next threshold is taken from the backup values, not
from zeros (PocketFlow's fixed bug, PR #134). `--method ws` chooses the masks.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from nets.transforms import Transform, register_transform
from utils.errors import ConfigError


@register_transform
class MagnitudeMask(Transform):
    """`w * mask`, with `mask` (not trainable) of `w`'s shape; one parameter per mask."""

    kind = "magnitude_mask"

    def __init__(self):
        super().__init__(name="magnitude_mask")
        self.mask = None
        self.axes = ()
        self.target = None

    def attached(self, layer, target):
        name = target.rpartition("/")[2]
        if layer is None or name not in layer.named:
            raise ConfigError(f"magnitude masks apply to parameters, not {target!r}")
        if self.mask is not None:
            raise ConfigError(f"magnitude_mask: one mask per parameter; {target} is a second target")
        self.axes, self.target = layer.axes[name], target
        self.mask = tf.Variable(tf.ones(layer.named[name].shape), trainable=False, name="mask")

    def __call__(self, w):
        return w * self.mask

    def state(self):
        return {"mask": self.mask}

    def state_axes(self):
        return {"mask": self.axes}

    def sparsity(self) -> float:
        """Fraction of zeros in the mask."""
        mask = self.mask.numpy()
        return float(1.0 - np.count_nonzero(mask) / mask.size)

    def keep_largest(self, weights: np.ndarray, sparsity: float) -> None:
        """Mask the `floor(sparsity * n)` entries of smallest magnitude in `weights` (ties: by index)."""
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")
        flat = np.abs(np.asarray(weights, np.float64)).reshape([-1])
        pruned = int(np.floor(sparsity * flat.size))
        mask = np.ones(flat.size, np.float32)
        mask[np.argsort(flat, kind="stable")[:pruned]] = 0.0
        self.mask.assign(mask.reshape(self.mask.shape))
