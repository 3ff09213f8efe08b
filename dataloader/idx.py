"""Parsing the IDX files MNIST is distributed in.

An IDX file starts with a big-endian header: two zero bytes, a type code (0x08 for
unsigned bytes), the number of dimensions, then one uint32 size per dimension. The
payload follows, row-major. MNIST's magic numbers are 2051 for images (3 dims) and
2049 for labels (1 dim).
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from dataloader.files import gunzip, one_line, read_bytes
from utils.errors import DataError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


def parse_header(data: bytes, source: str) -> tuple[int, tuple[int, ...], int]:
    """Reads an IDX header.

    Args:
        data: The file's (decompressed) bytes; only the header needs to be present.
        source: File name used in error messages.

    Returns:
        ``(magic, dims, header_size)``.

    Raises:
        DataError: If the header is cut off or is not an unsigned-byte IDX header.
    """
    if len(data) < 4:
        raise DataError(f"{source}: truncated IDX file ({len(data)} bytes, no header)")
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim == 0:
        raise DataError(f"{source}: not an unsigned-byte IDX file (magic number {magic})")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{source}: truncated IDX header ({len(data)} of {header_size} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header_size])
    return magic, dims, header_size


def parse_idx(data: bytes, source: str, magic: int) -> np.ndarray:
    """Parses a whole unsigned-byte IDX file.

    Args:
        data: The file's (decompressed) bytes.
        source: File name used in error messages.
        magic: The expected magic number (:data:`IMAGES_MAGIC` or :data:`LABELS_MAGIC`).

    Returns:
        A uint8 array with the header's dimensions.

    Raises:
        DataError: If the magic number differs or the payload size does not match.
    """
    found, dims, header_size = parse_header(data, source)
    if found != magic:
        raise DataError(f"{source}: IDX magic number is {found}, expected {magic}")
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(data) - header_size
    if payload < expected:
        raise DataError(f"{source}: truncated IDX file ({payload} of {expected} data bytes)")
    if payload > expected:
        raise DataError(f"{source}: {payload - expected} unexpected bytes after the IDX data")
    return np.frombuffer(data, np.uint8, count=expected, offset=header_size).reshape(dims)


def find_idx(folder: str, name: str) -> str | None:
    """The path of ``name`` or ``name.gz`` in ``folder``, or None if neither exists."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def read_idx_file(path: str, magic: int) -> np.ndarray:
    """Reads a plain or gzipped IDX file.

    Args:
        path: The file; a ``.gz`` suffix means gzip.
        magic: The expected magic number.

    Returns:
        A writable uint8 array with the header's dimensions.

    Raises:
        DataError: If the file is missing, truncated or of the wrong kind.
    """
    data = read_bytes(path)
    if path.endswith(".gz"):
        data = gunzip(data, path)
    return parse_idx(data, path, magic).copy()


def count_idx_items(path: str) -> int:
    """The first dimension of an IDX file, read from its header only.

    Args:
        path: The file, plain or ``.gz``.

    Returns:
        The number of items the header announces.

    Raises:
        DataError: If the header cannot be read.
    """
    try:
        # Only the header is needed: stream it instead of inflating the whole file.
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(4 + 4 * 3)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read the IDX header ({one_line(err)})") from None
    return parse_header(head, path)[1][0]
