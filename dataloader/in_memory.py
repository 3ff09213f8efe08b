"""Pipelines shared by the datasets that fit in memory as uint8 arrays (CIFAR, MNIST)."""
from __future__ import annotations

import abc
from typing import Sequence

import numpy as np
import tensorflow as tf

from dataloader import seeds
from dataloader.base import Dataset, DatasetInfo, check_batching, normalise
from utils.errors import ConfigError

_AUTOTUNE = tf.data.AUTOTUNE


class InMemoryDataset(Dataset):
    """A dataset whose splits are loaded once into uint8 NHWC arrays and int64 labels.

    Subclasses provide the loaders, the :class:`DatasetInfo` and, optionally, the
    per-image training augmentation. The arrays are loaded on first use, so building
    the object is cheap and a missing training split does not stop evaluation.
    """

    in_memory = True

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        """Stores the normalisation constants.

        Args:
            mean: Per-channel mean of 0..255 pixels.
            std: Per-channel standard deviation of 0..255 pixels.
        """
        self._mean = tuple(float(v) for v in mean)
        self._std = tuple(float(v) for v in std)
        # Per-instance caches; the loaders may read hundreds of megabytes.
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._info: DatasetInfo | None = None

    # ----- what subclasses provide -------------------------------------------------
    @abc.abstractmethod
    def _load_splits(self, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Reads ``split`` (``"train"`` or ``"test"``) as (uint8 NHWC images, int64 labels).

        Returns a dict holding at least ``split``; a source that yields both splits at
        once (the Keras download) returns both so they are read only once.
        """

    @abc.abstractmethod
    def _make_info(self) -> DatasetInfo:
        """Builds the dataset's :class:`DatasetInfo`."""

    def _augment(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Training augmentation of one normalised float32 HWC image.

        Args:
            image: The normalised image.
            seed: Int64 ``[2]`` stateless seed unique to this example and epoch.

        Returns:
            The augmented image, same shape. The default is the identity.
        """
        del seed
        return image

    # ----- arrays -------------------------------------------------------------------
    @property
    def info(self) -> DatasetInfo:
        if self._info is None:
            self._info = self._make_info()
        return self._info

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._arrays:
            for name, (images, labels) in self._load_splits(split).items():
                # Callers get the cached arrays themselves; read-only stops silent corruption.
                images.setflags(write=False)
                labels.setflags(write=False)
                self._arrays.setdefault(name, (images, labels))
        return self._arrays[split]

    def train_labels(self) -> np.ndarray:
        """See :meth:`Dataset.train_labels`."""
        return self._split("train")[1]

    def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The training split as read-only (uint8 NHWC images, int64 labels)."""
        return self._split("train")

    def test_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The test split as read-only (uint8 NHWC images, int64 labels)."""
        return self._split("test")

    # ----- pipelines ----------------------------------------------------------------
    def _normalise(self, images: tf.Tensor) -> tf.Tensor:
        return normalise(images, self._mean, self._std)

    def train(
        self,
        batch_size: int,
        epoch: int,
        seed: int,
        augment: bool = True,
        num_shards: int = 1,
        shard_index: int = 0,
        views: int = 1,
        with_index: bool = False,
        subset: np.ndarray | None = None,
    ) -> tf.data.Dataset:
        """See :meth:`Dataset.train`.

        With ``views > 1`` every example yields ``views`` independent augmentations stacked
        as ``[batch, views, H, W, C]`` (EKG's two-view distillation); with ``with_index``
        batches are ``(images, labels, index)``, the index being the example's position in
        the training set (to look up per-example data such as a memory bank).

        The whole set is permuted identically on every shard, cut to a multiple of
        ``batch_size * num_shards`` (so all shards run the same number of steps), and
        shard ``i`` keeps positions ``i::num_shards``. Batch ``k`` of all shards together
        is therefore batch ``k`` of the unsharded stream with ``batch_size * num_shards``.
        Each example's augmentation is seeded by (seed, epoch, its index in the set), so
        it does not depend on the sharding either.

        ``subset`` (positions in the training set) restricts the epoch to those examples (a
        training split that leaves a validation split out); indices and augmentation seeds
        stay the examples' positions in the whole set.

        Raises:
            ConfigError: If the arguments are out of range or leave no complete batch.
        """
        check_batching(batch_size, num_shards, shard_index)
        images, labels = self.train_arrays()
        positions = np.arange(len(labels)) if subset is None else np.asarray(subset, np.int64)
        global_batch = int(batch_size) * int(num_shards)
        usable = (len(positions) // global_batch) * global_batch
        if usable == 0:
            raise ConfigError(
                f"{self.info.name}: batch size {batch_size} x {num_shards} shard(s) exceeds "
                f"the {len(positions)} training examples"
            )
        order = positions[seeds.permutation(seed, epoch, len(positions))[:usable]]
        order = order[int(shard_index) :: int(num_shards)]
        ds = tf.data.Dataset.from_tensor_slices(
            (images[order], labels[order].astype(np.int32), order)
        )
        if augment:
            key = seeds.epoch_key(seed, epoch)

            def _one(image, label, index):
                seed_t = seeds.example_seed(key, index)
                image = self._normalise(image)
                if views > 1:
                    image = tf.stack([self._augment(image, tf.random.experimental.stateless_fold_in(seed_t, v))
                                      for v in range(views)])
                else:
                    image = self._augment(image, seed_t)
                return (image, label, index) if with_index else (image, label)

            ds = ds.map(_one, num_parallel_calls=_AUTOTUNE, deterministic=True)
            ds = ds.batch(int(batch_size), drop_remainder=True)
        else:
            # Without augmentation there is nothing per-example: normalise whole batches.
            ds = ds.batch(int(batch_size), drop_remainder=True)
            if views > 1:
                raise ConfigError("several views need augment=True")
            ds = ds.map(
                lambda x, y, i: (self._normalise(x), y, i) if with_index else (self._normalise(x), y),
                num_parallel_calls=_AUTOTUNE,
                deterministic=True,
            )
        return ds.prefetch(_AUTOTUNE)

    def test(self, batch_size: int) -> tf.data.Dataset:
        """See :meth:`Dataset.test`."""
        check_batching(batch_size)
        images, labels = self.test_arrays()
        ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
        ds = ds.batch(int(batch_size))
        ds = ds.map(
            lambda x, y: (self._normalise(x), y),
            num_parallel_calls=_AUTOTUNE,
            deterministic=True,
        )
        return ds.prefetch(_AUTOTUNE)

    def train_eval(self, batch_size: int) -> tf.data.Dataset:
        """See :meth:`Dataset.train_eval`."""
        check_batching(batch_size)
        images, labels = self.train_arrays()
        index = np.arange(len(labels), dtype=np.int64)
        ds = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32), index))
        ds = ds.batch(int(batch_size))
        ds = ds.map(
            lambda x, y, i: (self._normalise(x), y, i),
            num_parallel_calls=_AUTOTUNE,
            deterministic=True,
        )
        return ds.prefetch(_AUTOTUNE)
