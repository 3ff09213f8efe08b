"""A restricted unpickler for the CIFAR python batches.

Unpickling runs arbitrary callables named in the file. The CIFAR batches only need
numpy's array reconstruction, so everything else is refused: a downloaded or
tampered file cannot execute code.
"""
from __future__ import annotations

import io
import pickle

import numpy as np

from utils.errors import DataError

# The globals a Python-2 numpy pickle names, under both the numpy<2 and numpy>=2 module.
_ALLOWED = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


def _multiarray():
    """numpy's C multiarray module, whichever name this numpy version gives it."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core import multiarray
    return multiarray


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals in ``_ALLOWED``."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise DataError(
                f"{self._source}: refusing to unpickle forbidden global {module}.{name}"
            )
        # Resolve to the objects directly: importing ``numpy.core`` warns on numpy 2.
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        return getattr(_multiarray(), name)


def load_pickle(data: bytes, source: str):
    """Unpickles ``data`` admitting only numpy arrays, dtypes and scalars.

    Args:
        data: The pickle's bytes.
        source: File name used in error messages.

    Returns:
        The unpickled object.

    Raises:
        DataError: If the pickle names a forbidden global, or is truncated or corrupt.
    """
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        raise DataError(
            f"{source}: truncated or corrupt pickle ({type(err).__name__}: {err})"
        ) from None
