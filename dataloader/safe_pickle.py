"""Loading the CIFAR python batches without letting them run code (see utils.safe_pickle)."""
from __future__ import annotations

import io

from utils.errors import DataError
from utils.safe_pickle import RestrictedUnpickler


def load_pickle(data: bytes, source: str):
    """Unpickles ``data`` admitting only numpy arrays and plain containers.

    Args:
        data: The pickle's bytes.
        source: File name used in error messages.

    Returns:
        The unpickled object.

    Raises:
        DataError: If the pickle names a forbidden global, or is truncated or corrupt.
    """
    def refuse(name):
        return DataError(f"{source}: refusing to unpickle forbidden global {name}")

    try:
        return RestrictedUnpickler(io.BytesIO(data), refuse, encoding="bytes").load()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        raise DataError(
            f"{source}: truncated or corrupt pickle ({type(err).__name__}: {err})"
        ) from None
