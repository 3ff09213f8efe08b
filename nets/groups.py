"""Channel groups: the unit in which channels are kept or removed.

A `ChannelGroup` is every place that must see the same set of channels: a residual stream
(all convs writing into one stage's stream plus its projection shortcut), a depthwise conv's
input and output, or simply one conv's output and the next conv's input. Nets declare their
groups in code when they build their layers; layers receive their input and output group as
constructor arguments. Masks are variables, so changing widths never retraces a compiled
function.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def _identifier(key: str) -> str:
    # tf.Module names must be Python identifiers; group keys look like "BasicBlock0.1/conv1".
    return "g_" + "".join(c if c.isalnum() else "_" for c in key)


class ChannelGroup(tf.Module):
    """Channels that are kept or removed together.

    Args:
        key: stable name of the group, used in width specs (for example `"stage0"` or
            `"BasicBlock0.1/conv1"`).
        size: number of channels of the full (unpruned) group.
        prunable: False for channels that are fixed by the task (image channels, classes).
        masked: if True the group owns a `mask` variable of shape `[size]` (1 = kept). An
            unmasked group is plain: layers touching only unmasked groups run no mask ops.

    Example:
        >>> g = ChannelGroup("stage0", 16)
        >>> g.keep([0, 3, 5])
        >>> g.active()
        3
    """

    def __init__(self, key: str, size: int, prunable: bool = True, masked: bool = True):
        super().__init__(name=_identifier(key))
        self.key = key
        self.size = int(size)
        self.prunable = bool(prunable)
        self.masked = bool(masked and prunable)
        self.mask = (
            tf.Variable(tf.ones([self.size]), trainable=False, name="mask")
            if self.masked
            else None
        )

    # --- host-side API -------------------------------------------------------------------
    def mask_numpy(self) -> np.ndarray:
        """The current mask as a float32 numpy vector (all ones for an unmasked group)."""
        if self.mask is None:
            return np.ones([self.size], np.float32)
        return np.asarray(self.mask.numpy(), np.float32)

    def active(self) -> int:
        """Number of kept channels."""
        return int(np.count_nonzero(self.mask_numpy() > 0.5))

    def kept(self) -> np.ndarray:
        """Sorted indices of the kept channels."""
        return np.flatnonzero(self.mask_numpy() > 0.5)

    def set_mask(self, mask) -> None:
        """Set the 0/1 mask; at least one channel must stay, as a layer cannot be empty."""
        if self.mask is None:
            raise ValueError(f"group {self.key} is not masked; build the net with masked=True")
        mask = np.asarray(mask, np.float32).reshape([-1])
        if mask.shape != (self.size,):
            raise ValueError(f"group {self.key}: mask has {mask.size} entries, expected {self.size}")
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError(f"group {self.key}: mask entries must be 0 or 1")
        if mask.sum() < 1:
            raise ValueError(f"group {self.key}: a mask must keep at least one channel")
        self.mask.assign(mask)

    def keep(self, indices) -> None:
        """Keep exactly the given channel indices."""
        mask = np.zeros([self.size], np.float32)
        mask[np.asarray(indices, np.int64)] = 1.0
        self.set_mask(mask)

    def keep_top(self, count: int, scores) -> None:
        """Keep the `count` channels with the highest scores (ties broken by index)."""
        count = int(min(max(count, 1), self.size))
        order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
        self.keep(order[:count])

    def kept_index(self) -> tf.Tensor:
        """In-graph sorted indices of the kept channels (int64, dynamic length); masked groups only."""
        return tf.reshape(tf.where(self.mask > 0.5), [-1])

    def reset(self) -> None:
        """Keep every channel."""
        if self.mask is not None:
            self.mask.assign(tf.ones([self.size]))

    def __repr__(self) -> str:
        return f"ChannelGroup({self.key!r}, size={self.size}, prunable={self.prunable})"


class MaskOptions(tf.Module):
    """Switches of the masked forward pass, held as variables so flipping them never retraces.

    Attributes:
        renorm: when 1, a masked kernel is rescaled to the Frobenius norm of the full kernel
            (the EKG convention: W' = (W*M) * |W| / |W*M|). Slimming bakes the same factor in.
        freeze_bn: when 1, BatchNorm in training mode uses batch statistics but does not update
            its moving statistics (EKG's search-time behaviour).
        compact: a trace-time switch (a Python bool, not a variable). When True, masked layers
            compute on the kept channels only: they gather their parameters by the groups'
            in-graph kept indices, so activations carry only kept channels and a call costs what
            the slimmed net costs, while changing masks still never retraces (channel dimensions
            are dynamic). The outputs equal the masked forward's. Functions must be traced
            after setting it; a search that evaluates many masks on its own copy of a net sets it
            once, before tracing anything.
    """

    def __init__(self):
        super().__init__(name="mask_options")
        self.renorm = tf.Variable(0.0, trainable=False, name="renorm")
        self.freeze_bn = tf.Variable(0.0, trainable=False, name="freeze_bn")
        self.compact = False

    def set(self, renorm: bool | None = None, freeze_bn: bool | None = None, compact: bool | None = None) -> None:
        if renorm is not None:
            self.renorm.assign(float(bool(renorm)))
        if freeze_bn is not None:
            self.freeze_bn.assign(float(bool(freeze_bn)))
        if compact is not None:
            self.compact = bool(compact)
