"""GRU4Rec for streams: a GRU over each session's items, trained event by event.

    score(j) = h . out[j] + m . emb[j] + bias[j]

h is the GRU's state after the session's items (input embeddings `emb`, a separate output table
`out`), m the mean embedding of the session's last `mean_items` items. The GRU learns order (what
follows what); the skip term m . emb[j] learns co-occurrence (what belongs together), which a GRU
picks up slowly in one pass.

Every event is a training example (truncated BPTT): from the session's state before its last `bptt`
items, GRU steps through them give h, which should rank the event's item first among `negatives`
uniform draws, under the BPR-max loss. A compiled loop (`models.gru_loop`) learns the batch event
by event, forward and backward by hand, each step taken at once (Adagrad, elementwise: the GRU
weights and the item rows that took part), then advances the session's state through the item with
the weights as they now stand; so any split of a batch learns the same. New item rows are a hash of
(seed, item id, column), so growing the vocabulary never touches earlier rows.
"""

from __future__ import annotations

import copy
from typing import ClassVar, cast

import numpy as np

from models.base import Batch, Model, Sharing, TableKind
from models.gru_loop import dense_views, learn_events, score_rows
from models.gru_sessions import SessionStates, gru_scan
from models.kernels import splitmix
from models.rows import Changes, counter_words, hashed_normal, load_counter

_ITEM_TABLES = ("item_emb", "item_out", "item_bias", "item_acc", "item_count")


