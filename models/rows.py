"""Growable row tables: dense arrays with amortised capacity, as models need them."""

from __future__ import annotations

import numpy as np


class RowTable:
    """A 2-D float array whose row count (and optionally width) grows on demand.

    `data` is the live `[n, d]` view (kept, not rebuilt per access: models pass it to
    compiled loops per batch); capacity doubles so growth is amortised.
    """

    def __init__(self, width: int, dtype: type = np.float64, fill: float = 0.0):
        self._buf = np.full((16, width), fill, dtype)
        self.n = 0
        self.fill = fill
        self.data = self._buf[:0]  # [n, d]

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
        """Replace the contents with `values` (`[n, <=d]`; narrower rows are padded)."""
        values = np.asarray(values)
        self.n = 0
        self._buf[:] = self.fill
        self.data = self._buf[:0]
        self.ensure(len(values), values.shape[1] if values.ndim == 2 else 1)
        self._buf[: len(values), : values.shape[1]] = values

    def reset(self, ids: np.ndarray) -> None:
        ids = ids[ids < self.n]
        self._buf[ids] = self.fill


def shares(counts: RowTable, n_rows: int, n_queries: int, weight: float = 1.0) -> np.ndarray:  # [n_queries, n_rows]
    """`weight` times each row's share of the total count (first column), repeated per query."""
    count = counts.ensure(n_rows)[:, 0]
    total = count.sum()
    base = weight * (count / total if total > 0 else count)
    return np.repeat(base[None, :], n_queries, axis=0)
