"""ImageNet (ILSVRC-2012) from the standard TFRecord shards."""
from __future__ import annotations

import functools
import os

import numpy as np
import tensorflow as tf

from dataloader import imagenet_preprocess as prep
from dataloader import seeds, streams, tfrecord
from dataloader.base import Dataset, DatasetInfo, SideData, check_batching
from dataloader.files import one_line
from utils.errors import ConfigError, DataError

IMAGENET_MEAN = (123.68, 116.78, 103.94)
IMAGENET_STD = (58.40, 57.12, 57.38)
NUM_CLASSES = 1000
NUM_TRAIN = 1281167
NUM_TEST = 50000
# The standard conversion's shard counts: with exactly those, the official sizes apply unread.
STANDARD_SHARDS = {"train": (1024, NUM_TRAIN), "test": (128, NUM_TEST)}
PATTERNS = {"train": "train-*-of-*", "test": "validation-*-of-*"}

_AUTOTUNE = tf.data.AUTOTUNE


class ImageNet(Dataset):
    """ImageNet read from ``train-*-of-*`` and ``validation-*-of-*`` TFRecord shards.

    Each record is a ``tf.train.Example`` with ``image/encoded`` (JPEG bytes) and
    ``image/class/label`` (int64). Before a pipeline first reads a shard, the first
    record of that shard is parsed and decoded, so a wrong or truncated shard fails
    early with a DataError that names it. Corruption further inside a shard can only
    surface as a TensorFlow error while iterating.
    """

    def __init__(
        self,
        data_path: str | os.PathLike | None,
        label_offset: int = 1,
        image_size: int = 224,
        resize_size: int = 256,
        num_train: int | str | None = "auto",
        num_test: int | str | None = "auto",
        shuffle_block: int = 10000,
        cycle_length: int = 16,
    ):
        """Finds the shards.

        Args:
            data_path: Folder holding the TFRecord shards.
            label_offset: Subtracted from stored labels (the standard conversion stores
                1..1000, hence 1).
            image_size: Output height and width.
            resize_size: Shorter side before the evaluation centre crop.
            num_train: Training-set size reported by ``info`` (so the default steps per epoch);
                "auto": the official size with the standard 1024 shards, else the records are
                counted (every shard's framing is read once); None always counts.
            num_test: Validation-set size, likewise (128 standard shards).
            shuffle_block: Training records shuffled together (memory: this many JPEGs).
            cycle_length: Training shards read in parallel (interleaved).

        Raises:
            DataError: If the folder is missing or holds no shard of either split.
            ConfigError: If a size argument is out of range.
        """
        if data_path is None:
            raise DataError("ImageNet cannot be downloaded: pass --data_path with the TFRecord shards")
        if not 0 < int(image_size) <= int(resize_size):
            raise ConfigError(f"need 0 < image_size <= resize_size, got {image_size}, {resize_size}")
        if int(shuffle_block) < 1 or int(cycle_length) < 1:
            raise ConfigError("shuffle_block and cycle_length must be at least 1")
        self.folder = os.fspath(data_path)
        self.label_offset = int(label_offset)
        self.image_size = int(image_size)
        self.resize_size = int(resize_size)
        self.shuffle_block = int(shuffle_block)
        self.cycle_length = int(cycle_length)
        self._sizes = {"train": num_train, "test": num_test}
        if not tf.io.gfile.isdir(self.folder):
            raise DataError(f"{self.folder}: no such folder (expected ImageNet TFRecord shards)")
        self._shards = {
            split: sorted(tf.io.gfile.glob(os.path.join(self.folder, pattern)))
            for split, pattern in PATTERNS.items()
        }
        if not any(self._shards.values()):
            raise DataError(
                f"{self.folder}: no shard matches {' or '.join(PATTERNS.values())}"
            )
        # Per-instance memo of the shards already checked and of the counted sizes.
        self._checked: set[str] = set()
        self._info: DatasetInfo | None = None
        self._train_sizes: list[int] | None = None

    # ----- shards -------------------------------------------------------------------
    def shards(self, split: str) -> list[str]:
        """The sorted shard paths of ``"train"`` or ``"test"``.

        Raises:
            DataError: If the split has no shard.
        """
        if not self._shards[split]:
            raise DataError(f"{self.folder}: no shard matches {PATTERNS[split]}")
        return list(self._shards[split])

    def check_shards(self, split: str | None = None, paths: list[str] | None = None) -> None:
        """Parses and decodes the first record of each shard of ``split`` (None: every split),
        or of ``paths``; a DataError names the first shard that is empty, truncated, not made of
        ImageNet examples, or holds an undecodable JPEG or out-of-range label."""
        if paths is None:
            splits = PATTERNS if split is None else (split,)
            paths = [p for s in splits for p in self._shards[s]]
        for path in paths:
            if path not in self._checked:
                self._check_one(path)
                self._checked.add(path)

    def _check_one(self, path: str) -> None:
        record = tfrecord.first_record(path)
        try:
            encoded, label = prep.parse_record(tf.constant(record), self.label_offset)
        except tf.errors.OpError as err:
            raise DataError(f"{path}: first record is not an ImageNet tf.train.Example ({one_line(err)})") from None
        if not 0 <= int(label) < NUM_CLASSES:
            raise DataError(f"{path}: label {int(label) + self.label_offset} minus offset "
                            f"{self.label_offset} is outside [0, {NUM_CLASSES})")
        try:
            tf.io.decode_jpeg(encoded, channels=3)
        except tf.errors.OpError as err:
            raise DataError(f"{path}: first image is not a valid JPEG ({one_line(err)})") from None

    def count_records(self, split: str) -> int:
        """Counts the records of a split by reading the framing of every shard."""
        return sum(tfrecord.count_records(path) for path in self.shards(split))

    def train_shard_sizes(self) -> list[int]:
        """Records in each training shard, in sorted shard order (from the framing alone)."""
        if self._train_sizes is None:
            self._train_sizes = [tfrecord.count_records(path) for path in self.shards("train")]
        return list(self._train_sizes)

    def train_labels(self) -> np.ndarray:
        """See :meth:`Dataset.train_labels`: one pass over the shards that parses labels only."""
        files = self.shards("train")
        self.check_shards(paths=files)
        ds = tf.data.TFRecordDataset(files).map(lambda record: prep.parse_label(record, self.label_offset),
                                                num_parallel_calls=_AUTOTUNE, deterministic=True)
        batches = [b.numpy() for b in ds.batch(65536)]
        return np.concatenate(batches).astype(np.int64) if batches else np.zeros([0], np.int64)

    @property
    def info(self) -> DatasetInfo:
        if self._info is None:
            sizes = {split: self._size(split, size) for split, size in self._sizes.items()}
            self._info = DatasetInfo(name="imagenet", num_classes=NUM_CLASSES,
                                     image_shape=(self.image_size, self.image_size, 3), num_train=sizes["train"],
                                     num_test=sizes["test"], mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return self._info

    def _size(self, split: str, size) -> int:
        if size == "auto":
            size = tfrecord.standard_size(self.shards(split), *STANDARD_SHARDS[split])
        return self.count_records(split) if size is None else int(size)

    # ----- pipelines ----------------------------------------------------------------
    def train(self, batch_size: int, epoch: int, seed: int, augment: bool = True, num_shards: int = 1,
              shard_index: int = 0, views: int = 1, side: SideData | None = None) -> tf.data.Dataset:
        """See :meth:`Dataset.train`.

        The shard files are permuted identically on every worker, then worker ``i``
        reads files ``i::num_shards`` (or, with fewer files than workers, every file
        and keeps records ``i::num_shards``). Records are shuffled in blocks of
        ``shuffle_block`` with a stateless permutation, and each record's crop and flip
        are seeded by (seed, epoch, worker, position), so the stream does not depend on
        TensorFlow's global seed. With several workers the stream is repeated and cut
        to :meth:`steps_per_epoch` batches so that all workers run the same steps.

        With ``views > 1`` every example yields ``views`` independent augmentations
        stacked as ``[batch, views, H, W, C]``. With ``side``, batches are ``(images,
        labels, side records)``: each shard is read beside its slice of the side file,
        so the records follow their examples through the shuffle and the sharding.

        Raises:
            DataError: If the side file's size does not match the training shards.
        """
        check_batching(batch_size, num_shards, shard_index)
        if views < 1 or (views > 1 and not augment):
            raise ConfigError(f"views must be >= 1, and several views need augment=True; got {views}")
        all_files = self.shards("train")
        order = seeds.permutation(seed, epoch, len(all_files))
        by_record = num_shards > 1 and len(all_files) < num_shards
        if num_shards > 1 and not by_record:
            order = order[shard_index::num_shards]
        files = [all_files[i] for i in order]
        self.check_shards(paths=files)
        key = seeds.epoch_key(seed, epoch, shard_index)

        if side is None:
            ds = tf.data.Dataset.from_tensor_slices(files)
            read = tf.data.TFRecordDataset
        else:
            slices = streams.side_slices(side, self.train_shard_sizes(), order, self.folder)
            ds = tf.data.Dataset.from_tensor_slices((files, *slices))
            read = functools.partial(streams.with_side, side)
        ds = ds.interleave(read, cycle_length=min(self.cycle_length, len(files)), block_length=1,
                           num_parallel_calls=_AUTOTUNE, deterministic=True)
        if by_record:
            ds = ds.shard(num_shards, shard_index)
        ds = streams.block_shuffle(ds, self.shuffle_block, key)
        if num_shards > 1:
            ds = ds.repeat()
        ds = ds.enumerate()

        def _one(position, item):
            record, extra = item if side is not None else (item, None)
            encoded, label = prep.parse_record(record, self.label_offset)
            if augment:
                seed_t = seeds.example_seed(key, position)
                image = [prep.train_image(encoded, tf.random.experimental.stateless_fold_in(seed_t, v) if v else seed_t,
                                          self.image_size, IMAGENET_MEAN, IMAGENET_STD) for v in range(views)]
                image = tf.stack(image) if views > 1 else image[0]
            else:
                image = self._eval_image(encoded)
            if side is None:
                return image, label
            return image, label, tf.reshape(tf.io.decode_raw(extra, side.dtype), side.shape)

        ds = ds.map(_one, num_parallel_calls=_AUTOTUNE, deterministic=True)
        ds = ds.batch(int(batch_size), drop_remainder=True)
        if num_shards > 1:
            ds = ds.take(self._shard_steps(batch_size, num_shards))
        return ds.prefetch(_AUTOTUNE)

    def train_subset(self, indices, batch_size: int, epoch: int | None = None, seed: int = 0, num_shards: int = 1,
                     shard_index: int = 0) -> tf.data.Dataset:
        """Training examples at natural-order positions ``indices``, inference preprocessing.

        Only the shards that hold one of them are read; the rest of each is skipped
        without decoding. Batches are ``(images, labels, index)`` in natural order, or,
        with ``epoch``, shuffled in blocks by (seed, epoch). With several workers, each
        gets ``len(indices) // num_shards`` examples (positions ``i::num_shards``).

        Raises:
            ConfigError: If an index is outside the training set.
        """
        check_batching(batch_size, num_shards, shard_index)
        indices = np.unique(np.asarray(indices, np.int64))
        ds = streams.subset_records(self.shards("train"), self.train_shard_sizes(), indices, self.check_shards)
        if num_shards > 1:
            ds = ds.take(len(indices) - len(indices) % num_shards).shard(num_shards, shard_index)
        if epoch is not None:
            ds = streams.block_shuffle(ds, self.shuffle_block, seeds.epoch_key(seed, epoch, shard_index))
        ds = ds.map(lambda i, record: (*self._eval_example(record), i), num_parallel_calls=_AUTOTUNE,
                    deterministic=True)
        return ds.batch(int(batch_size)).prefetch(_AUTOTUNE)

    def _shard_steps(self, batch_size: int, num_shards: int) -> int:
        """Steps every worker runs; zero would leave the workers with nothing to do."""
        steps = self.steps_per_epoch(batch_size, num_shards)
        if steps == 0:
            raise ConfigError(f"imagenet: batch size {batch_size} x {num_shards} shards exceeds the "
                              f"{self.info.num_train} training examples")
        return steps

    def test(self, batch_size: int) -> tf.data.Dataset:
        """See :meth:`Dataset.test`."""
        ds = self._eval_records("test", batch_size)
        ds = ds.map(
            self._eval_example,
            num_parallel_calls=_AUTOTUNE,
            deterministic=True,
        )
        return ds.batch(int(batch_size)).prefetch(_AUTOTUNE)

    def train_eval(self, batch_size: int) -> tf.data.Dataset:
        """See :meth:`Dataset.train_eval`; ``index`` is the running record position."""
        ds = self._eval_records("train", batch_size).enumerate()
        ds = ds.map(
            lambda i, record: (*self._eval_example(record), i),
            num_parallel_calls=_AUTOTUNE,
            deterministic=True,
        )
        return ds.batch(int(batch_size)).prefetch(_AUTOTUNE)

    def _eval_records(self, split: str, batch_size: int) -> tf.data.Dataset:
        """The records of a split, shards in sorted order, read one after another."""
        check_batching(batch_size)
        files = self.shards(split)
        self.check_shards(paths=files)
        return tf.data.TFRecordDataset(files)

    def _eval_image(self, encoded: tf.Tensor) -> tf.Tensor:
        return prep.eval_image(
            encoded, self.image_size, self.resize_size, IMAGENET_MEAN, IMAGENET_STD
        )

    def _eval_example(self, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        encoded, label = prep.parse_record(record, self.label_offset)
        return self._eval_image(encoded), label
