"""The dataset description and the interface every dataset offers to the trainer."""
from __future__ import annotations

import abc
import dataclasses
from typing import Sequence

import numpy as np

import tensorflow as tf

from utils.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    Attributes:
        name: Canonical lower-case name, e.g. ``"cifar10"``.
        num_classes: Number of label classes; labels lie in ``[0, num_classes)``.
        image_shape: ``(height, width, channels)`` of the images the pipelines yield.
        num_train: Number of training examples.
        num_test: Number of test (validation) examples.
        mean: Per-channel mean subtracted from 0..255 pixel values.
        std: Per-channel standard deviation the centred pixels are divided by.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_test: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def check_batching(batch_size: int, num_shards: int = 1, shard_index: int = 0) -> None:
    """Rejects batch and shard arguments that cannot give a useful pipeline.

    Args:
        batch_size: Examples per batch (per replica for training).
        num_shards: Number of workers that split the data.
        shard_index: This worker's index.

    Raises:
        ConfigError: If a value is out of range.
    """
    if int(batch_size) < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if int(num_shards) < 1:
        raise ConfigError(f"number of shards must be at least 1, got {num_shards}")
    if not 0 <= int(shard_index) < int(num_shards):
        raise ConfigError(f"shard index {shard_index} is outside [0, {num_shards})")


def normalise(images: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """Converts 0..255 pixels (any int or float dtype) to ``(x - mean) / std`` in float32.

    Args:
        images: ``[..., C]`` tensor of pixel values.
        mean: ``C`` channel means.
        std: ``C`` channel standard deviations.

    Returns:
        A float32 tensor of the same shape.
    """
    mean_t = tf.constant(mean, tf.float32)
    std_t = tf.constant(std, tf.float32)
    return (tf.cast(images, tf.float32) - mean_t) / std_t


@dataclasses.dataclass(frozen=True)
class SideData:
    """Per-example data stored beside a streamed training set, such as a memory bank.

    A raw file (no header) of one fixed-size record per training example, in the training
    set's natural order (:meth:`Dataset.train_eval`). Pipelines that take it read each
    shard's slice of the file next to the shard itself, so the records stay with their
    examples through shuffling and sharding, and nothing is held in memory.

    Attributes:
        path: The raw file.
        shape: Shape of one record.
        dtype: Numpy / TensorFlow dtype name of the values.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str = "float16"

    @property
    def record_bytes(self) -> int:
        size = tf.as_dtype(self.dtype).size
        for dim in self.shape:
            size *= int(dim)
        return size


class Dataset(abc.ABC):
    """A labelled image dataset with training, test and training-evaluation pipelines.

    Every pipeline yields ``float32`` NHWC images that are already normalised with
    ``info.mean`` / ``info.std`` and ``int32`` labels.
    """

    #: Whether the training set is held in memory as arrays (``train_arrays``); streamed
    #: datasets instead offer ``train_subset`` and per-example side data in ``train``.
    in_memory = False

    @abc.abstractmethod
    def train_labels(self) -> np.ndarray:
        """The int64 labels of the training set in its natural order (as ``train_eval``)."""

    @property
    @abc.abstractmethod
    def info(self) -> DatasetInfo:
        """The dataset's :class:`DatasetInfo`."""

    @abc.abstractmethod
    def train(
        self,
        batch_size: int,
        epoch: int,
        seed: int,
        augment: bool = True,
        num_shards: int = 1,
        shard_index: int = 0,
    ) -> tf.data.Dataset:
        """One epoch of shuffled (and optionally augmented) training batches.

        The stream is a pure function of ``(seed, epoch)``: the order and every random
        augmentation are derived from them, so a resumed run sees the same data.

        Args:
            batch_size: Examples per batch on this shard (the per-replica batch).
            epoch: Epoch number; each epoch has its own order and augmentations.
            seed: Run seed.
            augment: Apply the training augmentation; otherwise inference preprocessing.
            num_shards: Number of workers that split each epoch.
            shard_index: This worker's index in ``[0, num_shards)``.

        Returns:
            A dataset of ``(images, labels)`` batches; incomplete batches are dropped.
        """

    @abc.abstractmethod
    def test(self, batch_size: int) -> tf.data.Dataset:
        """The test set in its natural order with inference preprocessing.

        Args:
            batch_size: Examples per batch; the last batch may be smaller.

        Returns:
            A dataset of ``(images, labels)`` batches.
        """

    @abc.abstractmethod
    def train_eval(self, batch_size: int) -> tf.data.Dataset:
        """The training set in its natural order with inference preprocessing.

        Used for memory banks and batch-norm re-estimation, which need every
        training image exactly once and its position.

        Args:
            batch_size: Examples per batch; the last batch may be smaller.

        Returns:
            A dataset of ``(images, labels, index)`` batches, ``index`` being the int64
            position of each example in the training set.
        """

    def steps_per_epoch(self, batch_size: int, num_shards: int = 1) -> int:
        """Number of batches each shard gets from :meth:`train`.

        Args:
            batch_size: The per-shard batch size.
            num_shards: Number of shards.

        Returns:
            ``num_train // (batch_size * num_shards)``.
        """
        check_batching(batch_size, num_shards)
        return self.info.num_train // (int(batch_size) * int(num_shards))
