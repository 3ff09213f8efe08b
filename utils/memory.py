"""Resident memory of this process: read it, and hand freed heap back to the operating system.

A pipeline runs its stages in one process. Each stage leaves garbage behind (its traced functions,
its data arrays), and glibc keeps freed heap pages in its arenas instead of returning them, so
without help the process's peak is the last stage's peak *plus* what earlier stages freed.
`release_freed_memory()` between stages collects Python's reference cycles (traced tf.functions
sit in them) and asks glibc to trim its arenas. TensorFlow's own CPU allocator pool is not touched:
it keeps what it reserved, and the next stage reuses it.

`frozen_heap()` around a training run leaves the objects alive when it starts (the imported
modules: TensorFlow's Python side is millions of objects) out of every collection during the run,
Python's automatic ones and the stages' `release_freed_memory()` included.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's `malloc_trim` from the symbols already loaded in this process (no library search
    at import time), or None where there is none (macOS, musl)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


@contextlib.contextmanager
def frozen_heap():
    """Within the block, the objects alive at its start are never scanned by the garbage collector
    (`gc.freeze`); at its end they are collectable again (`gc.unfreeze`). A heap already frozen when
    the block begins is left as it is (whoever froze it owns the unfreezing)."""
    if gc.get_freeze_count() > 0:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release_freed_memory() -> bool:
    """Collect garbage and return freed heap to the OS; True if glibc's `malloc_trim` ran."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def resident_mb() -> float | None:
    """Current resident set size in MB (Linux), or None where /proc is not available."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def describe_resident() -> str:
    """`resident_mb()` for a log line: "1234 MB resident", or "resident memory n/a"."""
    rss = resident_mb()
    return "resident memory n/a" if rss is None else f"{rss:.0f} MB resident"
