"""GRU4Rec for streams: a GRU over each session's items, trained one micro-batch at a time.

    score(j) = h . out[j] + m . emb[j] + bias[j]

h is the GRU's state after the session's items (input embeddings `emb`, a separate output table
`out`), m the mean embedding of the session's last `mean_items` items. The GRU learns order (what
follows what); the skip term m . emb[j] learns co-occurrence (what belongs together), which a GRU
picks up slowly in one pass.

Every event is a training example (session-parallel, truncated BPTT): from the session's state
before its last `bptt` items, GRU steps through them (with gradients) give h, which should rank
the event's item first among the batch's targets and `negatives` items sampled by
(count + 1)^`alpha`, under the BPR-max loss. Updates are Adagrad, per touched row for the item
tables, so new items just add rows.

States advance with the weights as they stand before the batch, row by row in stream order, so
`score` sees for each row a state that includes the session's earlier rows of the batch: only the
weights lag by one batch. New item rows are a hash of (seed, item id, column), so growing the
vocabulary never touches earlier rows.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from models.base import Batch, Model, TableKind
from models.gru_sessions import SessionStates, gru_scan
from models.rows import Changes, hashed_normal

_ITEM_TABLES = ("item_emb", "item_out", "item_bias", "item_acc", "item_count")


class GRU4Rec(Model):
    """Session-based GRU recommender learning incrementally from a stream."""

    name = "gru"
    query = "session"
    tables: ClassVar[dict[str, TableKind]] = {
        "item_emb": "item",  # [n_items, embedding]
        "item_out": "item",  # [n_items, hidden]
        "item_bias": "item",  # [n_items, 1]
        "item_acc": "item",  # [n_items, embedding + hidden + 1] Adagrad accumulators
        "item_count": "item",  # [n_items, 1] weighted event counts (negative sampling)
        "session": "session",  # [n_sessions, 1 + L + 2 * hidden]: stamp, last L items + 1, h, h_back (all 0: none)
        "weights": "blob",  # [2, n_weights]: GRU weights; Adagrad accumulators
        "meta": "blob",  # [1, 3 + rng bytes]: stamp counter, events learned, batches learned, rng state
    }

    def __init__(self, hidden: int = 100, embedding: int = 64, negatives: int = 1024, alpha: float = 0.0,
                 bpreg: float = 1.0, bptt: int = 4, mean_items: int = 20, lr: float = 0.05, emb_lr: float = 0.1,
                 init_std: float = 0.1, max_sessions: int = 100_000, seed: int = 0):
        """`alpha`: negative sampling exponent on (count + 1); `bpreg`: BPR-max score regularisation;
        `mean_items`: how many of the session's last items the skip term averages (0: no skip term);
        `lr`, `emb_lr`: Adagrad steps (GRU weights, output vectors and biases; item embeddings);
        `init_std`: new item rows; `max_sessions`: live hidden states kept (LRU)."""
        super().__init__()
        if bptt < 1 or mean_items < 0:
            raise ValueError(f"bptt must be >= 1 and mean_items >= 0 (got {bptt}, {mean_items})")
        self.hidden = hidden
        self.embedding = embedding
        self.negatives = negatives
        self.alpha = alpha
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
        self._shapes = {"w_ih": (3 * H, E), "w_hh": (3 * H, H), "b_ih": (3 * H,), "b_hh": (3 * H,)}
        self._offsets: dict[str, tuple[int, int]] = {}
        size = 0
        for key, shape in self._shapes.items():
            n = int(np.prod(shape))
            self._offsets[key] = (size, size + n)
            size += n
        self._gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / np.sqrt(H)
        self._w = (torch.rand(size, generator=self._gen, dtype=torch.float32) * 2 - 1) * bound
        a, _ = self._offsets["b_hh"]
        self._w[a + H : a + 2 * H] = 0.0  # the update gate starts unbiased
        self._w.requires_grad_(True)
        self._w_acc = torch.zeros(size)
        self._clear_items()
        self._items_changed = Changes()
        self._sessions = SessionStates(H, self._keep, max_sessions)
        self._table("session", self._sessions.rows, self._sessions.changes)
        self._events = 0
        self._batches = 0
        self._blob("weights", lambda: torch.stack([self._w.detach(), self._w_acc]).numpy(), self._load_weights)
        self._blob("meta", self._export_meta, self._load_meta)
        self._version = 0  # bumps whenever weights or session states change
        self._cache: tuple | None = None

    # -- parameters ----------------------------------------------------------------------
    def _dense(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: w[a:b].view(self._shapes[k]) for k, (a, b) in self._offsets.items()}

    def _clear_items(self) -> None:
        """No item rows yet: the item tables are torch buffers with capacity, rows [0, _n) live."""
        E, H = self.embedding, self.hidden
        self._n = self._cap = 0
        self._emb, self._out, self._bias = torch.zeros(0, E), torch.zeros(0, H), torch.zeros(0, 1)
        self._acc, self._count = torch.zeros(0, E + H + 1), torch.zeros(0)
        self._pow = torch.zeros(0)  # (count + 1) ** alpha, the sampling weights

    def _init_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb = hashed_normal(self.seed, 1, rows, self.embedding) * self.init_std
        out = hashed_normal(self.seed, 2, rows, self.hidden) * self.init_std
        return emb.astype(np.float32), out.astype(np.float32)

    def _ensure_items(self, n: int) -> None:
        if n <= self._n:
            return
        if n > self._cap:
            cap = max(n, 2 * self._cap, 64)

            def grow(t: torch.Tensor) -> torch.Tensor:
                new = torch.zeros((cap,) + tuple(t.shape[1:]), dtype=t.dtype)
                new[: self._n] = t[: self._n]
                return new

            self._emb, self._out, self._bias = grow(self._emb), grow(self._out), grow(self._bias)
            self._acc, self._count, self._pow = grow(self._acc), grow(self._count), grow(self._pow)
            self._cap = cap
        rows = np.arange(self._n, n)
        self._reset_items(rows)
        self._n = n

    def _reset_items(self, rows: np.ndarray) -> None:
        emb, out = self._init_rows(rows)
        idx = torch.from_numpy(rows)
        self._emb[idx] = torch.from_numpy(emb)
        self._out[idx] = torch.from_numpy(out)
        self._bias[idx] = 0.0
        self._acc[idx] = 0.0
        self._count[idx] = 0.0
        self._pow[idx] = 1.0

    # -- the sequential pass -------------------------------------------------------------
    def _forward(self, batch: Batch) -> dict:
        """Advance every session through the batch (no grad), each row from its session's state.

        The input half of the GRU (`W_ih x + b_ih`) is one batched matmul over the batch; the
        recurrent half runs in `gru_scan` (numba) row by row in stream order, much faster than
        stepping torch's GRU cell on bursty streams (one user's events back to back make long
        chains of dependent steps).
        """
        cache = self._cache
        if cache is not None and cache[0] is batch and cache[1] == self._version:
            return cache[2]
        self._ensure_items(batch.n_items)
        items = batch.items
        uniq, inv = np.unique(batch.sessions, return_inverse=True)
        h, h_back, win = self._sessions.gather(uniq)
        w = self._dense(self._w.detach())
        valid = items >= 0
        with torch.no_grad():
            x = self._emb[torch.from_numpy(np.where(valid, items, 0))]
            xg = torch.addmm(w["b_ih"], x, w["w_ih"].T).numpy()  # [B, 3H]
        B, H = len(batch), self.hidden
        pre_h, pre_h_back = np.empty((B, H), np.float32), np.empty((B, H), np.float32)
        pre_win = np.empty((B, self._keep), np.int64)
        gru_scan(xg, inv.astype(np.int64), items, h, h_back, win, self.bptt, self._emb.numpy(), w["w_ih"].numpy(),
                 w["b_ih"].numpy(), w["w_hh"].numpy(), w["b_hh"].numpy(), pre_h, pre_h_back, pre_win)
        out = {"uniq": uniq, "h": h, "h_back": h_back, "win": win, "pre_h": pre_h, "pre_h_back": pre_h_back,
               "pre_win": pre_win}
        self._cache = (batch, self._version, out)
        return out

    # -- Model ---------------------------------------------------------------------------
    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        fw = self._forward(batch)
        n = batch.n_items
        rows = np.asarray(rows, np.int64)
        with torch.no_grad():
            h = torch.from_numpy(fw["pre_h"][rows])  # [R, H]
            out = h @ self._out[:n].T
            if self.mean_items:
                win = torch.from_numpy(fw["pre_win"][rows])
                out += self._session_mean(self._emb[win.clamp(min=0)], win >= 0) @ self._emb[:n].T
            out += self._bias[:n, 0]
        return out.numpy()  # [R, n]

    def _session_mean(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean of the last `mean_items` embeddings x [R, L, E] where valid [R, L] (zeros when none)."""
        x, valid = x[:, -self.mean_items :], valid[:, -self.mean_items :].to(x.dtype)
        return (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1.0)  # [R, E]

    def learn(self, batch: Batch) -> None:
        if (with_items := batch.with_items()) is None:
            return
        batch = with_items
        fw = self._forward(batch)
        examples = np.flatnonzero(fw["pre_win"][:, -1] >= 0)
        if len(examples):
            self._train(torch.from_numpy(fw["pre_h_back"][examples]), fw["pre_win"][examples],
                        batch.items[examples], batch.weights[examples])
        # sampling weights follow the counts
        it = torch.from_numpy(batch.items)
        self._count.index_add_(0, it, torch.from_numpy(batch.weights.astype(np.float32)))
        touched = torch.unique(it)
        self._pow[touched] = (self._count[touched] + 1.0) ** self.alpha
        self._sessions.store(fw["uniq"], fw["h"], fw["h_back"], fw["win"])
        self._items_changed.mark(batch.items)
        self._events += len(batch)
        self._batches += 1
        self._version += 1
        self._cache = None

    # -- training: one Adagrad step on the batch's examples -------------------------------
    def _train(self, h_back: torch.Tensor, windows: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> None:
        """Examples: the state before each window h_back [B, H], the window's items [B, L] (-1 pads,
        right-aligned), the target items [B] and the events' weights [B]."""
        tgt = torch.from_numpy(targets)
        cand = self._candidates(tgt)  # [C]
        # windows are right-aligned: column p holds an item for the rows whose window reaches back that far
        windows = windows[:, int((windows >= 0).any(axis=0).argmax()) :]  # [B, W]
        valid = torch.from_numpy(windows >= 0)
        inp = torch.from_numpy(np.where(windows >= 0, windows, windows[:, -1:]).ravel())  # pads: any valid id
        # the rows taking part, each once: embeddings of the windows (and candidates), output rows of the candidates
        e_ids, e_inv = torch.unique(torch.cat([inp, cand]) if self.mean_items > 0 else inp, return_inverse=True)
        emb_rows = self._emb[e_ids].requires_grad_(True)
        x = emb_rows[e_inv[: len(inp)]].view(*windows.shape, -1)  # [B, W, E]
        o_ids, o_inv = torch.unique(cand, return_inverse=True)
        bias_rows = self._bias[o_ids].requires_grad_(True)
        h = self._through_window(h_back, x, valid)
        out_rows = self._out[o_ids].requires_grad_(True)
        logits = h @ out_rows[o_inv].T
        if self.mean_items:
            cand_emb = emb_rows[e_inv[len(inp) :]]  # [C, E]
            logits = logits + self._session_mean(x, valid) @ cand_emb.T
        logits = logits + bias_rows[o_inv, 0]  # [B, C]
        loss = self._bpr_max(logits, cand, tgt, torch.from_numpy(weights.astype(np.float32)))
        if loss is None:
            return
        self._adagrad(loss, (emb_rows, e_ids), (bias_rows, o_ids), (out_rows, o_ids))

    def _candidates(self, tgt: torch.Tensor) -> torch.Tensor:
        """The batch's targets, then `negatives` items drawn by (count + 1) ** alpha."""
        if self.negatives <= 0:
            return tgt
        neg = torch.multinomial(self._pow[: self._n], self.negatives, replacement=True, generator=self._gen)
        return torch.cat([tgt, neg])

    def _through_window(self, h: torch.Tensor, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """GRU steps from h [B, H] through the last `bptt` columns of x [B, W, E] (truncated BPTT), a
        row stepping only where valid [B, W]."""
        w = self._dense(self._w)
        W = x.shape[1]
        for p in range(max(0, W - self.bptt), W):
            step = torch._VF.gru_cell(x[:, p], h, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
            h = step if bool(valid[:, p].all()) else torch.where(valid[:, p, None], step, h)
        return h

    def _bpr_max(self, logits: torch.Tensor, cand: torch.Tensor, tgt: torch.Tensor, wt: torch.Tensor) -> torch.Tensor | None:
        """The BPR-max loss of logits [B, C] (example b's target is candidate b; copies of it are no
        negatives), averaged with the weights wt [B]; None when no example has a negative."""
        own = torch.arange(len(tgt))
        pos = logits[own, own][:, None]
        neg_mask = cand[None, :] == tgt[:, None]  # [B, C] the target and its copies
        has_neg = ~neg_mask.all(1)  # tiny vocabularies: every candidate may be the target
        neg_mask[~has_neg] = False
        wt = wt * has_neg
        sm = torch.softmax(logits.masked_fill(neg_mask, float("-inf")), dim=1)
        loss = (-torch.log((sm * torch.sigmoid(pos - logits)).sum(1) + 1e-24)
                + self.bpreg * (sm * logits.masked_fill(neg_mask, 0.0) ** 2).sum(1))
        if not float(wt.sum()) > 0:
            return None
        return (loss * wt).sum() / wt.sum()

    def _adagrad(self, loss: torch.Tensor, emb: tuple[torch.Tensor, torch.Tensor], bias: tuple[torch.Tensor, torch.Tensor],
                 out: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Adagrad on the GRU weights and on the item rows (rows, ids) that took part."""
        grads = torch.autograd.grad(loss, [self._w, emb[0], bias[0], out[0]])
        E, H = self.embedding, self.hidden
        with torch.no_grad():
            g = grads[0]
            self._w_acc += g * g
            self._w -= self.lr * g / (self._w_acc.sqrt() + 1e-10)
            self._sparse_step(self._emb, *emb, grads[1], 0, E, self.emb_lr)
            self._sparse_step(self._bias, *bias, grads[2], E + H, E + H + 1, self.lr)
            self._sparse_step(self._out, *out, grads[3], E, E + H, self.lr)
        self._items_changed.mark(out[1].numpy())
        self._items_changed.mark(emb[1].numpy())

    def _sparse_step(self, table: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor, a: int, b: int,
                     lr: float) -> None:
        """Adagrad on rows `ids` of `table`, accumulators in columns a:b of `item_acc`."""
        acc = self._acc[ids, a:b] + grad * grad
        self._acc[ids, a:b] = acc
        table[ids] = rows.detach() - lr * grad / (acc.sqrt() + 1e-10)

    def similarity_vectors(self) -> np.ndarray:
        """The input item embeddings [n_items, embedding]."""
        return self._emb[: self._n].numpy()

    # -- state: the session table and the blobs registered in __init__, plus the item tensors -----
    def _export_meta(self) -> np.ndarray:  # [1, 3 + rng bytes]
        rng = self._gen.get_state().numpy().astype(np.float64)
        return np.concatenate([[float(self._sessions.stamp), float(self._events), float(self._batches)], rng])[None, :]

    def _load_meta(self, meta: np.ndarray) -> None:
        meta = np.asarray(meta, np.float64).ravel()
        self._sessions.stamp, self._events, self._batches = int(meta[0]), int(meta[1]), int(meta[2])
        if len(meta) > 3:
            self._gen.set_state(torch.from_numpy(meta[3:].astype(np.uint8)))

    def _load_weights(self, weights: np.ndarray) -> None:
        weights = np.asarray(weights, np.float32)
        with torch.no_grad():
            self._w.copy_(torch.from_numpy(weights[0]))
            self._w_acc = torch.from_numpy(weights[1].copy())

    def export_state(self) -> dict[str, np.ndarray]:
        n = self._n
        tensors = (self._emb, self._out, self._bias, self._acc, self._count[:, None])
        return {name: t[:n].numpy() for name, t in zip(_ITEM_TABLES, tensors)} | super().export_state()

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
        self._ensure_items(n)
        for dst, name in zip((self._emb, self._out, self._bias, self._acc), _ITEM_TABLES):
            src = np.asarray(state[name], np.float32)
            src = src[:, None] if src.ndim == 1 else src
            r, c = min(len(src), n), min(src.shape[1], dst.shape[1])
            dst[:r, :c] = torch.from_numpy(np.ascontiguousarray(src[:r, :c]))
        # rows a store never wrote come back as zeros: initialise them as new ids
        emb_in, acc_in = np.asarray(state["item_emb"]), np.asarray(state["item_acc"])
        if len(emb_in) and len(acc_in):
            r = min(len(emb_in), len(acc_in))
            blank = np.flatnonzero(~emb_in[:r].any(axis=1) & ~acc_in[:r].any(axis=1))
            if len(blank):
                self._reset_items(blank)
        count = np.asarray(state["item_count"], np.float32).reshape(len(state["item_count"]), -1)[:, 0]
        self._count[: len(count)] = torch.from_numpy(count)
        self._pow[:n] = (self._count[:n] + 1.0) ** self.alpha

    def drain_changes(self) -> dict[str, np.ndarray | None]:
        items = self._items_changed.rows(self._n)
        self._items_changed.clear()
        return dict.fromkeys(_ITEM_TABLES, items) | super().drain_changes()

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
