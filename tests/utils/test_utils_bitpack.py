"""Bit packing and sparse packing round trips, and their sizes."""

import numpy as np
import pytest

from utils.bitpack import pack_bits, pack_sparse, unpack_bits, unpack_sparse


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8, 12, 16])
def test_codes_round_trip_in_exactly_bits_bits_each(bits):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=1001)
    data = pack_bits(codes, bits)
    assert data.dtype == np.uint8 and data.size == -(-1001 * bits // 8)
    np.testing.assert_array_equal(unpack_bits(data, bits, 1001), codes)


def test_codes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        pack_bits(np.array([0, 4]), 2)


def test_sparse_arrays_round_trip_exactly_and_take_one_bit_per_entry_plus_the_nonzeros():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(3, 3, 8, 16)).astype(np.float32)
    dense[rng.random(dense.shape) < 0.8] = 0.0
    bitmask, values = pack_sparse(dense)
    assert bitmask.size == dense.size // 8 and values.size == np.count_nonzero(dense)
    np.testing.assert_array_equal(unpack_sparse(bitmask, values, dense.shape), dense)
    with pytest.raises(ValueError, match="bitmask marks"):
        unpack_sparse(bitmask, values[:-1], dense.shape)
