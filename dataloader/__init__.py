"""Datasets for training and evaluating the compressed networks.

``build_dataset(name, data_path)`` returns a :class:`Dataset` whose ``train``, ``test``
and ``train_eval`` methods give normalised ``tf.data`` pipelines. This package imports
only from ``utils``.
"""
from __future__ import annotations

import os

from dataloader.base import Dataset, DatasetInfo, SideData
from dataloader.cifar import CIFAR10, CIFAR100, Cifar, CifarSpec
from dataloader.imagenet import ImageNet
from dataloader.mnist import Mnist
from utils.errors import ConfigError

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "Cifar",
    "CifarSpec",
    "Dataset",
    "DatasetInfo",
    "ImageNet",
    "Mnist",
    "SideData",
    "DATASET_NAMES",
    "build_dataset",
]

DATASET_NAMES = ("cifar10", "cifar100", "imagenet", "mnist")


def build_dataset(name: str, data_path: str | os.PathLike | None = None, **options) -> Dataset:
    """Creates a dataset by name.

    Args:
        name: ``cifar10``, ``cifar100``, ``imagenet`` or ``mnist`` (any case).
        data_path: Where the data is; None downloads through ``tf.keras.datasets``
            (not possible for ImageNet).
        **options: Extra constructor arguments (e.g. ``image_size`` for ImageNet,
            ``max_shift`` for MNIST).

    Returns:
        The dataset; most data is read lazily, on first use.

    Raises:
        ConfigError: If the name is unknown.
        DataError: If the data cannot be found.
    """
    key = str(name).strip().lower()
    if key == "cifar10":
        return Cifar(CIFAR10, data_path, **options)
    if key == "cifar100":
        return Cifar(CIFAR100, data_path, **options)
    if key == "imagenet":
        return ImageNet(data_path, **options)
    if key == "mnist":
        return Mnist(data_path, **options)
    raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
