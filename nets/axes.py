"""Channel axes: which axis of a parameter (or of a transform's state) holds which group's channels.

Every layer declares, per parameter, the axes that carry channel groups: a conv kernel `HWIO`
has its input group on axis 2 and its output group on axis 3, its bias `[1,1,1,C]` the output
group on axis 3, BatchNorm's tensors their group on the last axis. A dense layer that reads a
flattened `H*W*C` map has its input group *repeated* on axis 0: input feature `s * C + c`
belongs to channel `c`. From these declarations the operations that slimming, padding, masks,
compact mode and width inference need are written once, here, instead of once per layer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True, eq=False)
class Axis:
    """Axis `dim` of an array holds `repeat` consecutive blocks of `group`'s channels."""

    dim: int
    group: object  # ChannelGroup
    repeat: int = 1

    def indices(self, kept: np.ndarray) -> np.ndarray:
        """Positions along the axis of the channels `kept` (in every repeated block)."""
        size = self.group.size
        return (np.arange(self.repeat)[:, None] * size + np.asarray(kept)[None, :]).reshape([-1])


def gather(array: np.ndarray, axes, kept=None) -> np.ndarray:
    """`array` restricted to the kept channels of each axis' group (`kept(group)`, default: its mask)."""
    for axis in axes:
        index = axis.group.kept() if kept is None else kept(axis.group)
        array = np.take(array, axis.indices(index), axis=axis.dim)
    return array


def pad(array: np.ndarray, axes, width, fill: float = 0.0) -> np.ndarray:
    """`array` grown to `width(group)` channels on each axis, the new channels (after the old
    ones, in every repeated block) set to `fill`."""
    for axis in axes:
        dim = axis.dim % array.ndim
        shape = list(array.shape)
        blocks = array.reshape(shape[:dim] + [axis.repeat, shape[dim] // axis.repeat] + shape[dim + 1:])
        extra = width(axis.group) - blocks.shape[dim + 1]
        if extra > 0:
            grow = list(blocks.shape)
            grow[dim + 1] = extra
            blocks = np.concatenate([blocks, np.full(grow, fill, array.dtype)], dim + 1)
        array = blocks.reshape(shape[:dim] + [-1] + shape[dim + 1:])
    return array


def widths(shape, axes) -> dict:
    """`{group key: channels}` implied by an array of `shape`."""
    return {axis.group.key: int(shape[axis.dim]) // axis.repeat for axis in axes}


def mask_tensor(axes, rank: int):
    """The product of the axes' group masks, broadcastable against an array of `rank` dimensions
    (1.0 when no group is masked)."""
    mask = 1.0
    for axis in axes:
        if axis.group.masked:
            mask = mask * _along(axis.group.mask, axis, rank)
    return mask


def _along(mask, axis: Axis, rank: int):
    if axis.repeat > 1:
        mask = tf.tile(mask, [axis.repeat])
    shape = [1] * rank
    shape[axis.dim] = -1
    return tf.reshape(mask, shape)


def gather_kept(tensor, axes):
    """`tensor` restricted, in the graph, to the kept channels of each masked axis group (compact mode)."""
    for axis in axes:
        if not axis.group.masked:
            continue
        kept = axis.group.kept_index()
        if axis.repeat > 1:
            rows = tf.range(axis.repeat, dtype=kept.dtype)[:, None] * axis.group.size + kept[None, :]
            kept = tf.reshape(rows, [-1])
        tensor = tf.gather(tensor, kept, axis=axis.dim)
    return tensor
