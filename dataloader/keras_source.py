"""Fallback to ``tf.keras.datasets`` when no ``--data_path`` is given (needs the network)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from dataloader.files import one_line
from utils.errors import DataError


def load_keras_dataset(
    module_name: str, display_name: str, **kwargs
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Loads both splits of a ``tf.keras.datasets`` set, downloading it if not cached.

    Args:
        module_name: Attribute of ``tf.keras.datasets``, e.g. ``"cifar10"``.
        display_name: Name used in the error message.
        **kwargs: Passed to ``load_data``.

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}`` with uint8 images as
        Keras returns them and flat int64 labels.

    Raises:
        DataError: If the download or the cached copy fails.
    """
    try:
        module = getattr(tf.keras.datasets, module_name)
        (x_train, y_train), (x_test, y_test) = module.load_data(**kwargs)
    except Exception as err:  # noqa: BLE001 - urllib, OSError, bad cache...: all mean "no data"
        raise DataError(
            f"could not download {display_name} through tf.keras.datasets (no network?): "
            f"{one_line(err)}; pass --data_path with a local copy"
        ) from None
    return {
        "train": (np.asarray(x_train, np.uint8), np.asarray(y_train, np.int64).reshape(-1)),
        "test": (np.asarray(x_test, np.uint8), np.asarray(y_test, np.int64).reshape(-1)),
    }
