"""Caser for streams: a CNN over the query's last L items plus a user vector, learned event by event.

    score(j) = W2[j] . [z, P[u]] + b2[j]
    z = act(W1 [vertical convs of E_w, max over time of relu(horizontal convs of E_w)] + b1)

E_w [L, d] holds the input embeddings of the query's last L items (zeros where it has fewer).
The `n_v` vertical filters weigh the L positions (a learned, order-aware sum of the embeddings);
the `n_h` horizontal filters of each height 1..L match runs of consecutive items, and their
maximum over time says whether a run occurred anywhere in the window (Tang & Wang, WSDM 2018).
P[u] is the user's vector, the part that says what the user likes whatever came last. `act` is
linear by default: the paper's relu there dies out when learning online from scratch.

Online: every event's item is the target of the window before it, under a sampled softmax
against `negatives` draws among the items seen so far (uniform; each item a candidate at most
once, so a small catalogue makes a full softmax). A compiled loop (`models.caser_loop`) learns
the batch event by event, each step taken at once (row-wise Adagrad: an item's or user's vector,
a filter, a row of a layer), so any split of a batch learns the same. Then the item joins the
user's window and its session's window (row tables, so the worker stores them like any row).
Events and user lookups read the user's window (it spans the user's sessions); a lookup by
session alone reads the session's window, without a user vector.
New item rows are a hash of (seed, item id, column), so growing the vocabulary never touches others.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from models.base import Batch, Model, Sharing, TableKind
from models.caser_loop import ACC, COUNT, IN, OUT, encode_rows, learn_events, score_rows, scratch
from models.rows import Changes, RowTable, counter_words, hashed_normal, load_counter


class Caser(Model):
    """Convolutional sequence embedding recommender learning incrementally (see the module docstring)."""

    name = "caser"
    query = "session"
    sequential = True
    tables: ClassVar[dict[str, TableKind]] = {
        "item_emb": "item",  # [n_items, d] input embeddings
        "item_out": "item",  # [n_items, 2d] output vectors
        "item_bias": "item",  # [n_items, 1]
        "item_acc": "item",  # [n_items, 3] step accumulators of item_emb, item_out, item_bias
        "item_count": "item",  # [n_items, 1] weighted events (0: never drawn as a negative)
        "user_emb": "user",  # [n_users, d]
        "user_acc": "user",  # [n_users, 1] its step accumulator
        "user_window": "user",  # [n_users, L] the user's last items + 1, newest last, 0 = none
        "session_window": "session",  # [n_sessions, L] the session's last items, alike
        "weights": "blob",  # [1, n_weights] the layers' weights
        "weight_acc": "blob",  # [1, n_v + L n_h + d] their step accumulators, one per filter and row of W1
        "meta": "blob",  # [1, 4] the draw counter as four 16-bit words
    }
    shared: ClassVar[dict[str, Sharing]] = dict.fromkeys(("item_emb", "item_out", "item_bias", "item_acc", "item_count"), "sum")

    def __init__(self, window: int = 5, dim: int = 50, vertical: int = 4, horizontal: int = 16, negatives: int = 256,
                 lr: float = 0.1, emb_lr: float = 0.05, eps: float = 1e-6, init_std: float = 0.03, leak: float = 1.0,
                 seed: int = 0):
        """`window`: L, the items the convolutions see; `dim`: d; `vertical`, `horizontal`: n_v filters, and
        n_h filters per height; `negatives`: items drawn per event; `lr`: Adagrad step of the layers, output
        vectors and biases; `emb_lr`: of item input embeddings and user vectors; `init_std`: new item rows;
        `leak`: slope of the fully connected layer below 0 (1: linear; 0: the paper's relu, whose units die
        when learning online from scratch)."""
        super().__init__()
        if window < 1 or dim < 1 or vertical < 0 or horizontal < 0 or negatives < 0:
            raise ValueError(f"window and dim must be >= 1, vertical, horizontal and negatives >= 0 "
                             f"(got {window}, {dim}, {vertical}, {horizontal}, {negatives})")
        self.window, self.dim, self.vertical, self.horizontal = window, dim, vertical, horizontal
        self.leak = leak
        self.negatives, self.lr, self.emb_lr, self.eps, self.init_std, self.seed = negatives, lr, emb_lr, eps, init_std, seed
        L, d = window, dim
        self._n_o = vertical * d + L * horizontal
        self._shapes = ((vertical, L), (vertical,), (L, horizontal, L, d), (L, horizontal), (d, self._n_o), (d,))
        self._w = np.zeros(sum(int(np.prod(s)) for s in self._shapes), np.float32)
        self._dense = self._views(self._w)
        self._w_acc = np.zeros(vertical + L * horizontal + d, np.float32)  # a step accumulator per layer row
        self._dense_acc = (self._w_acc[:vertical, None], self._w_acc[vertical : vertical + L * horizontal, None],
                           self._w_acc[vertical + L * horizontal :, None])
        self._init_weights()
        self._items_changed, self._users_changed, self._sessions_changed = Changes(), Changes(), Changes()

        def table(name: str, width: int, changes: Changes, bit: np.uint8 = np.uint8(1)) -> RowTable:
            return self._table(name, RowTable(width, np.float32), changes, int(bit))

        self._emb = table("item_emb", d, self._items_changed, IN)
        self._out = table("item_out", 2 * d, self._items_changed, OUT)
        self._bias = table("item_bias", 1, self._items_changed, OUT)
        self._acc = table("item_acc", 3, self._items_changed, ACC)
        self._count = table("item_count", 1, self._items_changed, COUNT)
        self._user = table("user_emb", d, self._users_changed)
        self._user_acc = table("user_acc", 1, self._users_changed)
        self._user_win = table("user_window", L, self._users_changed)
        self._sess_win = table("session_window", L, self._sessions_changed)
        self._rng = np.zeros(1, np.uint64)
        self._blob("weights", lambda: self._w[None, :], self._load_weights)
        self._blob("weight_acc", lambda: self._w_acc[None, :], self._load_weight_acc)
        self._blob("meta", self._export_meta, self._load_meta)
        self._scratch = scratch(L, d, self._n_o, horizontal)

    # -- parameters ----------------------------------------------------------------------------------
    def _views(self, flat: np.ndarray) -> tuple[np.ndarray, ...]:
        """(Wv, bv, Wh, bh, W1, b1) as views of a flat array."""
        out, start = [], 0
        for shape in self._shapes:
            n = int(np.prod(shape))
            out.append(flat[start : start + n].reshape(shape))
            start += n
        return tuple(out)

    def _init_weights(self) -> None:
        """Uniform in +-1/sqrt(fan in), as torch starts these layers; biases at 0."""
        rng = np.random.default_rng(self.seed)
        Wv, _, Wh, _, W1, _ = self._dense
        L, d = self.window, self.dim
        Wv[:] = rng.uniform(-1, 1, Wv.shape) / np.sqrt(L)
        for h in range(1, L + 1):
            Wh[h - 1, :, :h] = rng.uniform(-1, 1, (self.horizontal, h, d)) / np.sqrt(h * d)
        W1[:] = rng.uniform(-1, 1, W1.shape) / np.sqrt(max(self._n_o, 1))

    def _ensure(self, n_items: int, n_users: int, n_sessions: int) -> None:
        old = self._emb.n
        if n_items > old:
            for t in (self._emb, self._out, self._bias, self._acc, self._count, self._items_changed.flags):
                t.ensure(n_items)
            self._init_items(np.arange(old, n_items))
        if n_users > self._user.n:
            for t in (self._user, self._user_acc, self._user_win, self._users_changed.flags):
                t.ensure(n_users)
        if n_sessions > self._sess_win.n:
            self._sess_win.ensure(n_sessions)
            self._sessions_changed.flags.ensure(n_sessions)

    def _init_items(self, rows: np.ndarray) -> None:
        """Rows as a new item's: hashed vectors, nothing else."""
        for t, table in ((self._emb, 1), (self._out, 2)):
            t.data[rows] = hashed_normal(self.seed, table, rows, t.width) * self.init_std
        for t in (self._bias, self._acc, self._count):
            t.data[rows] = 0.0

    # -- Model ---------------------------------------------------------------------------------------
    def learn(self, batch: Batch) -> None:
        if (with_items := batch.with_items()) is None:
            return
        batch = with_items
        self._ensure(batch.n_items, max(batch.n_users, int(batch.users.max()) + 1),
                     max(batch.n_sessions, int(batch.sessions.max()) + 1))
        tables = (self._emb.data, self._out.data, self._bias.data, self._acc.data, self._count.data, self._user.data,
                  self._user_acc.data, self._user_win.data, self._sess_win.data)
        dirty = tuple(c.flags.data[:, 0] for c in (self._items_changed, self._users_changed, self._sessions_changed))
        learn_events(batch.users, batch.items, batch.sessions, batch.weights, tables, dirty, self._dense, self._dense_acc,
                     self._rng, (self.negatives, self.lr, self.emb_lr, self.eps, self.leak))

    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        q, _ = self.query_vectors(batch, rows)
        out = np.empty((len(q), batch.n_items), np.float32)  # [R, n_items]
        score_rows(q, self._out.data, self._bias.data, out)
        return out

    def item_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return self._out.data, self._bias.data[:, 0]

    def query_vectors(self, batch: Batch, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[z, P[u]] of the events at `rows` [R, 2d], every query known (an empty window and no user
        still ranks, by what the biases learned)."""
        self._ensure(batch.n_items, 0, 0)
        rows = np.asarray(rows, np.int64)
        wins, users = self._windows(batch, rows)
        q = np.empty((len(rows), 2 * self.dim), np.float32)
        encode_rows(wins, users, self._emb.data, self._user.data, self._dense, self.leak, *self._scratch, q)
        return q, np.ones(len(rows), bool)

    def _windows(self, batch: Batch, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's window [R, L] and user row [R] (-1: a session's window, no user vector): the stored
        window with the batch's earlier rows of the same user (or session) appended."""
        L = self.window
        wins = np.zeros((len(rows), L), np.float32)
        users = np.full(len(rows), -1, np.int64)
        if not len(rows):
            return wins, users
        later: dict[tuple[int, int], list[float]] = {}  # (kind, id) -> items + 1 of earlier batch rows
        want = dict(zip(rows.tolist(), range(len(rows))))
        for j in range(int(rows.max()) + 1):
            u, s, i = int(batch.users[j]), int(batch.sessions[j]), int(batch.items[j])
            r = want.get(j)
            if r is not None:
                key = (0, u) if u >= 0 else (1, s)
                table = self._user_win if u >= 0 else self._sess_win
                stored = table.data[key[1]] if 0 <= key[1] < table.n else np.zeros(L, np.float32)
                wins[r] = np.concatenate([stored, np.array(later.get(key, []), np.float32)])[-L:]
                users[r] = u
            if i >= 0:
                later.setdefault((0, u), []).append(i + 1.0)
                later.setdefault((1, s), []).append(i + 1.0)
        return wins, users

    def session_items(self, session: int) -> np.ndarray:
        """The session's last `window` items, oldest first."""
        win = self._sess_win.data[session] if 0 <= session < self._sess_win.n else np.zeros(0)
        return (win[win > 0] - 1).astype(np.int64)

    def similarity_vectors(self) -> np.ndarray:
        """The input item embeddings [n_items, d]."""
        return self._emb.data

    # -- state: the tables and blobs registered in __init__ ------------------------------------------
    def _load_weights(self, weights: np.ndarray) -> None:
        self._w[:] = np.asarray(weights, np.float32).ravel()  # in place: the layer views stay valid

    def _load_weight_acc(self, acc: np.ndarray) -> None:
        self._w_acc[:] = np.asarray(acc, np.float32).ravel()

    def _export_meta(self) -> np.ndarray:  # [1, 4]
        return np.array([counter_words(self._rng)], np.float64)

    def _load_meta(self, meta: np.ndarray) -> None:
        load_counter(self._rng, np.asarray(meta).ravel())

    def import_state(self, state: dict[str, np.ndarray]) -> None:
        """Rows missing from a shorter table, and item vectors a store never wrote (zeros), start as for new ids."""
        super().import_state(state)
        kinds = ((self._emb, self._out, self._bias, self._acc, self._count, self._items_changed.flags),
                 (self._user, self._user_acc, self._user_win, self._users_changed.flags),
                 (self._sess_win, self._sessions_changed.flags))
        for tables in kinds:
            n = max(t.n for t in tables)
            for t in tables:
                t.ensure(n)
        for t, table in ((self._emb, 1), (self._out, 2)):
            blank = np.flatnonzero(~t.data.any(axis=1))
            t.data[blank] = hashed_normal(self.seed, table, blank, t.width) * self.init_std

    def reserve_items(self, n: int) -> None:
        self._ensure(n, 0, 0)

    def forget(self, kind: TableKind, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        if kind == "item":
            ids = ids[(ids >= 0) & (ids < self._emb.n)]
            if not len(ids):
                return
            self._init_items(ids)
            codes = ids.astype(np.float32) + 1.0
            for win, changes in ((self._user_win, self._users_changed), (self._sess_win, self._sessions_changed)):
                stale = np.isin(win.data, codes)  # an item's row goes to a new item: no window may name it
                win.data[stale] = 0.0
                changes.mark(np.flatnonzero(stale.any(axis=1)))
        elif kind == "user":
            for t in (self._user, self._user_acc, self._user_win):
                t.reset(ids[ids >= 0])
        elif kind == "session":
            self._sess_win.reset(ids[ids >= 0])

