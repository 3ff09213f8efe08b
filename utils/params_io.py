"""Reading, writing and checking trained parameters.

Parameters are stored as a pickled dict ``{"scope/var:0": numpy.ndarray}``, the format of
the EKG reference (for example ``conv/kernel:0`` of shape (3, 3, 3, 16) or
``bn/moving_mean:0`` of shape (1, 1, 1, 16)). Pickles converted from .mat files also
hold ``__header__``, ``__version__`` and ``__globals__`` entries; such dunder keys are
metadata, not parameters, and are ignored everywhere in this module.

A pickle can run arbitrary code when loaded, and params files get passed around, so
:func:`load_params` only admits the few globals that plain arrays need.
"""
import os
import pickle
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from utils.atomic import atomic_write_bytes
from utils.errors import ParamsError
from utils.safe_pickle import RestrictedUnpickler

PathLike = Union[str, "os.PathLike[str]"]

# Protocol 4 keeps arrays in-band and is read by every Python 3.8+ toolchain.
_PROTOCOL = 4

def _is_dunder(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("__") and key.endswith("__")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_params(path: PathLike) -> Dict[str, np.ndarray]:
    """Loads a params pickle without letting it run code.

    Args:
        path: The pickle to read.

    Returns:
        A dict from variable name to numpy array, in file order, without dunder metadata
        entries such as ``__header__``. Arrays keep their stored dtype.

    Raises:
        ParamsError: If the file is missing, unreadable, truncated or corrupt, asks for a
            global other than the array-building ones, or does not hold a dict of
            str -> numpy.ndarray.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ParamsError(f"params file {path} does not exist")
    if os.path.isdir(path):
        raise ParamsError(f"params file {path} is a directory, not a pickle")
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise ParamsError(f"cannot read params from {path}: {err.strerror}") from None
    try:
        with handle:
            obj = RestrictedUnpickler(handle, lambda name: ParamsError(
                f"refusing to load {path}: it asks for {name}, which could run code; "
                "only arrays and plain containers are allowed")).load()
    except ParamsError:
        raise
    except EOFError:
        raise ParamsError(
            f"cannot read params from {path}: the file is empty or truncated"
        ) from None
    except Exception as err:  # a corrupt pickle can fail in almost any way
        raise ParamsError(
            f"cannot read params from {path}: not a valid pickle "
            f"({type(err).__name__}: {_one_line(err)})"
        ) from None

    if not isinstance(obj, dict):
        raise ParamsError(
            f"{path} does not hold params: expected a dict of name -> array, "
            f"got {type(obj).__name__}"
        )
    params: Dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if _is_dunder(key):
            continue
        if not isinstance(key, str):
            raise ParamsError(
                f"{path} does not hold params: key {key!r} is a {type(key).__name__}, not a str"
            )
        if not isinstance(value, np.ndarray):
            raise ParamsError(
                f"{path} does not hold params: {key} is a {type(value).__name__}, not an array"
            )
        if value.dtype.hasobject:
            raise ParamsError(f"{path} does not hold params: {key} is an array of Python objects")
        params[key] = value
    return params


def save_params(path: PathLike, params: Mapping[str, Any]) -> None:
    """Atomically writes params as a pickle that :func:`load_params` accepts.

    Args:
        path: The pickle to (over)write; its parent directory is created if needed.
        params: Variable name -> array-like (numpy arrays, tf.Variables, lists...). Dunder
            keys are skipped, as :func:`load_params` would drop them anyway.

    Raises:
        ParamsError: If a key is not a str or a value is not a numeric array.
    """
    # Serialise first, so a failure cannot leave a half-written file behind.
    atomic_write_bytes(path, params_bytes(params))


def params_bytes(params: Mapping[str, Any]) -> bytes:
    """The bytes `save_params` writes for `params` (same checks)."""
    arrays: Dict[str, np.ndarray] = {}
    for key, value in params.items():
        if _is_dunder(key):
            continue
        if not isinstance(key, str):
            raise ParamsError(f"cannot save params: key {key!r} is not a str")
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise ParamsError(f"cannot save params: {key} is not a numeric array")
        arrays[key] = array
    return pickle.dumps(arrays, protocol=_PROTOCOL)


ShapeLike = Union[Sequence[Optional[int]], Any]


def _as_shape(shape: ShapeLike) -> Tuple[Optional[int], ...]:
    """Turns a tuple, list or tf.TensorShape into a tuple of ints (None = any size)."""
    return tuple(None if dim is None else int(dim) for dim in shape)


def _shape_of(value: Any) -> Tuple[Optional[int], ...]:
    # Read .shape directly so tf.Variables are not copied to numpy just for their shape.
    shape = getattr(value, "shape", None)
    return _as_shape(shape if shape is not None else np.shape(value))


def _fmt_shape(shape: Tuple[Optional[int], ...]) -> str:
    return "(" + ",".join("?" if dim is None else str(dim) for dim in shape) + ")"


def _fits(want: Tuple[Optional[int], ...], have: Tuple[Optional[int], ...]) -> bool:
    return len(want) == len(have) and all(w is None or w == h for w, h in zip(want, have))


def check_params(
    expected: Mapping[str, ShapeLike],
    got: Mapping[str, Any],
    what: str = "network",
) -> None:
    """Checks that ``got`` has exactly the variables and shapes in ``expected``.

    Args:
        expected: Variable name -> shape the network needs (a None dimension matches any
            size).
        got: Variable name -> array (or anything with a ``.shape``), e.g. the result of
            :func:`load_params`.
        what: The network's name for the error message, e.g. ``"ResNet-56"``.

    Raises:
        ParamsError: On any difference, with one line giving the number of missing,
            unexpected and mis-shaped variables and the first of each, e.g.
            ``params do not fit ResNet-56: 3 missing (first: fc/kernel:0), 1 unexpected
            (first: foo:0), 2 mis-shaped (first: conv/kernel:0 has (3,3,3,8), expected
            (3,3,3,16))``. "First" follows the order of ``expected`` for missing and
            mis-shaped variables and the order of ``got`` for unexpected ones.
    """
    want = {key: _as_shape(shape) for key, shape in expected.items() if not _is_dunder(key)}
    have = {key: value for key, value in got.items() if not _is_dunder(key)}

    missing = [key for key in want if key not in have]
    unexpected = [key for key in have if key not in want]
    misshaped = []
    for key, shape in want.items():
        if key in have:
            actual = _shape_of(have[key])
            if not _fits(shape, actual):
                misshaped.append((key, actual, shape))

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if misshaped:
        key, actual, shape = misshaped[0]
        problems.append(
            f"{len(misshaped)} mis-shaped (first: {key} has {_fmt_shape(actual)}, "
            f"expected {_fmt_shape(shape)})"
        )
    if problems:
        raise ParamsError(f"params do not fit {what}: " + ", ".join(problems))
