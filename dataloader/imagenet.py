"""ImageNet (ILSVRC-2012) from the standard TFRecord shards."""
from __future__ import annotations

import os

import tensorflow as tf

from dataloader import imagenet_preprocess as prep
from dataloader import seeds, tfrecord
from dataloader.base import Dataset, DatasetInfo, check_batching
from dataloader.files import one_line
from utils.errors import ConfigError, DataError

IMAGENET_MEAN = (123.68, 116.78, 103.94)
IMAGENET_STD = (58.40, 57.12, 57.38)
NUM_CLASSES = 1000
NUM_TRAIN = 1281167
NUM_TEST = 50000
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
        num_train: int | None = NUM_TRAIN,
        num_test: int | None = NUM_TEST,
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
            num_train: Training-set size reported by ``info``; None counts the records
                (reads every shard's framing) the first time ``info`` is asked for.
            num_test: Validation-set size, likewise.
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
        """Parses and decodes the first record of each shard.

        Args:
            split: ``"train"``, ``"test"`` or None for every shard found.
            paths: Check these shards instead.

        Raises:
            DataError: Naming the first shard that is empty, truncated, not made of
                ImageNet examples, or holds an undecodable JPEG or out-of-range label.
        """
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
            raise DataError(
                f"{path}: first record is not an ImageNet tf.train.Example ({one_line(err)})"
            ) from None
        if not 0 <= int(label) < NUM_CLASSES:
            raise DataError(
                f"{path}: label {int(label) + self.label_offset} minus offset "
                f"{self.label_offset} is outside [0, {NUM_CLASSES})"
            )
        try:
            tf.io.decode_jpeg(encoded, channels=3)
        except tf.errors.OpError as err:
            raise DataError(f"{path}: first image is not a valid JPEG ({one_line(err)})") from None

    def count_records(self, split: str) -> int:
        """Counts the records of a split by reading the framing of every shard."""
        return sum(tfrecord.count_records(path) for path in self.shards(split))

    @property
    def info(self) -> DatasetInfo:
        if self._info is None:
            sizes = {
                split: self.count_records(split) if size is None else int(size)
                for split, size in self._sizes.items()
            }
            self._info = DatasetInfo(
                name="imagenet",
                num_classes=NUM_CLASSES,
                image_shape=(self.image_size, self.image_size, 3),
                num_train=sizes["train"],
                num_test=sizes["test"],
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
            )
        return self._info

    # ----- pipelines ----------------------------------------------------------------
    def train(
        self,
        batch_size: int,
        epoch: int,
        seed: int,
        augment: bool = True,
        num_shards: int = 1,
        shard_index: int = 0,
    ) -> tf.data.Dataset:
        """See :meth:`Dataset.train`.

        The shard files are permuted identically on every worker, then worker ``i``
        reads files ``i::num_shards`` (or, with fewer files than workers, every file
        and keeps records ``i::num_shards``). Records are shuffled in blocks of
        ``shuffle_block`` with a stateless permutation, and each record's crop and flip
        are seeded by (seed, epoch, worker, position), so the stream does not depend on
        TensorFlow's global seed. With several workers the stream is repeated and cut
        to :meth:`steps_per_epoch` batches so that all workers run the same steps.
        """
        check_batching(batch_size, num_shards, shard_index)
        files = self.shards("train")
        files = [files[i] for i in seeds.permutation(seed, epoch, len(files))]
        by_record = num_shards > 1 and len(files) < num_shards
        if num_shards > 1 and not by_record:
            files = files[shard_index::num_shards]
        self.check_shards(paths=files)
        key = seeds.epoch_key(seed, epoch, shard_index)

        ds = tf.data.Dataset.from_tensor_slices(files)
        ds = ds.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(self.cycle_length, len(files)),
            block_length=1,
            num_parallel_calls=_AUTOTUNE,
            deterministic=True,
        )
        if by_record:
            ds = ds.shard(num_shards, shard_index)
        ds = _block_shuffle(ds, self.shuffle_block, key)
        if num_shards > 1:
            ds = ds.repeat()
        ds = ds.enumerate()

        def _one(position, record):
            encoded, label = prep.parse_record(record, self.label_offset)
            if augment:
                image = prep.train_image(
                    encoded, seeds.example_seed(key, position), self.image_size,
                    IMAGENET_MEAN, IMAGENET_STD,
                )
            else:
                image = self._eval_image(encoded)
            return image, label

        ds = ds.map(_one, num_parallel_calls=_AUTOTUNE, deterministic=True)
        ds = ds.batch(int(batch_size), drop_remainder=True)
        if num_shards > 1:
            ds = ds.take(self._shard_steps(batch_size, num_shards))
        return ds.prefetch(_AUTOTUNE)

    def _shard_steps(self, batch_size: int, num_shards: int) -> int:
        """Steps every worker runs; zero would leave the workers with nothing to do."""
        steps = self.steps_per_epoch(batch_size, num_shards)
        if steps == 0:
            raise ConfigError(
                f"imagenet: batch size {batch_size} x {num_shards} shards exceeds the "
                f"{self.info.num_train} training examples"
            )
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


def _block_shuffle(ds: tf.data.Dataset, block: int, key: int) -> tf.data.Dataset:
    """Shuffles consecutive blocks of ``block`` elements with stateless permutations.

    ``Dataset.shuffle`` mixes TensorFlow's global seed into its seed, which would make
    the order depend on process state; a stateless permutation per block does not.
    """

    def _permute(block_index, records):
        noise = tf.random.stateless_uniform(
            tf.shape(records)[:1], seed=seeds.example_seed(key, -1 - block_index)
        )
        return tf.gather(records, tf.argsort(noise))

    ds = ds.batch(block).enumerate()
    return ds.map(_permute).unbatch()
