"""MNIST from the official IDX files (plain or gzipped), or from Keras' download.

Optionally resized once at load time (`image_size`, e.g. 32 for LeCun's 32x32 LeNet-5 as
data-free knowledge distillation uses it, Lopes et al. 2017): bilinear with antialiasing,
rounded back to uint8, so the pipelines see ordinary uint8 images of the new size.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from dataloader import idx
from dataloader.base import DatasetInfo
from dataloader.in_memory import InMemoryDataset
from dataloader.keras_source import load_keras_dataset
from utils.errors import ConfigError, DataError

# The usual (x / 255 - 0.1307) / 0.3081, expressed on 0..255 pixels like every dataset here.
MNIST_MEAN = (0.1307 * 255.0,)
MNIST_STD = (0.3081 * 255.0,)
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10

# (images file, labels file) per split, without the optional ".gz".
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Official split sizes, reported by ``info`` when a split's files are absent.
_OFFICIAL_SIZES = {"train": 60000, "test": 10000}


class Mnist(InMemoryDataset):
    """MNIST digits, 28x28 grey images (or resized to ``image_size``), 10 classes.

    The splits are read separately on first use, so the test set can be used even
    when the training images are absent (asking for them then raises DataError).
    """

    def __init__(self, data_path: str | os.PathLike | None = None, max_shift: int = 0,
                 image_size: int | None = None):
        """Checks the folder; the arrays are read on first use.

        Args:
            data_path: Folder holding the four official IDX files (each plain or
                ``.gz``). ``None`` downloads through ``tf.keras.datasets``.
            max_shift: Training augmentation: shift each image by up to this many
                pixels in each direction (0, the default, disables it), pixels of the
                resized image if ``image_size`` is given.
            image_size: Resize every image from 28x28 to this height and width once,
                when its split is read (bilinear, antialiased, rounded to uint8).
                ``None`` (the default) keeps 28x28.

        Raises:
            DataError: If the folder is missing or holds none of the IDX files.
            ConfigError: If ``max_shift`` is negative or ``image_size`` not positive.
        """
        super().__init__(MNIST_MEAN, MNIST_STD)
        if int(max_shift) < 0:
            raise ConfigError(f"MNIST max_shift must be >= 0, got {max_shift}")
        if image_size is not None and int(image_size) < 1:
            raise ConfigError(f"MNIST image_size must be positive, got {image_size}")
        self._max_shift = int(max_shift)
        side = IMAGE_SHAPE[0] if image_size is None else int(image_size)
        self._image_shape = (side, side, IMAGE_SHAPE[2])
        self._folder = None if data_path is None else os.fspath(data_path)
        if self._folder is not None:
            _check_folder(self._folder)

    def _path(self, name: str) -> str:
        path = idx.find_idx(self._folder, name)
        if path is None:
            raise DataError(f"{os.path.join(self._folder, name)}: file not found (nor {name}.gz)")
        return path

    def _load_splits(self, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {name: (_resized(images, self._image_shape[0]), labels)
                for name, (images, labels) in self._read_splits(split).items()}

    def _read_splits(self, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``split`` (or both splits, from Keras) as read: 28x28 images."""
        if self._folder is None:
            loaded = load_keras_dataset("mnist", "MNIST")
            return {k: (x.reshape(-1, *IMAGE_SHAPE), y) for k, (x, y) in loaded.items()}
        images_name, labels_name = FILES[split]
        images_path = self._path(images_name)
        labels_path = self._path(labels_name)
        images = idx.read_idx_file(images_path, idx.IMAGES_MAGIC)
        if images.shape[1:] != IMAGE_SHAPE[:2]:
            raise DataError(f"{images_path}: images are {images.shape[1:]}, expected (28, 28)")
        labels = idx.read_idx_file(labels_path, idx.LABELS_MAGIC).astype(np.int64)
        if len(labels) != len(images):
            raise DataError(
                f"{labels_path}: {len(labels)} labels for the {len(images)} images in {images_path}"
            )
        if len(labels) and labels.max() >= NUM_CLASSES:
            raise DataError(f"{labels_path}: label {labels.max()} is outside [0, {NUM_CLASSES})")
        return {split: (images[..., np.newaxis], labels)}

    def _split_size(self, split: str) -> int:
        """Size of a split from an IDX header, without reading the data."""
        if self._folder is None:
            return len(self._split(split)[1])
        for name in FILES[split]:
            path = idx.find_idx(self._folder, name)
            if path is not None:
                return idx.count_idx_items(path)
        return _OFFICIAL_SIZES[split]

    def _make_info(self) -> DatasetInfo:
        return DatasetInfo(
            name="mnist",
            num_classes=NUM_CLASSES,
            image_shape=self._image_shape,
            num_train=self._split_size("train"),
            num_test=self._split_size("test"),
            mean=MNIST_MEAN,
            std=MNIST_STD,
        )

    def _augment(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        if self._max_shift == 0:
            return image
        s = self._max_shift
        # Pad with the normalised value of a black pixel, MNIST's background.
        background = -MNIST_MEAN[0] / MNIST_STD[0]
        image = tf.pad(image, [[s, s], [s, s], [0, 0]], constant_values=background)
        return tf.image.stateless_random_crop(image, self._image_shape, seed)


def _resized(images: np.ndarray, size: int, chunk: int = 10000) -> np.ndarray:
    """uint8 NHWC ``images`` resized to ``size`` x ``size``: bilinear with antialiasing, rounded
    and clipped back to uint8 (``chunk`` images at a time, to bound the float32 copies)."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, images.shape[3]), np.uint8)
    for start in range(0, len(images), chunk):
        resized = tf.image.resize(images[start:start + chunk], (size, size), method="bilinear", antialias=True)
        out[start:start + chunk] = np.clip(np.rint(resized.numpy()), 0, 255)
    return out


def _check_folder(folder: str) -> None:
    """Fails early on a missing folder or one without any MNIST file."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder (expected the MNIST IDX files)")
    names = [name for pair in FILES.values() for name in pair]
    if all(idx.find_idx(folder, name) is None for name in names):
        raise DataError(f"{folder}: holds none of the MNIST files {', '.join(names)} (plain or .gz)")
