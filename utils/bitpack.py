"""Integers stored at their bit width, and sparse arrays stored as a bitmask plus nonzeros.

Pure numpy, used by the packed params file (`codebase.packed`):

* `pack_bits(codes, bits)` stores each integer in [0, 2^bits) in exactly `bits` bits
  (little-endian bit order), so n 4-bit codes take ceil(n / 2) bytes; `unpack_bits` inverts it.
* `pack_sparse(array)` keeps a bitmask of the nonzero entries (one bit per entry) and their
  values in order; `unpack_sparse` rebuilds the dense array exactly.
"""

from __future__ import annotations

import numpy as np


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """`uint8` bytes holding `codes` (non-negative integers below 2^bits), `bits` bits each."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    codes = np.asarray(codes).reshape([-1])
    if codes.size and (codes.min() < 0 or codes.max() >= 2 ** bits):
        raise ValueError(f"codes outside [0, {2 ** bits}) cannot be stored in {bits} bits")
    planes = np.unpackbits(codes.astype("<u2").view(np.uint8).reshape([-1, 2]), axis=1, bitorder="little")
    return np.packbits(planes[:, :bits].reshape([-1]), bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The `count` integers `pack_bits(codes, bits)` stored, as int64."""
    planes = np.unpackbits(np.asarray(data, np.uint8), bitorder="little")[: count * bits].reshape([count, bits])
    weights = (1 << np.arange(bits, dtype=np.int64))
    return planes.astype(np.int64) @ weights


def pack_sparse(array: np.ndarray) -> tuple:
    """`(bitmask bytes, nonzero values)` of `array` (row-major order)."""
    flat = np.asarray(array).reshape([-1])
    nonzero = flat != 0
    return np.packbits(nonzero, bitorder="little"), flat[nonzero]


def unpack_sparse(bitmask: np.ndarray, values: np.ndarray, shape) -> np.ndarray:
    """The dense array `pack_sparse` stored."""
    count = int(np.prod(shape))
    nonzero = np.unpackbits(np.asarray(bitmask, np.uint8), bitorder="little")[:count].astype(bool)
    if int(nonzero.sum()) != len(values):
        raise ValueError(f"sparse entry: the bitmask marks {int(nonzero.sum())} nonzeros but {len(values)} values "
                         "are stored")
    flat = np.zeros(count, np.asarray(values).dtype)
    flat[nonzero] = values
    return flat.reshape(shape)
