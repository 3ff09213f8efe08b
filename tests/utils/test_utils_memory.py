"""release_freed_memory hands freed heap back to the OS; resident_mb reads the process's RSS."""

import sys

import pytest

from utils.memory import describe_resident, release_freed_memory, resident_mb

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, trims glibc's heap")


@linux_only
def test_freed_heap_goes_back_to_the_os():
    # 16 KB blocks come from malloc's heap (below its mmap threshold); the last one stays alive, so
    # the freed pages sit below the top of the heap, where free() alone never returns them.
    blocks = [bytearray(16 * 1024) for _ in range(8192)]  # 128 MB, touched (zero-filled)
    keep = blocks[-1]
    del blocks
    before = resident_mb()
    assert release_freed_memory()
    after = resident_mb()
    assert before - after > 64, (before, after)
    assert len(keep) == 16 * 1024


@linux_only
def test_resident_mb_sees_a_large_allocation():
    before = resident_mb()
    block = bytearray(256 * 2 ** 20)
    assert resident_mb() - before > 200
    del block


@linux_only
def test_describe_resident_names_megabytes():
    text = describe_resident()
    assert text.endswith(" MB resident") and float(text.split()[0]) > 0