class GRU4Rec(Model):
    """Session-based GRU recommender learning incrementally from a stream."""

    name = "gru"
    query = "session"
    sequential = True
    alike_without_session = True
    tables: ClassVar[dict[str, TableKind]] = {
        "item_emb": "item",  # [n_items, embedding]
        "item_out": "item",  # [n_items, hidden]
        "item_bias": "item",  # [n_items, 1]
        "item_acc": "item",  # [n_items, embedding + hidden + 1] Adagrad accumulators
        "item_count": "item",  # [n_items, 1] weighted event counts
        "session": "session",  # [n_sessions, 1 + L + 2 * hidden]: stamp, last L items + 1, h, h_back (all 0: none)
        "weights": "blob",  # [2, n_weights]: GRU weights (w_ih, w_hh, b_ih, b_hh); Adagrad accumulators
        "meta": "blob",  # [1, 7]: stamp counter, events learned, batches learned, draw counter as four 16-bit words
    }
    shared: ClassVar[dict[str, Sharing]] = dict.fromkeys(_ITEM_TABLES, "sum")

    def __init__(self, hidden: int = 100, embedding: int = 64, negatives: int = 1024, bpreg: float = 1.0, bptt: int = 4,
                 mean_items: int = 20, lr: float = 0.05, emb_lr: float = 0.1, init_std: float = 0.1,
                 max_sessions: int = 100_000, seed: int = 0):
        """`negatives`: uniform draws per event; `bpreg`: BPR-max score regularisation; `mean_items`: how
        many of the session's last items the skip term averages (0: no skip term); `lr`, `emb_lr`: Adagrad
        steps (GRU weights, output vectors and biases; item embeddings); `init_std`: new item rows;
        `max_sessions`: live hidden states kept (LRU)."""
        super().__init__()
        if bptt < 1 or mean_items < 0 or negatives < 1:
            raise ValueError(f"bptt and negatives must be >= 1, mean_items >= 0 (got {bptt}, {negatives}, {mean_items})")
        self.hidden = hidden
        self.embedding = embedding
        self.negatives = negatives
        self.bpreg = bpreg
        self.lr = lr
        self.emb_lr = emb_lr
        self.init_std = init_std
        self.bptt = bptt
        self.mean_items = mean_items
        self._keep = max(bptt, mean_items)  # L: items kept per session
        self.max_sessions = max_sessions
        self.seed = seed
        H, E = hidden, embedding
        size = 3 * H * (E + H + 2)
        bound = 1.0 / np.sqrt(H)
        self._w = np.random.default_rng(seed).uniform(-bound, bound, size).astype(np.float32)
        self._dense = dense_views(self._w, H, E)  # (w_ih, w_hh, b_ih, b_hh)
        self._dense[3][H : 2 * H] = 0.0  # the update gate starts unbiased
        self._w_acc = np.zeros(size, np.float32)
        self._rng = np.array([splitmix(np.uint64(seed))], np.uint64)
        self._clear_items()
        self._items_changed = Changes()
        self._sessions = SessionStates(H, self._keep, max_sessions)
        self._table("session", self._sessions.rows, self._sessions.changes)
        self._events = 0
        self._batches = 0
        self._blob("weights", lambda: np.stack([self._w, self._w_acc]), self._load_weights)
        self._blob("meta", self._export_meta, self._load_meta)
        self._version = 0  # bumps whenever weights or session states change
        self._cache: tuple | None = None

    # -- parameters ----------------------------------------------------------------------
    def _clear_items(self) -> None:
        """No item rows yet: the item tables are arrays with capacity, rows [0, _n) live."""
        E, H = self.embedding, self.hidden
        self._n = self._cap = 0
        self._emb, self._out, self._bias = (np.zeros((0, d), np.float32) for d in (E, H, 1))
        self._acc, self._count = np.zeros((0, E + H + 1), np.float32), np.zeros(0, np.float32)

    def _init_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb = hashed_normal(self.seed, 1, rows, self.embedding) * self.init_std
        out = hashed_normal(self.seed, 2, rows, self.hidden) * self.init_std
        return emb.astype(np.float32), out.astype(np.float32)

    def _ensure_items(self, n: int, init: bool = True) -> None:
        """Item rows [0, n) live; new ones start as new ids (`init`), else as zeros for the caller to fill."""
        if n <= self._n:
            return
        if n > self._cap:
            cap = max(n, 2 * self._cap, 64)

            def grow(t: np.ndarray) -> np.ndarray:
                new = np.zeros((cap,) + t.shape[1:], t.dtype)
                new[: self._n] = t[: self._n]
                return new

            self._emb, self._out, self._bias = grow(self._emb), grow(self._out), grow(self._bias)
            self._acc, self._count = grow(self._acc), grow(self._count)
            self._cap = cap
        if init:
            self._reset_items(np.arange(self._n, n))
        self._n = n
        self._items_changed.flags.ensure(n)

    def _reset_items(self, rows: np.ndarray) -> None:
        self._emb[rows], self._out[rows] = self._init_rows(rows)
        self._bias[rows] = 0.0
        self._acc[rows] = 0.0
        self._count[rows] = 0.0

    # -- the sequential pass -------------------------------------------------------------
    def _forward(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Each row's session state without learning the batch: h [B, H] and the last items [B, L], from
        the stored state through the session's earlier rows of the batch (`gru_scan`, compiled)."""
        cache = self._cache
        if cache is not None and cache[0] is batch and cache[1] == self._version:
            return cache[2]
        self._ensure_items(batch.n_items)
        uniq, inv = np.unique(batch.sessions, return_inverse=True)
        h, h_back, win = self._sessions.gather(uniq)
        pre_h = np.empty((len(batch), self.hidden), np.float32)
        pre_win = np.empty((len(batch), self._keep), np.int64)
        gru_scan(inv.astype(np.int64), batch.items, h, h_back, win, self.bptt, self._emb, self._dense, pre_h, pre_win)
        self._cache = (batch, self._version, (pre_h, pre_win))
        return pre_h, pre_win

    # -- Model ---------------------------------------------------------------------------
    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        pre_h, pre_win = self._forward(batch)
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), batch.n_items), np.float32)  # [R, n_items]
        score_rows(pre_h[rows], self._session_mean(pre_win[rows]), self._out, self._emb, self._bias, out)
        return out

    @classmethod
    def score_each(cls, queries: list[tuple[Model, Batch]]) -> list[np.ndarray]:
        """As `Model.score_each`: the queries of one model's copies scored in one pass over the item rows."""
        out: list[np.ndarray] = [np.empty(0)] * len(queries)
        passes: dict[tuple[int, int], tuple[GRU4Rec, list[tuple[int, np.ndarray, np.ndarray]]]] = {}
        for i, (model, batch) in enumerate(queries):
            assert isinstance(model, GRU4Rec)
            pre_h, pre_win = model._forward(batch)
            passes.setdefault((id(model._out), batch.n_items), (model, []))[1].append(
                (i, pre_h[0], model._session_mean(pre_win[:1])[0]))
        for (_, n), (model, wanted) in passes.items():
            res = np.empty((len(wanted), n), np.float32)  # [R, n_items]
            score_rows(np.array([h for _, h, _ in wanted]), np.array([m for _, _, m in wanted]),
                       model._out, model._emb, model._bias, res)
            for r, (i, _, _) in enumerate(wanted):
                out[i] = res[r]
        return out

    def _session_mean(self, win: np.ndarray) -> np.ndarray:  # [R, E]
        """Mean embedding of the last `mean_items` items of each window win [R, L] (-1 pads; zeros when none)."""
        win = win[:, win.shape[1] - self.mean_items :]
        valid = win >= 0
        x = self._emb[np.where(valid, win, 0)] * valid[..., None]  # [R, M, E]
        return x.sum(1) / np.maximum(valid.sum(1), 1)[:, None]

    def learn(self, batch: Batch) -> None:
        self._run(batch, np.zeros(0, np.int64))

    def learn_scored(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        """`learn`, scoring the events at `rows` inside the compiled loop, each just before it is learned."""
        return self._run(batch, np.asarray(rows, np.int64))

    def _run(self, batch: Batch, rows: np.ndarray) -> np.ndarray:  # [len(rows), n_items]
        self._ensure_items(batch.n_items)
        n = self._n
        score_at = np.full(len(batch), -1, np.int64)
        score_at[rows] = np.arange(len(rows))
        res = np.empty((len(rows), batch.n_items), np.float32)
        if not len(batch):
            return res
        uniq, inv = np.unique(batch.sessions, return_inverse=True)
        h, h_back, win = self._sessions.gather(uniq)
        learn_events(inv.astype(np.int64), batch.items, batch.weights, (h, h_back, win),
                     (self._emb[:n], self._out[:n], self._bias[:n], self._acc[:n], self._count[:n]), self._w, self._w_acc,
                     self._items_changed.flags.data[:n, 0], self._rng, (self.negatives, self.bptt, self.mean_items),
                     (self.bpreg, self.lr, self.emb_lr), score_at, res)
        learned = np.zeros(len(uniq), bool)  # sessions that took an item (lookups change nothing)
        learned[inv[batch.items >= 0]] = True
        if not learned.any():
            return res
        self._sessions.store(uniq[learned], h[learned], h_back[learned], win[learned])
        self._events += int((batch.items >= 0).sum())
        self._batches += 1
        self._version += 1
        self._cache = None
        return res

    def narrowed(self, rows: dict[str, np.ndarray]) -> GRU4Rec:
        clone = cast(GRU4Rec, super().narrowed(rows))
        clone._sessions = copy.copy(self._sessions)  # its rows are the narrowed session table
        clone._sessions.rows = clone._stored_rows["session"].table
        clone._cache = None
        return clone

    def similarity_vectors(self) -> np.ndarray:
        """The input item embeddings [n_items, embedding]."""
        return self._emb[: self._n]

    # -- state: the session table and the blobs registered in __init__, plus the item tensors -----
    def _export_meta(self) -> np.ndarray:  # [1, 7]
        return np.array([[self._sessions.stamp, self._events, self._batches, *counter_words(self._rng)]], np.float64)

    def _load_meta(self, meta: np.ndarray) -> None:
        meta = np.asarray(meta, np.float64).ravel()
        self._sessions.stamp, self._events, self._batches = int(meta[0]), int(meta[1]), int(meta[2])
        load_counter(self._rng, meta[3:7])

    def _load_weights(self, weights: np.ndarray) -> None:
        weights = np.asarray(weights, np.float32)
        self._w[:] = weights[0]  # in place: the views in _dense stay valid
        self._w_acc[:] = weights[1]

    def export_state(self) -> dict[str, np.ndarray]:
        n = self._n
        arrays = (self._emb, self._out, self._bias, self._acc, self._count[:, None])
        return {name: t[:n] for name, t in zip(_ITEM_TABLES, arrays)} | super().export_state()

    def import_state(self, state: dict[str, np.ndarray]) -> None:
        """Item rows a store never wrote (zeros) start as new ids; session rows of another width (another
        hidden size) are useless, so none is kept."""
        self._import_items(state)
        sess = np.asarray(state["session"], np.float64)
        width = 1 + self._keep + 2 * self.hidden
        super().import_state({**state, "session": sess if sess.shape[1] == width else np.zeros((len(sess), width))})
        self._sessions.loaded()
        self._items_changed.clear()
        self._version += 1
        self._cache = None

    def _import_items(self, state: dict[str, np.ndarray]) -> None:
        n = max(len(state[k]) for k in _ITEM_TABLES)
        self._clear_items()
        self._ensure_items(n, init=False)  # zeros, as new ids' biases, accumulators and counts start
        # embeddings start as new ids' where the state does not hold them whole (then it overwrites them)
        whole = min(len(state[name]) if np.ndim(state[name]) == 2 and np.shape(state[name])[1] >= dst.shape[1] else 0
                    for dst, name in ((self._emb, "item_emb"), (self._out, "item_out")))
        if whole < n:
            self._emb[whole:n], self._out[whole:n] = self._init_rows(np.arange(whole, n))
        for dst, name in zip((self._emb, self._out, self._bias, self._acc), _ITEM_TABLES):
            src = np.asarray(state[name], np.float32)
            src = src[:, None] if src.ndim == 1 else src
            r, c = min(len(src), n), min(src.shape[1], dst.shape[1])
            dst[:r, :c] = src[:r, :c]
        # rows a store never wrote come back as zeros: initialise them as new ids
        emb_in, acc_in = np.asarray(state["item_emb"]), np.asarray(state["item_acc"])
        if len(emb_in) and len(acc_in):
            r = min(len(emb_in), len(acc_in))
            blank = np.flatnonzero(~emb_in[:r].any(axis=1))  # few: then their (wider) accumulators
            blank = blank[~acc_in[blank].any(axis=1)]
            if len(blank):
                self._reset_items(blank)
        count = np.asarray(state["item_count"], np.float32).reshape(len(state["item_count"]), -1)[:, 0]
        self._count[: len(count)] = count

    def drain_changes(self) -> dict[str, np.ndarray | None]:
        items = self._items_changed.rows(self._n)
        self._items_changed.clear()
        return dict.fromkeys(_ITEM_TABLES, items) | super().drain_changes()

    def reserve_items(self, n: int) -> None:
        self._ensure_items(n)

    def absorb(self, table: str, rows: np.ndarray, delta: np.ndarray, scale: float | None = None) -> None:
        self._ensure_items(int(rows.max()) + 1)
        if table == "item_count":
            self._count[rows] += delta[:, 0]
        else:
            target = dict(zip(_ITEM_TABLES, (self._emb, self._out, self._bias, self._acc)))[table]
            target[rows, : delta.shape[1]] += delta
        self._items_changed.mark(rows)
        self._version += 1
        self._cache = None

    def forget(self, kind: TableKind, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        if kind == "item":
            ids = ids[(ids >= 0) & (ids < self._n)]
            if len(ids):
                self._reset_items(ids)
        elif kind == "session":
            self._sessions.forget(ids)
        self._version += 1
        self._cache = None

    def evicted(self, kind: TableKind, ids: np.ndarray) -> np.ndarray:
        """Sessions among `ids` whose state this model dropped (beyond `max_sessions`) but the store keeps."""
        return self._sessions.evicted(ids) if kind == "session" else np.zeros(0, np.int64)

    def import_rows(self, table: str, ids: np.ndarray, values: np.ndarray) -> None:
        """Take back evicted session states read from the store (`values`: their stored rows, zeros
        for a state the store no longer has: that session starts afresh)."""
        if table != "session" or not len(ids):
            return
        self._sessions.take_back(ids, values)
        self._version += 1
        self._cache = None

    def session_items(self, session: int) -> np.ndarray:
        """The session's last `max(bptt, mean_items)` items, oldest first."""
        _, _, win = self._sessions.gather(np.array([session], np.int64))
        return win[0][win[0] >= 0]

    def hidden_state(self, session: int) -> np.ndarray:
        """The session's current hidden state (zeros when it has none)."""
        h, _, _ = self._sessions.gather(np.array([session], np.int64))
        return h[0].copy()
