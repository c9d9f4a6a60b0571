"""`stream_app.core.memory`: freed C heap goes back to the system when asked."""

from __future__ import annotations

import platform

import psutil
import pytest

from stream_app.core.memory import release_free_heap


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_below_a_live_block_is_returned_when_asked():
    blocks = [bytes(1000) for _ in range(150_000)]  # ~150 MB of the C heap (too large for Python's arenas)
    keep = bytes(1000)  # allocated above them: the heap's top cannot shrink on its own
    del blocks
    before = _rss_mb()
    assert release_free_heap()
    assert _rss_mb() < before - 100, "the freed blocks stayed resident"
    assert len(keep) == 1000
