"""A context-aware two-tower model, learned online event by event.

    x = [U[u], mean of C[c] over the event's context values, mean of V_in[r] over the user's last items]
    q = U[u] + mean C[c] + mean V_in[r] + W2 relu(W1 x + b1) + b2      (user tower, [d])
    score(u, ctx, i) = q . V[i] + b[i]                                  (item tower: V[i], b[i])

The user tower sums its three inputs (so it starts as MF with a recent-items term) and adds a small
MLP over them, where user, context (device, location, hour, day: every context value a `Batch`
carries) and recent items interact. The item tower is the item's embedding and bias: events carry no
item-side features. Each user keeps its last `window` items as a row of its own, so it persists.

Each event's item competes with `n_negatives` sampled items under a sampled softmax whose logits are
corrected by log Q, the probability of drawing each candidate: negatives come from the ring of the
last `ring_size` positives (a share `popular_share`, popularity sampling as in-batch negatives give)
or uniformly from the items, never from the user's seen filter (as in MF). Every row that took part
takes one step of row-wise Adagrad (its accumulator decayed by `decay`), and so does each row of the
MLP's weight matrices (one accumulator per row: a step costs a few multiply-adds per weight). A
compiled loop (`models.dnn_loop`) walks each batch in order, so learning does not depend on how the
stream is cut into batches. Users without a row get context-aware popularity, as in MF.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from models.base import Batch, Model, PopularityState, Sharing, TableKind
from models.dnn_loop import learn_events, query
from models.kernels import SEEN_BITS_PER_WORD, splitmix
from models.popularity import Popularity
from models.rows import Changes, RowTable, counter_words, hashed_normal, load_counter, load_ring

_KINDS = ("user", "item", "context")


class DNN(Model):
    """Two-tower model with user, context and recent-item inputs (see the module docstring).

    dim: query and item vectors (and every embedding); hidden: the MLP's hidden units; window: recent
    items kept per user, weighted `recency ** age` in their mean (age 0: the latest). n_negatives:
    sampled negatives per event; popular_share: the share drawn from the ring of the last `ring_size`
    positives; seen_bits: bits of each user's seen filter (0: none). lr: row-wise Adagrad step of the
    embeddings; dense_lr: the MLP's; bias_lr: SGD step of item biases; decay: accumulators are
    multiplied by it before each gradient is added (1: plain Adagrad); eps: added under the root; l2:
    weight decay of the rows. init_scale: item rows start normal with this deviation (users and
    context values at zero). pop_*: the popularity model that answers for users without a row.
    """

    name = "dnn"
    query = "user"
    sequential = True
    blobs_change_on_learn = True
    tables: ClassVar[dict[str, TableKind]] = {
        "user": "user",  # [n_users, dim]
        "user_state": "user",  # [n_users, 2] sightings, Adagrad accumulator
        "user_recent": "user",  # [n_users, window] last items + 1 (float32: exact below 2 ** 24), oldest first, 0 empty
        "user_seen": "user",  # [n_users, ceil(seen_bits / 24)] seen-filter bits, 24 per value
        "item": "item",  # [n_items, dim] item tower
        "item_in": "item",  # [n_items, dim] the item as a recent item of the user tower
        "item_bias": "item",  # [n_items, 1]
        "item_state": "item",  # [n_items, 3] sightings, accumulators of item and item_in
        "context": "context",  # [n_context, dim]
        "context_state": "context",  # [n_context, 2] sightings, accumulator
        "pop_count": "item",
        "pop_ctx_count": "item",
        "pop_meta": "blob",
        "weights": "blob",  # [1, n] the MLP's W1, b1, W2, b2 flattened, then their accumulators
        "recent": "blob",  # [1, ring_size] item ids of the latest positives
        "meta": "blob",  # [1, 6] RNG counter as four 16-bit words, ring cursor, total sightings
    }
    shared: ClassVar[dict[str, Sharing]] = {
        **dict.fromkeys(("item", "item_in", "item_bias", "item_state"), "sum"),
        **dict.fromkeys(("pop_count", "pop_ctx_count"), "decayed"),
    }

    def __init__(
        self,
        dim: int = 64,
        hidden: int = 64,
        window: int = 10,
        recency: float = 0.7,
        n_negatives: int = 16,
        popular_share: float = 0.5,
        ring_size: int = 10_000,
        seen_bits: int = 2048,
        lr: float = 0.2,
        dense_lr: float = 0.02,
        bias_lr: float = 0.01,
        decay: float = 0.999,
        eps: float = 1e-6,
        l2: float = 0.01,
        init_scale: float = 0.1,
        pop_half_life: float = 30 * 86400.0,
        pop_context_weight: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        if window < 1 or dim < 1 or hidden < 1 or ring_size < 1:
            raise ValueError(f"dim, hidden, window and ring_size must be >= 1 (got {dim}, {hidden}, {window}, {ring_size})")
        self.dim = dim
        self.hidden = hidden
        self.window = window
        self.recency = recency
        self.n_negatives = n_negatives
        self.popular_share = popular_share
        self.ring_size = ring_size
        self.seen_bits = seen_bits
        self.init_scale = init_scale
        self.seed = seed
        self._sampling = (n_negatives, seen_bits, popular_share)
        self._steps = tuple(np.float32(v) for v in (lr, dense_lr, bias_lr, l2, decay, eps, recency))
        self._changes = {kind: Changes() for kind in _KINDS}

        def table(name: str, kind: str, width: int) -> RowTable:
            return self._table(name, RowTable(width, np.float32), self._changes[kind], clip=True)

        self._user = table("user", "user", dim)
        self._user_state = table("user_state", "user", 2)
        self._user_recent = table("user_recent", "user", window)
        self._user_seen = table("user_seen", "user", max(1, -(-seen_bits // SEEN_BITS_PER_WORD)))
        self._item = table("item", "item", dim)
        self._item_in = table("item_in", "item", dim)
        self._item_bias = table("item_bias", "item", 1)
        self._item_state = table("item_state", "item", 3)
        self._ctx = table("context", "context", dim)
        self._ctx_state = table("context_state", "context", 2)
        self._pop = Popularity(half_life=pop_half_life, context_weight=pop_context_weight, seed=seed)
        self._include("pop_", self._pop)
        # the MLP: W1 [hidden, 3 dim], b1 [hidden], W2 [dim, hidden], b2 [dim], then the accumulators of
        # W1's rows, b1, W2's rows and b2, all in one flat buffer
        shapes = ((hidden, 3 * dim), (hidden,), (dim, hidden), (dim,), (hidden,), (hidden,), (dim,), (dim,))
        ends = np.cumsum([int(np.prod(shape)) for shape in shapes])
        self._w = np.zeros(int(ends[-1]), np.float32)
        self._w[: ends[0]] = hashed_normal(seed, 0, np.arange(hidden), 3 * dim).ravel() * np.sqrt(2.0 / (3 * dim))
        views = [self._w[end - int(np.prod(shape)) : end].reshape(shape) for shape, end in zip(shapes, ends)]
        self._dense, self._acc = tuple(views[:4]), tuple(views[4:])
        self._recent = np.full(ring_size, -1, np.int64)
        self._cursor = np.zeros(1, np.int64)
        self._rng = np.array([splitmix(np.uint64(seed))], np.uint64)
        self._total = np.zeros(1, np.float64)
        self._blob("weights", lambda: self._w[None, :], self._load_weights)
        self._blob("recent", lambda: self._recent[None, :], lambda stored: load_ring(self._recent, stored))
        self._blob("meta", self._export_meta, self._load_meta)

    def _rows(self, kind: str) -> tuple[RowTable, ...]:
        """The tables of one id kind (always of one length)."""
        if kind == "user":
            return self._user, self._user_state, self._user_recent, self._user_seen
        if kind == "item":
            return self._item, self._item_in, self._item_bias, self._item_state
        return self._ctx, self._ctx_state

    def _init_items(self, rows: np.ndarray) -> None:
        """Item rows as for a new id: a hash of (seed, row, column), so new ids start alike everywhere."""
        if len(rows):
            self._item.data[rows] = hashed_normal(self.seed, 1, rows, self.dim) * self.init_scale
            self._changes["item"].mark(rows)

    def _ensure(self, n_users: int, n_items: int, n_context: int) -> None:
        old = self._item.n
        if n_users <= self._user.n and n_items <= old and n_context <= self._ctx.n:
            return
        for kind, n in zip(_KINDS, (n_users, n_items, n_context)):
            tables = self._rows(kind)
            if n > tables[0].n:
                for t in tables:
                    t.ensure(n)
        self._init_items(np.arange(old, self._item.n))

    def _all_rows(self) -> tuple[np.ndarray, ...]:
        return tuple(t.data for kind in _KINDS for t in self._rows(kind))

    def _run(self, batch: Batch) -> None:
        """Learn the events of `batch` that carry an item (not the pop part)."""
        self._ensure(batch.n_users, batch.n_items, batch.n_context)
        if (with_items := batch.with_items()) is None:
            return
        batch = with_items
        # [n] per kind; flags may lag behind tables loaded by import_state
        dirty = tuple(self._changes[kind].flags.ensure(self._rows(kind)[0].n)[:, 0] for kind in _KINDS)
        learn_events((batch.users, batch.items, batch.weights, batch.context), self._all_rows(), self._dense,
                     self._acc, dirty, (self._recent, self._cursor, self._rng, self._total), self._sampling,
                     self._steps)
        self._learned = True

    def learn(self, batch: Batch) -> None:
        if len(batch):
            self._run(batch)
            self._pop.learn(batch)

    def learn_scored(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        """Learn the batch in segments cut at `rows`, scoring each row alone in between; users without a
        row are scored by popularity, which learns the batch whole (its clock moves once per batch)."""
        out = np.empty((len(rows), batch.n_items), np.float32)  # [R, n_items]
        known = np.zeros(len(rows), bool)
        start = 0
        for r, j in enumerate(rows.tolist()):
            if j > start:
                self._run(batch.take(slice(start, j)))
            out[r : r + 1], known[r : r + 1] = self._vector_scores(batch, rows[r : r + 1])
            start = j
        if start < len(batch):
            self._run(batch.take(slice(start, None)))
        if known.all():
            self._pop.learn(batch)
        else:
            out[~known] = self._pop.learn_scored(batch, rows[~known])
        return out

    def _vector_scores(self, batch: Batch, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(q . V[i] + b[i] [R, n_items], whether each query is known [R])."""
        self._ensure(batch.n_users, batch.n_items, batch.n_context)
        q, known = self.query_vectors(batch, rows)
        n = batch.n_items
        return q @ self._item.data[:n].T + self._item_bias.data[:n, 0], known

    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        out, known = self._vector_scores(batch, rows)  # [R, n_items]
        if not known.all():
            out[~known] = self._pop.score(batch, rows[~known])
        return out

    def popularity(self) -> PopularityState:
        return self._pop.popularity()

    def item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return self._item.data, self._item_bias.data[:, 0]

    def query_vectors(self, batch: Batch, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The user tower's output for the events at `rows` [R, dim], and whether each user has a row [R]
        (else popularity answers)."""
        q = np.empty((len(rows), self.dim), np.float32)  # [R, d]
        known = np.zeros(len(rows), np.bool_)
        query(np.ascontiguousarray(batch.users[rows]), np.ascontiguousarray(batch.context[rows]), self._all_rows(),
              self._dense, self._steps[-1], q, known)
        return q, known

    # -- state: the tables registered in __init__, plus what is special here -------------------------

    def _load_weights(self, weights: np.ndarray) -> None:
        weights = np.asarray(weights, np.float32).ravel()
        if len(weights) == len(self._w):  # another length: another configuration, so start afresh
            self._w[:] = weights

    def _export_meta(self) -> np.ndarray:  # [1, 6]
        return np.array([[*counter_words(self._rng), int(self._cursor[0]), float(self._total[0])]], np.float64)

    def _load_meta(self, meta: np.ndarray) -> None:
        meta = np.asarray(meta, np.float64).ravel()
        load_counter(self._rng, meta)
        self._cursor[0] = int(meta[4])
        self._total[0] = meta[5]

    def import_state(self, state: dict[str, np.ndarray]) -> None:
        """Rows missing from shorter tables of a kind start as for new ids; item rows a store never
        wrote (all zeros) too."""
        super().import_state(state)
        for kind in _KINDS:
            tables = self._rows(kind)
            n = max(t.n for t in tables)
            for t in tables:
                t.ensure(n)
        blank = np.flatnonzero(~self._item.data.any(axis=1))
        self._init_items(blank)
        self._changes["item"].clear()

    def reserve_items(self, n: int) -> None:
        self._ensure(self._user.n, n, self._ctx.n)
        self._pop.reserve_items(n)

    def forget(self, kind: TableKind, ids: np.ndarray) -> None:
        if kind not in _KINDS:
            return
        tables = self._rows(kind)
        ids = np.asarray(ids, np.int64)
        ids = ids[ids < tables[0].n]
        for t in tables:
            t.reset(ids)
        if kind == "item":
            self._init_items(ids)
            self._recent[np.isin(self._recent, ids)] = -1
            windows = self._user_recent.data
            stale = np.isin(windows, ids + 1)
            windows[stale] = 0
            self._changes["user"].mark(np.flatnonzero(stale.any(axis=1)))
        self._pop.forget(kind, ids)
        self._changes[kind].mark(ids)
