"""Resident memory of this process: read it, and hand freed heap back to the operating system.

A pipeline runs its stages in one process. Each stage leaves garbage behind (its traced functions,
its data arrays), and glibc keeps freed heap pages in its arenas instead of returning them, so
without help the process's peak is the last stage's peak *plus* what earlier stages freed.
`release_freed_memory()` between stages collects Python's reference cycles (traced tf.functions
sit in them) and asks glibc to trim its arenas. TensorFlow's own CPU allocator pool is not touched:
it keeps what it reserved, and the next stage reuses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def release_freed_memory() -> bool:
    """Collect garbage and return freed heap to the OS; True if glibc's `malloc_trim` ran."""
    gc.collect()
    if _LIBC is None:  # not glibc (macOS, musl): nothing to trim
        return False
    _LIBC.malloc_trim(0)
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
