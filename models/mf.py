"""Online matrix factorisation for implicit feedback, with context, learned event by event.

score(u, ctx, i) = (U[u] + mean of C[c] over the event's context values c) . V[i] + b[i]

Each positive event is contrasted with sampled negatives under a BPR loss scaled by the event-type
weight. Negatives are drawn over the items so far (uniformly, or from a ring of recent positives),
only among items the user has not interacted with yet, since rankings only ever order unseen items:
a per-user seen filter (`seen_bits`) hashes item ids into a bitset. A negative is the highest-scoring
of up to `negative_pool` candidates, as harder negatives carry more gradient; a candidate already
hard enough ends its pool, so hard negatives mix with the uniform ones the full ranking needs too.
Each negative steps as it is scored; the event's own rows (user, context values, positive item) then
take one step on the gradient summed over the negatives.

Vectors step with a per-row adaptive rate (RMSprop), item biases with plain SGD. A compiled loop
(`models.mf_loop`) walks the batch in order, so each event is learned after the previous one. An
id's row only trains once the id has been seen `admit` times; users without a trained row get
context-aware popularity. BPR ranks items for a user, so a user bias would cancel: there is none.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numba import njit

from models.base import Batch, Model, PopularityState, Sharing, TableKind
from models.kernels import SEEN_BITS_PER_WORD, splitmix
from models.mf_loop import ALL, BIAS, SEEN, STATE, VECTOR, learn_events, query, rewind
from models.popularity import Popularity
from models.rows import Changes, RowTable, counter_words, load_counter, load_ring

_KINDS = ("user", "item", "context")


@njit(cache=True)
def init_items(V, rows, col, seed, scale):
    """V[rows, col:] uniform in [-scale, scale], a hash of (seed, row, column): new ids start alike everywhere."""
    for r in rows:
        for k in range(col, V.shape[1]):
            h = splitmix(np.uint64(seed) * np.uint64(0x100000001B3) + np.uint64(r) * np.uint64(4096) + np.uint64(k))
            V[r, k] = scale * (2.0 * ((h >> np.uint64(11)) * (1.0 / 9007199254740992.0)) - 1.0)


class MF(Model):
    """Implicit-feedback matrix factorisation with context embeddings (see the module docstring).

    dim: factors. n_negatives: negatives per event, each the highest-scoring
    of up to `negative_pool` candidates; a candidate whose BPR gradient
    (sigmoid(s_j - s_i)) is at least `pool_skip` ends its pool early (0: never,
    1: always, i.e. no pool); popular_share: the share of candidates drawn
    from the last `recent_size` positives (the rest uniform).
    seen_bits: bits of each user's seen filter (0: none, so a user's own
    items may be drawn); a freed item row handed to a new item may look seen
    to users of the old one, and is then not drawn for them.
    lr, negative_lr, decay, eps: the per-row adaptive step, lr (the event's
    rows) or negative_lr (negative items) / sqrt(eps + running mean of squared
    gradients, kept with `decay`); l2: weight decay of the vectors, per
    negative; bias_lr: SGD step of item biases. init_scale: item vectors start uniform in
    [-init_scale, init_scale] (users and context values start at zero).
    admit: sightings before an id's row trains. pop_*: the popularity model
    that answers for users without a trained row.
    """

    name = "mf"
    query = "user"
    sequential = True
    blobs_change_on_learn = True
    tables: ClassVar[dict[str, TableKind]] = {
        "user": "user",  # [n_users, dim]
        "user_state": "user",  # [n_users, 2] sightings, accumulator
        "user_seen": "user",  # [n_users, ceil(seen_bits / 24)] seen-filter bits, 24 per value
        "item": "item",  # [n_items, dim]
        "item_bias": "item",  # [n_items, 1]
        "item_state": "item",  # [n_items, 2] sightings, accumulator
        "context": "context",  # [n_context, dim]
        "context_state": "context",  # [n_context, 2] sightings, accumulator
        "pop_count": "item",
        "pop_ctx_count": "item",
        "pop_meta": "blob",
        "recent": "blob",  # [1, recent_size] item ids of the latest positives, -1 empty
        "meta": "blob",  # [1, 5] RNG counter as four 16-bit words, ring cursor
    }
    shared: ClassVar[dict[str, Sharing]] = {
        **dict.fromkeys(("item", "item_bias", "item_state"), "sum"),
        **dict.fromkeys(("pop_count", "pop_ctx_count"), "decayed"),
    }

    def __init__(
        self,
        dim: int = 64,
        n_negatives: int = 8,
        negative_pool: int = 2,
        pool_skip: float = 0.3,
        seen_bits: int = 2048,
        popular_share: float = 0.0,
        lr: float = 0.02,
        negative_lr: float = 0.006,
        decay: float = 0.99,
        eps: float = 1e-4,
        l2: float = 0.06,
        bias_lr: float = 0.05,
        init_scale: float = 0.1,
        admit: int = 1,
        recent_size: int = 10_000,
        pop_half_life: float = 30 * 86400.0,
        pop_context_weight: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        self.dim = dim
        self.n_negatives = n_negatives
        self.negative_pool = negative_pool
        self.pool_skip = pool_skip
        # a candidate this hard (s_i - s_j at most this, i.e. BPR gradient >= pool_skip) ends its pool
        self._hard = float(np.log(1.0 / pool_skip - 1.0)) if 0.0 < pool_skip < 1.0 else (np.inf if pool_skip >= 1.0 else -np.inf)
        self.seen_bits = seen_bits
        self.popular_share = popular_share
        self.lr = lr
        self.negative_lr = negative_lr
        self.decay = decay
        self.eps = eps
        self.l2 = l2
        self.bias_lr = bias_lr
        self.init_scale = init_scale
        self.admit = admit
        self.recent_size = recent_size
        self.seed = seed
        self._sampling = (n_negatives, negative_pool, self._hard, seen_bits, popular_share, admit)
        # float32, as the rows are: float64 constants would turn the loop's arithmetic into conversions
        self._steps = tuple(np.float32(v) for v in (lr, negative_lr, l2, bias_lr, decay, eps))
        self._changes = {kind: Changes() for kind in _KINDS}  # a bit per table

        def table(name: str, kind: str, width: int, bit: np.uint8) -> RowTable:
            return self._table(name, RowTable(width, np.float32), self._changes[kind], int(bit), clip=True)

        self._user = table("user", "user", dim, VECTOR)
        self._user_state = table("user_state", "user", 2, STATE)
        self._user_seen = table("user_seen", "user", max(1, -(-seen_bits // SEEN_BITS_PER_WORD)), SEEN)
        self._item = table("item", "item", dim, VECTOR)
        self._item_bias = table("item_bias", "item", 1, BIAS)
        self._item_state = table("item_state", "item", 2, STATE)
        self._ctx = table("context", "context", dim, VECTOR)
        self._ctx_state = table("context_state", "context", 2, STATE)
        self._pop = Popularity(half_life=pop_half_life, context_weight=pop_context_weight, seed=seed)
        self._include("pop_", self._pop)
        self._recent = np.full(recent_size, -1, np.int64)
        self._cursor = np.zeros(1, np.int64)
        self._rng = np.array([splitmix(np.uint64(seed))], np.uint64)
        self._blob("recent", lambda: self._recent[None, :], lambda stored: load_ring(self._recent, stored))
        self._blob("meta", self._export_meta, self._load_meta)
        # `learn`'s probe and log: nothing scored (the same types as `learn_scored`'s, so one compiled loop
        # serves both)
        self._no_probe = (np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0, np.bool_))
        self._no_log = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dim + 1), np.float32),
                        np.zeros(1, np.int64))

    def _rows(self, kind: str) -> tuple[RowTable, ...]:
        """The tables of one id kind (always of one length), then its change flags."""
        if kind == "user":
            return self._user, self._user_state, self._user_seen, self._changes[kind].flags
        if kind == "item":
            return self._item, self._item_bias, self._item_state, self._changes[kind].flags
        return self._ctx, self._ctx_state, self._changes[kind].flags

    def _ensure(self, n_users: int, n_items: int, n_context: int) -> None:
        old = self._item.n
        if n_users <= self._user.n and n_items <= old and n_context <= self._ctx.n:
            return  # the common case; a kind's tables always have the same length
        for kind, n in zip(_KINDS, (n_users, n_items, n_context)):
            tables = self._rows(kind)
            if n > tables[0].n:
                for table in tables:
                    table.ensure(n)
        if n_items > old:
            new = np.arange(old, n_items)
            init_items(self._item.data, new, 0, self.seed, self.init_scale)
            self._changes["item"].mark(new, VECTOR)

    def learn(self, batch: Batch) -> None:
        if len(batch) == 0:
            return
        self._run(batch, self._no_probe, self._no_log)
        self._pop.learn(batch)

    def learn_scored(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        """`learn`, scoring the events at `rows` inside the compiled loop, each just before it is learned."""
        if len(rows) == 0:
            self.learn(batch)
            return np.zeros((0, batch.n_items), np.float32)
        score_at = np.full(len(batch), -1, np.int64)
        score_at[rows] = np.arange(len(rows))
        q = np.empty((len(rows), self.dim), np.float32)  # [R, d]
        trained = np.zeros(len(rows), np.bool_)
        size = len(batch) * (self.n_negatives + 1)  # item rows changed at most
        log = (np.empty(size, np.int64), np.empty(size, np.int64), np.empty((size, self.dim + 1), np.float32),
               np.zeros(1, np.int64))
        self._run(batch, (score_at, q, trained), log)
        n = batch.n_items
        out = q @ self._item.data[:n].T + self._item_bias.data[:n, 0]  # [R, n_items], with the items as they end
        rewind(out, q, *log[:3], int(log[3][0]))
        if trained.all():
            self._pop.learn(batch)
        else:
            out[~trained] = self._pop.learn_scored(batch, rows[~trained])
        return out

    def _run(self, batch: Batch, probe: tuple, log: tuple) -> None:
        self._ensure(batch.n_users, batch.n_items, batch.n_context)
        rows = (self._user.data, self._user_state.data, self._user_seen.data, self._item.data, self._item_bias.data,
                self._item_state.data, self._ctx.data, self._ctx_state.data)
        changes = self._changes
        dirty = (changes["user"].flags.data[:, 0], changes["item"].flags.data[:, 0], changes["context"].flags.data[:, 0])
        learn_events((batch.users, batch.items, batch.weights, batch.context), rows, dirty,
                     (self._recent, self._cursor, self._rng), probe, log, self._sampling, self._steps)
        self._learned = True

    def popularity(self) -> PopularityState:
        return self._pop.popularity()

    def item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return self._item.data, self._item_bias.data[:, 0]

    def query_vectors(self, batch: Batch, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """User + context vectors of the events at `rows` [R, d], as `score` uses them, and whether each
        user has a trained row [R] (else `score` answers with popularity)."""
        users = batch.users[rows]  # [R]
        q = np.empty((len(rows), self.dim), np.float32)  # [R, d]
        query(users, batch.context[rows], self._user.data, self._user_state.data,
               self._ctx.data, self._ctx_state.data, self.admit, q)
        trained = (users >= 0) & (users < self._user.n)
        trained[trained] = self._user_state.data[users[trained], 0] >= self.admit
        return q, trained

    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        self._ensure(batch.n_users, batch.n_items, batch.n_context)
        q, trained = self.query_vectors(batch, rows)
        out = q @ self._item.data[: batch.n_items].T + self._item_bias.data[: batch.n_items, 0]  # [R, n_items]
        if not trained.all():
            out[~trained] = self._pop.score(batch, rows[~trained])
        return out

    # -- state: the tables registered in __init__, plus what is special here -------------------------

    def _export_meta(self) -> np.ndarray:  # [1, 5]
        return np.array([[*counter_words(self._rng), int(self._cursor[0])]], np.float64)

    def _load_meta(self, meta: np.ndarray) -> None:
        meta = np.asarray(meta).ravel()
        load_counter(self._rng, meta)
        self._cursor[0] = int(meta[4])

    def import_state(self, state: dict[str, np.ndarray]) -> None:
        """Columns missing from narrower item vectors, and rows missing from shorter tables of a kind,
        start as for new ids."""
        super().import_state(state)
        loaded = self._item.n
        init_items(self._item.data, np.arange(loaded), np.asarray(state["item"]).shape[1], self.seed, self.init_scale)
        for kind in _KINDS:
            tables = self._rows(kind)
            n = max(table.n for table in tables[:-1])
            for table in tables:
                table.ensure(n)
        init_items(self._item.data, np.arange(loaded, self._item.n), 0, self.seed, self.init_scale)

    def reserve_items(self, n: int) -> None:
        self._ensure(self._user.n, n, self._ctx.n)
        self._pop.reserve_items(n)

    def forget(self, kind: TableKind, ids: np.ndarray) -> None:
        if kind not in _KINDS:
            return
        tables = self._rows(kind)
        ids = np.asarray(ids, np.int64)
        ids = ids[ids < tables[0].n]
        for table in tables[:-1]:
            table.reset(ids)
        if kind == "item":
            init_items(self._item.data, ids, 0, self.seed, self.init_scale)
            self._recent[np.isin(self._recent, ids)] = -1
            self._pop.forget(kind, ids)
        self._changes[kind].mark(ids, ALL)
