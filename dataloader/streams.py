"""Record-stream pieces for sharded TFRecord datasets: stateless shuffling, subsets, side data.

A streamed training set is never in memory, so per-example extras (a memory bank) and subsets
(EKG's search images) are addressed by an example's natural-order position: shard by shard in
sorted file order, records in file order (what ``train_eval`` enumerates).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from dataloader import seeds
from dataloader.base import SideData
from utils.errors import ConfigError, DataError


def block_shuffle(ds: tf.data.Dataset, block: int, key: int) -> tf.data.Dataset:
    """Shuffles consecutive blocks of ``block`` elements with stateless permutations.

    ``Dataset.shuffle`` mixes TensorFlow's global seed into its seed, which would make
    the order depend on process state; a stateless permutation per block does not.
    Elements may be tuples; their parts move together.
    """

    def _permute(block_index, records):
        noise = tf.random.stateless_uniform(
            tf.shape(tf.nest.flatten(records)[0])[:1], seed=seeds.example_seed(key, -1 - block_index)
        )
        order = tf.argsort(noise)
        return tf.nest.map_structure(lambda r: tf.gather(r, order), records)

    ds = ds.batch(block).enumerate()
    return ds.map(_permute).unbatch()


def side_slices(side: SideData, sizes: Sequence[int], order: Sequence[int], where: str):
    """int64 header and footer byte counts that cut shard ``order[k]``'s slice out of ``side``.

    Args:
        side: The side file, one record per example of every shard.
        sizes: Records in each shard, in sorted shard order.
        order: The shards (indices into ``sizes``) a pipeline reads, in its order.
        where: Names the data in the error message.

    Raises:
        DataError: If the side file is missing or its size does not match the shards.
    """
    expected = int(sum(sizes)) * side.record_bytes
    found = tf.io.gfile.stat(side.path).length if tf.io.gfile.exists(side.path) else None
    if found != expected:
        raise DataError(f"{side.path}: expected {sum(sizes)} records of {side.record_bytes} bytes ({expected} "
                        f"bytes) for the training shards in {where}, found {'no file' if found is None else found}")
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    heads = np.asarray([starts[i] * side.record_bytes for i in order], np.int64)
    feet = np.asarray([(starts[-1] - starts[i + 1]) * side.record_bytes for i in order], np.int64)
    return heads, feet


def with_side(side: SideData, path, header, footer) -> tf.data.Dataset:
    """One shard's records zipped with its slice of the side file (see :func:`side_slices`)."""
    extra = tf.data.FixedLengthRecordDataset(side.path, side.record_bytes, header_bytes=header, footer_bytes=footer)
    return tf.data.Dataset.zip((tf.data.TFRecordDataset(path), extra))


def subset_records(files: Sequence[str], sizes: Sequence[int], indices: np.ndarray,
                   check: Callable[..., None] | None = None) -> tf.data.Dataset:
    """``(position, record)`` of the records at sorted natural-order ``indices``.

    Only the shards holding one of them are read; the others are not opened.

    Raises:
        ConfigError: If an index is outside ``[0, sum(sizes))``.
    """
    total = int(sum(sizes))
    if len(indices) and not 0 <= indices[0] <= indices[-1] < total:
        raise ConfigError(f"subset indices must lie in [0, {total}), the training records")
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    used = np.asarray([i for i in range(len(sizes)) if np.any((indices >= starts[i]) & (indices < starts[i + 1]))],
                      np.int64)
    chosen = [files[i] for i in used]
    if check is not None:
        check(paths=chosen)
    member = tf.constant(np.isin(np.arange(total), indices))
    ds = tf.data.Dataset.from_tensor_slices((chosen, starts[used], starts[used + 1]))
    ds = ds.flat_map(lambda f, a, b: tf.data.Dataset.zip((tf.data.Dataset.range(a, b), tf.data.TFRecordDataset(f))))
    return ds.filter(lambda i, record: tf.gather(member, i))
