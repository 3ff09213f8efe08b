"""release_freed_memory hands freed heap back to the OS; resident_mb reads the process's RSS;
frozen_heap keeps the objects alive at its start out of the collections inside it."""

import pathlib
import subprocess
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


# In a fresh interpreter: the test harness freezes its own heap (tests/conftest.py).
FROZEN_HEAP = """
import gc, weakref
from utils.memory import frozen_heap
class Node: pass
def cycle():
    node = Node(); node.self = node  # a reference cycle nothing else points to
    return weakref.ref(node)
old = cycle()
with frozen_heap():
    new = cycle()
    gc.collect()
    assert old() is not None and new() is None, "the old cycle is frozen, the new one collected"
    count = gc.get_freeze_count()
    with frozen_heap():  # nested: a no-op, the outer block owns the unfreezing
        assert gc.get_freeze_count() == count
    assert gc.get_freeze_count() == count > 0
assert gc.get_freeze_count() == 0
gc.collect()
assert old() is None, "collectable again after the block"
try:
    with frozen_heap():
        raise ValueError
except ValueError:
    pass
assert gc.get_freeze_count() == 0, "unfrozen when the block raises"
"""


def test_frozen_heap_spares_what_was_alive_and_frees_it_afterwards():
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", FROZEN_HEAP], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
