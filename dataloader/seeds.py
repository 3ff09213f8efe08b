"""Seed derivation that makes every training stream a pure function of (seed, epoch).

Nothing here reads TensorFlow's global seed or any other process state: a run that is
resumed at epoch ``e`` (or restarted on a different number of workers) sees the same
order and the same augmentations as the original run.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

_UINT64 = 2**64


def epoch_key(seed: int, epoch: int, *more: int) -> int:
    """Mixes the run seed, the epoch and optional extra integers into one int64 key.

    ``SeedSequence`` hashes its input well, so neighbouring epochs get unrelated keys.

    Args:
        seed: Run seed (any Python int; negatives are wrapped to 64 bits).
        epoch: Epoch number.
        *more: Further integers to mix in (for example a shard index).

    Returns:
        A non-negative integer below 2**63, usable as a TensorFlow int64 seed.
    """
    entropy = [int(v) % _UINT64 for v in (seed, epoch, *more)]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The shuffle order of ``size`` examples for one epoch.

    Args:
        seed: Run seed.
        epoch: Epoch number.
        size: Number of examples.

    Returns:
        An int64 permutation of ``range(size)``.
    """
    rng = np.random.Generator(np.random.PCG64(epoch_key(seed, epoch)))
    return rng.permutation(size).astype(np.int64)


def example_seed(key: int | tf.Tensor, position: tf.Tensor) -> tf.Tensor:
    """The stateless-op seed of one example.

    The stateless ops hash their ``[2]`` seed before use, so pairing the epoch key with
    the example's position gives independent random streams per example.

    Args:
        key: Epoch key from :func:`epoch_key`.
        position: Scalar integer that identifies the example within the epoch.

    Returns:
        An int64 tensor of shape ``[2]``.
    """
    return tf.stack([tf.cast(key, tf.int64), tf.cast(position, tf.int64)])


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    """Splits one stateless seed into ``num`` independent seeds, one per random op.

    Args:
        seed: Int64 tensor of shape ``[2]``.
        num: How many seeds to derive.

    Returns:
        A list of ``num`` int64 tensors of shape ``[2]``.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=num)
    return [seeds[i] for i in range(num)]
