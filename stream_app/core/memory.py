"""Handing freed heap back to the operating system after a large transient allocation."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_free_heap() -> bool:
    """Return the free pages of the C heap to the system; False where that cannot be asked for.

    After freeing a large block glibc raises its mmap threshold, so the temporary arrays of the next
    full read come from the heap and stay resident once freed: a lookup server that read its shards
    whole kept that peak as resident memory (README, Benchmarks: API memory)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
