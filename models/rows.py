"""Growable row tables: dense arrays with amortised capacity, as models need them; change tracking of
their rows; rows initialised from a hash, alike wherever they are made."""

from __future__ import annotations

from typing import Any

import numpy as np


class RowTable:
    """A 2-D float array whose row count (and optionally width) grows on demand.

    `data` is the live `[n, d]` view (kept, not rebuilt per access: models pass it to
    compiled loops per batch); capacity doubles so growth is amortised.
    """

    def __init__(self, width: int, dtype: type = np.float64, fill: float = 0.0):
        self._buf: np.ndarray = np.full((16, width), fill, dtype)
        self.n = 0
        self.fill = fill
        self.data = self._buf[:0]  # [n, d]

    @classmethod
    def of(cls, values: np.ndarray, width: int, dtype: type = np.float64, fill: float = 0.0) -> RowTable:
        """A table of `width` columns holding `values` [n, <=width] (copied; padded with `fill`), sized to
        them: what `load` gives, without a first buffer to fill and drop (a query's few rows, per request)."""
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[1] != width:
            table = cls(width, dtype, fill)
            table.load(values)
            return table
        table = cls.__new__(cls)
        table._buf = np.array(values, dtype)
        table.n, table.fill, table.data = len(values), fill, table._buf
        return table

    def holding(self, values: np.ndarray | None) -> RowTable:
        """A new table like this one (width, dtype, fill) holding `values` [n, <=width] (copied), or no rows
        for None: a query's own rows (`Model.narrowed`), per request. With no rows it starts from a zero-row
        view of this table's buffer, which has nothing to write to: growing replaces it."""
        if values is not None and (values.ndim != 2 or values.shape[1] != self._buf.shape[1]):
            return RowTable.of(values, self.width, self._buf.dtype.type, self.fill)
        table = RowTable.__new__(RowTable)
        table._buf = self._buf[:0] if values is None else values.astype(self._buf.dtype)
        table.n, table.fill, table.data = len(table._buf), self.fill, table._buf
        return table

    @property
    def width(self) -> int:
        return self._buf.shape[1]

    def ensure(self, n_rows: int, width: int | None = None) -> np.ndarray:
        """Grow to at least `n_rows` rows (and `width` columns); returns `data`."""
        rows, cols = self._buf.shape
        width = cols if width is None else max(width, cols)
        if n_rows > rows or width > cols:
            new = np.full((max(n_rows, 2 * rows if n_rows > rows else rows), width), self.fill, self._buf.dtype)
            new[:rows, :cols] = self._buf
            self._buf = new
        elif n_rows <= self.n:
            return self.data
        self.n = max(self.n, n_rows)
        self.data = self._buf[: self.n]
        return self.data

    def load(self, values: np.ndarray) -> None:
        """Replace the contents with `values` (`[n, w]`, 2-D; rows narrower than the table are padded, wider
        ones widen it), in a buffer sized to them: written once, not filled first."""
        values = np.asarray(values)
        n, w = values.shape
        buf = np.empty((max(n, 16), max(w, self.width)), self._buf.dtype)
        buf[:n, :w] = values
        buf[:n, w:] = self.fill
        buf[n:] = self.fill
        self._buf, self.n, self.data = buf, n, buf[:n]

    def reset(self, ids: np.ndarray) -> None:
        ids = ids[ids < self.n]
        self._buf[ids] = self.fill


def shares(counts: RowTable, n_rows: int, n_queries: int, weight: float = 1.0) -> np.ndarray:  # [n_queries, n_rows]
    """`weight` times each row's share of the total count (first column), repeated per query."""
    count = counts.ensure(n_rows)[:, 0]
    total = count.sum()
    base = weight * (count / total if total > 0 else count)
    return np.repeat(base[None, :], n_queries, axis=0)


class Changes:
    """Which rows of one id kind changed since the last drain, for `Model.drain_changes`.

    Each row holds flag bits (a model may give each of its tables a bit, or use bit 1 for all);
    `all` marks every row at once (after a rescale). `flags.data` may be passed to compiled loops.
    """

    def __init__(self) -> None:
        self.flags = RowTable(1, np.uint8)  # [n, 1]
        self.all = False

    def mark(self, ids: np.ndarray | list[int], bits: int | np.integer = 1) -> None:
        ids = np.asarray(ids, np.int64)
        if len(ids):
            self.flags.ensure(int(ids.max()) + 1)
            self.flags.data[ids, 0] |= np.uint8(bits)

    def marked(self, ids: np.ndarray) -> np.ndarray:  # [len(ids)] bool
        """Whether each of `ids` has a change not drained yet."""
        flags = self.flags.data[:, 0]
        inside = ids < len(flags)
        out = np.full(len(ids), self.all)
        out[inside] |= flags[ids[inside]] != 0
        return out

    def rows(self, n: int, bit: int = 1) -> np.ndarray:
        """The changed rows among `0..n-1` whose flags carry `bit`."""
        return np.arange(n) if self.all else np.flatnonzero(self.flags.data[:n, 0] & bit)

    def clear(self) -> None:
        self.flags.data[:] = 0
        self.all = False


def _splitmix(x: Any) -> Any:
    """SplitMix64 finaliser on uint64 arrays or scalars (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hashed_normal(seed: int, table: int, rows: np.ndarray, width: int) -> np.ndarray:
    """Standard normals, one per (row, column), a pure function of (seed, table, row, column)."""
    rows = np.asarray(rows, np.uint64)[:, None]
    cols = np.arange(width, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        base = _splitmix(np.uint64(seed) * np.uint64(1_000_003) + np.uint64(table))
        key = _splitmix(base ^ (rows * np.uint64(0x100000001B3) + cols * np.uint64(2)))
        u1 = (key >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
        key2 = _splitmix(key + np.uint64(1))
        u2 = (key2 >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def counter_words(counter: np.ndarray) -> list[int]:
    """A uint64 draw counter (`counter[0]`) as four 16-bit words, each exact in a float64 blob."""
    x = int(counter[0])
    return [(x >> (16 * k)) & 0xFFFF for k in range(4)]


def load_counter(counter: np.ndarray, words: np.ndarray) -> None:
    """Set `counter[0]` from the four 16-bit words `counter_words` gave."""
    counter[0] = np.uint64(sum(int(words[k]) << (16 * k) for k in range(4)))


def load_ring(ring: np.ndarray, stored: np.ndarray) -> None:
    """Refill a ring of recent item ids [size] from its stored copy (any shape), -1 where none is stored."""
    stored = np.asarray(stored).ravel()[: len(ring)]
    ring[:] = -1
    ring[: len(stored)] = stored
