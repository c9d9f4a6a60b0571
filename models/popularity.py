"""Time-decayed popularity, global and per context value: the baseline and cold-start fallback."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numba import njit

from models.base import Batch, Model, PopularityState, Sharing, TableKind
from models.decay import DecayClock, growth
from models.rows import Changes, RowTable, shares


@njit(cache=True)
def _count(count, ctx, changed, items, weights, ts, t0, half_life, context):
    """count[i] += w and ctx[i, c] += w for each event's item i and context values c (-1 pads), where w is
    its weight times its growth; marks i changed. ctx must be wider than every context value."""
    for e in range(len(items)):
        i, w = items[e], weights[e] * growth(ts[e], t0, half_life)
        count[i, 0] += w
        changed[i, 0] = 1
        for t in range(context.shape[1]):
            c = context[e, t]
            if c >= 0:
                ctx[i, c] += w


class Popularity(Model):
    """Decayed event counts; a query's context values add their own counts.

    Counts are kept as `weight * 2 ** ((ts - t0) / half_life)`, so decay costs
    nothing per event (every count shrinks alike); `t0` moves, and all counts
    are rescaled, when time jumps (see `models.decay`).

    score(i) = share of i in the global count
             + context_weight * mean over the query's context values of i's share there.

    Only the events' own context counts unless `time_context` is set: hour of
    day and day of week are weak, noisy signals for popularity.
    """

    name = "pop"
    sequential = True
    tables: ClassVar[dict[str, TableKind]] = {"count": "item", "ctx_count": "item", "meta": "blob"}
    shared: ClassVar[dict[str, Sharing]] = {"count": "decayed", "ctx_count": "decayed"}

    def __init__(
        self, half_life: float = 30 * 86400.0, context_weight: float = 1.0, time_context: bool = False, seed: int = 0
    ):
        super().__init__()
        self.half_life = half_life
        self.context_weight = context_weight
        self.time_context = time_context
        self.seed = seed
        self._changes = Changes()  # items
        self._count = self._table("count", RowTable(1), self._changes)  # [n_items, 1]
        # [n_items, context values up to the highest counted]
        self._ctx = self._table("ctx_count", RowTable(1), self._changes)
        self._clock = DecayClock(half_life)
        self._blob("meta", self._clock.export, self._clock.load)

    def _advance(self, ts: np.ndarray) -> None:
        """Make the clock ready for events at `ts`, rescaling the counts when it moves."""
        rescale = self._clock.advance(ts)
        if rescale is not None:
            self._count.data[:] *= rescale
            self._ctx.data[:] *= rescale
            self._changes.all = True

    def learn(self, batch: Batch) -> None:
        if len(batch) == 0:
            return
        self._advance(batch.ts)
        n = batch.n_items
        context = self._context(batch)  # [B, C']
        # The context table is only as wide as the context values counted so far: those of events, not of time.
        width = int(context.max()) + 1 if context.size else 0
        _count(self._count.ensure(n), self._ctx.ensure(n, width), self._changes.flags.ensure(n), batch.items,
               batch.weights, batch.ts, self._clock.t0, self.half_life, context)

    def learn_scored(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        self._advance(batch.ts)  # the clock moves once per batch, as in `learn`, not once per segment
        with self._clock.held():
            return super().learn_scored(batch, rows)

    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        n = batch.n_items
        out = shares(self._count, n, len(rows))  # [R, n_items]
        if self.context_weight and self._ctx.n:
            ctx = self._ctx.ensure(n)  # [n_items, n_context]
            col_total = ctx.sum(axis=0)  # [n_context]
            context = self._context(batch)[rows]  # [R, C]
            valid = (context >= 0) & (context < ctx.shape[1])
            cols = np.where(valid, context, 0)
            valid &= col_total[cols] > 0
            # mean over each query's context values of i's share there, as one product over the values used
            used, where = np.unique(cols[valid], return_inverse=True)  # [U], [n valid]
            mix = np.zeros((len(rows), len(used)))  # [R, U]
            r = np.nonzero(valid)[0]
            np.add.at(mix, (r, where), 1.0 / valid.sum(axis=1)[r])
            out += self.context_weight * (mix @ (ctx[:, used] / col_total[used]).T)
        return out

    def reserve_items(self, n: int) -> None:
        self._count.ensure(n)
        self._ctx.ensure(n)
        self._changes.flags.ensure(n)

    def decay_scale(self, table: str) -> float | None:
        return self._clock.scale

    def absorb(self, table: str, rows: np.ndarray, delta: np.ndarray, scale: float | None = None) -> None:
        if scale is not None:
            delta = delta * self._clock.rebase(scale)
        super().absorb(table, rows, delta)

    def popularity(self) -> PopularityState:
        return PopularityState(self._count.data, self._ctx.data, self.context_weight, self._context)

    def _context(self, batch: Batch) -> np.ndarray:  # [B, C']
        return batch.context if self.time_context else batch.event_context

    def forget(self, kind: TableKind, ids: np.ndarray) -> None:
        if kind == "item":
            self._count.reset(ids)
            self._ctx.reset(ids)
        elif kind == "context":
            data = self._ctx.data
            data[:, ids[ids < data.shape[1]]] = 0.0
            self._changes.all = True
