"""CIFAR-10 and CIFAR-100: one class, parameterised by a :class:`CifarSpec`."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from dataloader import cifar_format, seeds
from dataloader.base import DatasetInfo
from dataloader.in_memory import InMemoryDataset
from dataloader.keras_source import load_keras_dataset
from utils.errors import ConfigError, DataError

# These are the usual CIFAR constants in reversed (BGR) order, applied here to R, G, B.
# Kept on purpose: the reference pretrained weights were trained with exactly these,
# and "fixing" the order would cost those checkpoints accuracy.
CIFAR10_MEAN = (113.9, 123.0, 125.3)
CIFAR10_STD = (66.7, 62.1, 63.0)
CIFAR100_MEAN = (112.0, 124.0, 129.0)
CIFAR100_STD = (70.0, 65.0, 68.0)

IMAGE_SHAPE = (32, 32, 3)
# Reflect padding before the random crop, in pixels per side.
PAD = 4
PADDINGS = ("reflect", "black")


@dataclasses.dataclass(frozen=True)
class CifarSpec:
    """What differs between CIFAR-10 and CIFAR-100.

    Attributes:
        name: Dataset name.
        display_name: Name for messages.
        num_classes: Number of classes.
        folder_name: Official folder inside the archive.
        archive_name: Official archive file name.
        train_files: Training batch files, in order.
        test_file: Test batch file.
        label_key: Key of the labels in each batch.
        mean: Per-channel mean (R, G, B).
        std: Per-channel standard deviation (R, G, B).
        keras_module: ``tf.keras.datasets`` module for the download fallback.
        keras_kwargs: Keyword arguments of its ``load_data``.
    """

    name: str
    display_name: str
    num_classes: int
    folder_name: str
    archive_name: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    keras_module: str
    keras_kwargs: tuple[tuple[str, str], ...] = ()


CIFAR10 = CifarSpec(
    name="cifar10",
    display_name="CIFAR-10",
    num_classes=10,
    folder_name="cifar-10-batches-py",
    archive_name="cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    label_key=b"labels",
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    keras_module="cifar10",
)

CIFAR100 = CifarSpec(
    name="cifar100",
    display_name="CIFAR-100",
    num_classes=100,
    folder_name="cifar-100-python",
    archive_name="cifar-100-python.tar.gz",
    train_files=("train",),
    test_file="test",
    label_key=b"fine_labels",
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
    keras_module="cifar100",
    keras_kwargs=(("label_mode", "fine"),),
)


class Cifar(InMemoryDataset):
    """CIFAR-10 or CIFAR-100 from the official python files, or from Keras' download.

    Training augmentation, per image: normalise, random horizontal flip, pad by 4 (reflected,
    as the reference pipeline pads the normalised image, or black), random 32x32 crop.
    """

    def __init__(self, spec: CifarSpec, data_path: str | os.PathLike | None = None, padding: str = "reflect"):
        """Locates the data; the arrays are read on first use.

        Args:
            spec: :data:`CIFAR10` or :data:`CIFAR100`.
            data_path: The official folder, a folder holding it, the official
                ``.tar.gz``, or a folder holding that. ``None`` downloads through
                ``tf.keras.datasets`` (needs the network).

            padding: How the 4-pixel border of a training crop is filled: ``reflect`` (the EKG
                reference's) or ``black`` (zero pixels, as torchvision's and TensorFlow's
                official CIFAR pipelines pad; weights trained that way keep their BatchNorm
                statistics when fine-tuned with it).

        Raises:
            DataError: If ``data_path`` holds none of the accepted layouts.
            ConfigError: If ``padding`` is neither.
        """
        super().__init__(spec.mean, spec.std)
        if padding not in PADDINGS:
            raise ConfigError(f"--cifar_padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        self.padding = padding
        # A black pixel after normalisation: what zero padding of the raw image puts there.
        self._black = tf.constant(-np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32))
        self.spec = spec
        self._files = None
        if data_path is not None:
            self._files = cifar_format.locate(
                data_path, spec.folder_name, spec.archive_name, spec.test_file
            )

    def _load_splits(self, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        spec = self.spec
        if self._files is None:
            loaded = load_keras_dataset(
                spec.keras_module, spec.display_name, **dict(spec.keras_kwargs)
            )
            for name, (images, labels) in loaded.items():
                _check_keras(images, labels, spec, name)
            return loaded
        names = spec.train_files if split == "train" else (spec.test_file,)
        return {
            split: cifar_format.read_split(self._files, names, spec.label_key, spec.num_classes)
        }

    def _make_info(self) -> DatasetInfo:
        return DatasetInfo(
            name=self.spec.name,
            num_classes=self.spec.num_classes,
            image_shape=IMAGE_SHAPE,
            num_train=len(self.train_arrays()[1]),
            num_test=len(self.test_arrays()[1]),
            mean=self.spec.mean,
            std=self.spec.std,
        )

    def _augment(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        flip_seed, crop_seed = seeds.split_seed(seed, 2)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        if self.padding == "reflect":
            image = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]], mode="REFLECT")
        else:
            image = tf.pad(image - self._black, [[PAD, PAD], [PAD, PAD], [0, 0]]) + self._black
        return tf.image.stateless_random_crop(image, IMAGE_SHAPE, crop_seed)


def _check_keras(images: np.ndarray, labels: np.ndarray, spec: CifarSpec, split: str) -> None:
    """Rejects a Keras cache that does not hold CIFAR images (e.g. channels-first)."""
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or len(labels) != len(images):
        raise DataError(
            f"tf.keras.datasets.{spec.keras_module} ({split}): images have shape "
            f"{images.shape}, expected (N, 32, 32, 3) with {len(labels)} labels"
        )
