"""Numba helpers the compiled loops share: counter-based random draws and the hashed per-user filter of
seen items (`mf_loop`, `dnn_loop`, `caser_loop`), and the top-k selection of lookups and the blend, and the
scores a lookup ranks."""

from __future__ import annotations

import numpy as np
from numba import njit

SEEN_BITS_PER_WORD = 24  # a float32 holds integers below 2 ** 24 exactly
# Reassociation lets the dot products and row updates vectorise; NaN/inf semantics stay exact.
FAST = {"reassoc", "contract", "nsz", "arcp", "afn"}


@njit(cache=True)
def splitmix(x):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True)
def uniform(x):
    """A float in [0, 1): draw number x of a counter-based stream."""
    return (splitmix(x) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True)
def below(x, n):
    """An integer in [0, n): draw number x of a counter-based stream (a multiply, no division)."""
    return np.int64(((splitmix(x) >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


@njit(cache=True)
def seen_slot(j, n_bits):
    """Where item j's filter bit is in a user's seen row: (word, bit mask). The bit is a hash of j
    mapped to [0, n_bits) by a multiply (no division)."""
    h = (np.uint64(j) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)  # Fibonacci hashing
    b = int((h * np.uint64(n_bits)) >> np.uint64(32))
    return b // SEEN_BITS_PER_WORD, 1 << (b % SEEN_BITS_PER_WORD)


@njit(cache=True)
def is_seen(seen, u, j, n_bits):
    """Whether item j's bit is set in user u's seen filter (seen: [n_users, words] float32 integers)."""
    word, bit = seen_slot(j, n_bits)
    return int(seen[u, word]) & bit != 0


@njit(cache=True)
def mark_seen(seen, u, j, n_bits):
    """Set item j's bit in user u's seen filter; False when it was set already."""
    word, bit = seen_slot(j, n_bits)
    w = int(seen[u, word])
    if w & bit:
        return False
    seen[u, word] = np.float32(w | bit)
    return True


@njit(cache=True)
def _worse(v, i, w, j):  # pragma: no cover - numba
    """Whether (score v, item i) ranks below (w, j): a lower score, or the same at a higher item."""
    return v < w or (v == w and i > j)


@njit(inline="always")
def _sift_down(value, item, size, x, j):  # pragma: no cover - numba
    """Put (x, j) at the root of the heap of its first `size` entries, moved down while a child is worse."""
    i = 0
    while 2 * i + 1 < size:
        c = 2 * i + 1
        if c + 1 < size and _worse(value[c + 1], item[c + 1], value[c], item[c]):
            c += 1
        if not _worse(value[c], item[c], x, j):
            break
        value[i], item[i] = value[c], item[c]
        i = c
    value[i], item[i] = x, j


@njit(cache=True)
def _heap_top(scores, among, k):  # pragma: no cover - numba
    """`top_items` over the items `among` (ascending): one pass that keeps the best seen so far in a heap
    whose root is the worst of them (most items lose one comparison with the root), then popped worst first."""
    value, item = np.empty(max(k, 0)), np.empty(max(k, 0), np.int64)
    size = 0
    for j in among:
        x = scores[j]
        if not np.isfinite(x):
            continue
        if size < k:  # push: move x up while it is worse than its parent
            i = size
            size += 1
            while i > 0 and _worse(x, j, value[(i - 1) >> 1], item[(i - 1) >> 1]):
                value[i], item[i] = value[(i - 1) >> 1], item[(i - 1) >> 1]
                i = (i - 1) >> 1
            value[i], item[i] = x, j
        elif k > 0 and x > value[0]:  # replace the root
            _sift_down(value, item, k, x, j)
    out = np.empty(size, np.int64)
    for last in range(size - 1, -1, -1):  # pop the worst into the last free place: best first in the end
        out[last] = item[0]
        _sift_down(value, item, last, value[last], item[last])
    return out


@njit(cache=True)
def top_items(scores, k):  # pragma: no cover - numba
    """The items of the k highest finite scores, best first, ties to the lower item. # [n] -> [min(k, finite)]

    Over a long row, a threshold is taken first from a sample of every `stride`-th score, such that
    about 2k scores should reach it; when at least k finite scores do, the k best are all among them
    (the heap then sees a few hundred items, not all n), else every item is looked at."""
    n = len(scores)
    if k <= 0:
        return np.empty(0, np.int64)
    if n >= 16 * k:
        stride = n // (4 * k)
        sample = _heap_top(scores, np.arange(0, n, stride), max(2 * k // stride, 1))
        if len(sample):
            found = _top_above(scores, k, scores[sample[-1]])
            if len(found):
                return found
    return _heap_top(scores, np.arange(n), k)


@njit(cache=True)
def _top_above(scores, k, t):  # pragma: no cover - numba
    """`top_items(scores, k)` from the finite scores >= t alone when at least k are (the k best are all
    among them, ties included), else nothing. # [n] -> [k] or [0]"""
    n = len(scores)
    among = np.empty(n, np.int64)
    found = 0
    for j in range(n):
        if scores[j] >= t and np.isfinite(scores[j]):
            among[found] = j
            found += 1
    if found >= k:
        return _heap_top(scores, among[:found], k)
    return np.empty(0, np.int64)


@njit(cache=True)
def top_items_near(scores, k, t):  # pragma: no cover - numba
    """`top_items(scores, k)`, looking first among the scores >= t (a guess at the k-th best: from the row's
    mean and deviation, say), then as `top_items` does when fewer than k reach it."""
    found = _top_above(scores, k, t) if k > 0 else np.empty(0, np.int64)
    return found if len(found) else top_items(scores, k)


@njit(cache=True)
def fitted_scores(raw, valid, out):  # pragma: no cover - numba
    """out[j] = raw[j] where j < len(raw), valid[j] and raw[j] is finite, else -inf: a model's scores of the
    items fitted to a catalogue of len(out) items (`valid`: the rows that map to an item). # [n] -> [len(out)]"""
    n = min(len(raw), len(out))
    for j in range(n):
        x = raw[j]
        out[j] = x if valid[j] and np.isfinite(x) else -np.inf
    for j in range(n, len(out)):
        out[j] = -np.inf


@njit(cache=True, fastmath=FAST)
def dot_rows(Q, V, b, out):  # pragma: no cover - numba
    """out [R, n] = Q [R, d] . V[:n] + b[:n]. Items outside, queries inside: each item row is read once for
    all R queries (a single query's mat-vec is bound by reading the rows)."""
    for j in range(out.shape[1]):
        for r in range(Q.shape[0]):
            acc = b[j]
            for k in range(Q.shape[1]):
                acc += Q[r, k] * V[j, k]
            out[r, j] = acc
