"""Reading raw files with errors that name the file, for the dataset loaders."""
from __future__ import annotations

import gzip
import os
import zlib

from utils.errors import DataError


def one_line(err: BaseException) -> str:
    """``"Type: message"`` of an exception, squeezed onto one line for a user-facing error."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_bytes(path: str | os.PathLike) -> bytes:
    """Reads a whole local file.

    Args:
        path: The file.

    Returns:
        Its contents.

    Raises:
        DataError: If the file is missing, is a folder, or cannot be read.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, expected a file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({one_line(err)})") from None


def gunzip(data: bytes, source: str | os.PathLike) -> bytes:
    """Decompresses gzip bytes.

    Args:
        data: The compressed bytes.
        source: File name used in error messages.

    Returns:
        The decompressed bytes.

    Raises:
        DataError: If the stream is truncated or not gzip.
    """
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        # gzip.BadGzipFile is an OSError; a cut-off stream is an EOFError.
        raise DataError(f"{source}: truncated or corrupt gzip file ({one_line(err)})") from None
