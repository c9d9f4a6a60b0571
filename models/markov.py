"""First-order Markov chain over items, decayed over time, with a popularity fallback.

The last item of a session predicts the next one:

    score(j | last) = c(last -> j) / c(last -> *) + pop_weight * pop(j) / pop(*)

Transition counts are kept per source item in at most `max_successors` slots
(an "item" table of successor ids and one of their counts); when a row is full
a new successor replaces the weakest one. Counts decay with `half_life`, kept
as `weight * 2 ** ((ts - t0) / half_life)` like `Popularity`, so decay costs
nothing per event; `t0` moves, and everything is rescaled, when time jumps
(see `models.decay`). Per-session state is the session's last item.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numba import njit

from models.base import Batch, Model, TableKind
from models.decay import DecayClock
from models.rows import Changes, RowTable, shares


@njit(cache=True)
def _add_transitions(succ, count, src, dst, w):  # pragma: no cover - numba
    """Add weight w[e] to src[e] -> dst[e] (dst coded item + 1); a full row replaces its weakest slot."""
    m = succ.shape[1]
    for e in range(len(src)):
        s, d = src[e], dst[e]
        free = -1
        weakest = 0
        done = False
        for k in range(m):
            if succ[s, k] == d:
                count[s, k] += w[e]
                done = True
                break
            if succ[s, k] <= 0:
                if free < 0:
                    free = k
            elif count[s, k] < count[s, weakest] or succ[s, weakest] <= 0:
                weakest = k
        if not done:
            k = free if free >= 0 else weakest
            succ[s, k] = d
            count[s, k] = w[e]


class Markov(Model):
    """Decayed item -> next-item transition counts, popularity for the rest."""

    name = "markov"
    query = "session"
    sequential = True
    alike_without_session = True
    tables: ClassVar[dict[str, TableKind]] = {
        "succ": "item",  # [n_items, max_successors] successor item id + 1, 0 = empty slot
        "succ_count": "item",  # [n_items, max_successors] their decayed counts
        "count": "item",  # [n_items, 1] decayed popularity
        "last": "session",  # [n_sessions, 1] last item of the session + 1, 0 = none
        "meta": "blob",  # [[t0]]
    }

    def __init__(self, half_life: float = 365 * 86400.0, max_successors: int = 200, pop_weight: float = 0.01, seed: int = 0):
        super().__init__()
        self.half_life = half_life
        self.max_successors = max_successors
        self.pop_weight = pop_weight
        self.seed = seed
        # ids are stored + 1 so that an all-zero row (what a store fills in for rows it
        # never saw) means "empty"
        self._items_changed, self._sessions_changed = Changes(), Changes()
        self._succ = self._table("succ", RowTable(max_successors, np.float32, 0.0), self._items_changed)
        self._succ_count = self._table("succ_count", RowTable(max_successors, np.float32, 0.0), self._items_changed)
        self._count = self._table("count", RowTable(1, np.float32, 0.0), self._items_changed)
        self._last = self._table("last", RowTable(1, np.float32, 0.0), self._sessions_changed)
        self._clock = DecayClock(half_life)
        self._blob("meta", self._clock.export, self._clock.load)

    # -- helpers -------------------------------------------------------------------------
    def _growth(self, ts: np.ndarray) -> np.ndarray:
        weights, rescale = self._clock.weights(ts)
        if rescale is not None:
            self._count.data[:] *= rescale
            self._succ_count.data[:] *= rescale
            self._items_changed.all = True
        return weights

    def session_items(self, session: int) -> np.ndarray:
        """The session's last item (all this model keeps of it)."""
        last = int(self._last.data[session, 0]) - 1 if 0 <= session < self._last.n else -1
        return np.array([last] if last >= 0 else [], np.int64)

    def _prev_items(self, batch: Batch) -> np.ndarray:
        """For each event, the session's item before it (earlier batch rows first, then state)."""
        n_sessions = self._last.n
        last = self._last.data[:, 0]
        prev = np.full(len(batch), -1, np.int64)
        running: dict[int, int] = {}
        for j, (s, i) in enumerate(zip(batch.sessions.tolist(), batch.items.tolist())):
            p = running.get(s)
            if p is None:
                p = int(last[s]) - 1 if 0 <= s < n_sessions else -1
            prev[j] = p
            if i >= 0:
                running[s] = i
        return prev

    # -- Model ---------------------------------------------------------------------------
    def learn(self, batch: Batch) -> None:
        if (with_items := batch.with_items()) is None:
            return
        batch = with_items
        self._succ.ensure(batch.n_items)
        self._succ_count.ensure(batch.n_items)
        count = self._count.ensure(batch.n_items)
        self._last.ensure(max(batch.n_sessions, int(batch.sessions.max()) + 1))
        prev = self._prev_items(batch)
        w = batch.weights * self._growth(batch.ts)
        np.add.at(count[:, 0], batch.items, w)
        has = prev >= 0
        if has.any():
            succ = self._succ.data
            _add_transitions(succ, self._succ_count.data, prev[has], batch.items[has].astype(np.float64) + 1.0, w[has])
            self._items_changed.mark(prev[has])
        self._items_changed.mark(batch.items)
        # the last row of each session in the batch wins
        sessions, first_from_end = np.unique(batch.sessions[::-1], return_index=True)
        self._last.data[sessions, 0] = batch.items[len(batch) - 1 - first_from_end] + 1
        self._sessions_changed.mark(batch.sessions)

    def learn_scored(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        self._growth(batch.ts)  # the clock moves once per batch, as in `learn`, not once per segment
        with self._clock.held():
            return super().learn_scored(batch, rows)

    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        n = batch.n_items
        out = shares(self._count, n, len(rows), self.pop_weight)  # [R, n_items]
        prev = self._prev_items(batch)[rows]
        succ = self._succ.ensure(n)
        succ_count = self._succ_count.ensure(n)
        for r, p in enumerate(prev.tolist()):
            if p < 0:
                continue
            ids = succ[p] - 1
            ok = (ids >= 0) & (ids < n)
            c = succ_count[p][ok]
            tot = c.sum()
            if tot > 0:
                out[r, ids[ok].astype(np.int64)] += c / tot
        return out

    def forget(self, kind: TableKind, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        if kind == "item":
            self._succ.reset(ids)
            self._succ_count.reset(ids)
            self._count.reset(ids)
            # transitions *into* a forgotten item would point at whoever gets its row next
            succ = self._succ.data
            stale = np.isin(succ, ids.astype(np.float64) + 1.0)
            succ[stale] = 0.0
            self._succ_count.data[stale] = 0.0
            self._items_changed.all = True
        elif kind == "session":
            self._last.reset(ids)
