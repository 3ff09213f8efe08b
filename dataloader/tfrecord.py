"""Reading TFRecord framing in Python, so that a bad shard is reported by name.

A TFRecord file is a sequence of records, each framed as: uint64 length (little-endian),
uint32 masked CRC of the length, ``length`` data bytes, uint32 masked CRC of the data.
tf.data reports framing problems without naming the file; these helpers do it up front.
The CRCs are not verified (that needs CRC-32C, which Python's stdlib lacks).
"""
from __future__ import annotations

import os
import struct

import tensorflow as tf

from dataloader.files import one_line
from utils.errors import DataError

_HEADER = 12
_FOOTER = 4


def first_record(path: str) -> bytes:
    """The payload of the first record of a TFRecord file.

    Args:
        path: The shard (any path ``tf.io.gfile`` understands).

    Returns:
        The first record's bytes.

    Raises:
        DataError: If the file cannot be read, holds no record, or is cut off.
    """
    try:
        size = tf.io.gfile.stat(path).length
        with tf.io.gfile.GFile(path, "rb") as f:
            head = f.read(_HEADER)
            if not head:
                raise DataError(f"{path}: TFRecord shard holds no records")
            if len(head) < _HEADER:
                raise DataError(f"{path}: truncated TFRecord shard (first record header cut off)")
            (length,) = struct.unpack("<Q", head[:8])
            # Compare with the file size before reading: a corrupt length can be huge.
            if _HEADER + length + _FOOTER > size:
                raise DataError(f"{path}: truncated TFRecord shard (first record cut off)")
            return f.read(length)
    except DataError:
        raise
    except (tf.errors.OpError, OSError) as err:
        raise DataError(f"{path}: cannot read TFRecord shard ({one_line(err)})") from None


def count_records(path: str) -> int:
    """Counts the records of a TFRecord file by following the length headers.

    Args:
        path: The shard.

    Returns:
        The number of records.

    Raises:
        DataError: If the file cannot be read or its last record is cut off.
    """
    try:
        size = tf.io.gfile.stat(path).length
        count, position = 0, 0
        with tf.io.gfile.GFile(path, "rb") as f:
            while position < size:
                f.seek(position)
                head = f.read(_HEADER)
                if len(head) < _HEADER:
                    break
                (length,) = struct.unpack("<Q", head[:8])
                position += _HEADER + length + _FOOTER
                count += 1
    except (tf.errors.OpError, OSError) as err:
        raise DataError(f"{path}: cannot read TFRecord shard ({one_line(err)})") from None
    if position != size:
        raise DataError(f"{path}: truncated TFRecord shard (record {count} cut off)")
    return count


def standard_size(paths, shards: int, records: int):
    """`records` if `paths` are exactly the `shards` files of a standard conversion
    (`...-00000-of-01024` to `...-01023-of-01024`), else None (a subset: count them)."""
    suffixes = sorted(os.path.basename(p).split("-", 1)[-1] for p in paths)
    expected = [f"{i:05d}-of-{shards:05d}" for i in range(shards)]
    return records if suffixes == expected else None
