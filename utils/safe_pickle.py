"""A restricted unpickler: plain containers and numpy arrays only, never code.

Unpickling runs whatever callables a file names. Params pickles and the CIFAR python batches
need nothing but numpy's array reconstruction, so every other global is refused.
"""

from __future__ import annotations

import collections
import importlib
import pickle
from typing import Any, Callable, Optional

import numpy as np

# numpy moved its internals from numpy.core to numpy._core in 2.0; pickles name whichever
# was current when they were written (the reference file says numpy.core.multiarray).
_NUMPY_INTERNALS = {
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),
}


def _numpy_internal(submodule: str, name: str) -> Any:
    """Resolves numpy.{_core,core}.<submodule>.<name>, preferring the current location.

    Importing ``numpy.core`` on numpy 2 goes through a deprecation shim, so the new
    location is tried first and the old one only on numpy 1.x.
    """
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {submodule}.{name}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` that protocol-2 pickles use to rebuild bytes.

    The real function accepts any codec name; only the latin-1 round trip that pickle
    itself emits is let through.
    """
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError("_codecs.encode is only allowed with latin1 text")
    return text.encode("latin1")


def _resolve_allowed(module: str, name: str) -> Optional[Any]:
    """Returns the object for an admitted global, or None if it is not admitted."""
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric"):
        submodule = module.rsplit(".", 1)[1]
        if (submodule, name) in _NUMPY_INTERNALS:
            return _numpy_internal(submodule, name)
    if (module, name) == ("_codecs", "encode"):
        return _latin1_encode
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only builds plain containers and numpy arrays.

    Args:
        file: a binary file object.
        refuse: called with the forbidden global's "module.name"; returns the exception to raise.
        encoding: as for `pickle.Unpickler` ("bytes" for Python-2 pickles such as CIFAR's).
    """

    def __init__(self, file: Any, refuse: Callable[[str], Exception], encoding: str = "ASCII") -> None:
        super().__init__(file, encoding=encoding)
        self._refuse = refuse

    def find_class(self, module: str, name: str) -> Any:
        obj = _resolve_allowed(module, name)
        if obj is None:
            raise self._refuse(f"{module}.{name}")
        return obj
