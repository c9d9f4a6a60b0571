"""GRU4Rec for streams: a GRU over each session's items, trained one micro-batch at a time.

Model. item embedding (dim `embedding`) -> GRU cell (dim `hidden`) -> scores
against output item vectors, plus a skip term around the GRU:

    score(j) = h . out[j] + m . emb[j] + bias[j]

where `out` is a separate output table (dim `hidden`) and `m` the mean input
embedding of the session's last `mean_items` items. The GRU learns order
(what follows what); the skip term learns co-occurrence (what belongs
together) directly, one step from the embeddings, which a GRU picks up slowly
in one pass. With `shared_embedding=True` the first term is
`tanh(P h + p) . emb[j]` (input embeddings reused as output vectors, P a
`hidden -> embedding` projection); separate tables measured better (recall@20
0.214 vs 0.206 on the first 30k MovieLens events at batch 1, 0.529 vs 0.458 on
40k synthetic events at batch 16, before the skip term).

Learning (session-parallel, truncated BPTT). Each session keeps `h` (its
hidden state after its last item), its last L = max(`bptt`, `mean_items`)
items, and `h_back`, the state before the last `bptt` items (the window). An
event (session s, item i) is a training example: from `h_back`, GRU steps
through the window (with gradients) give `h`, which with the mean of the last
`mean_items` embeddings should rank i first; so the GRU weights, the session
items' embeddings and the output vectors all learn. `bptt=1` is GRU4Rec's
one-step truncation; longer windows let the recurrent weights learn what to
carry (MovieLens recall@20 on the first 30k events at batch 1: 0.214 with 1,
0.232 with 3, 0.237 with 6, no better with 10 or 20; the default 4 keeps
learning above 10k events/s at batch 256). Candidates are the batch's targets
plus `negatives` items sampled by (count + 1)^`alpha`; the loss is BPR-max
(`loss="bpr-max"`, default) or sampled-softmax cross-entropy with logQ
correction (`loss="ce"`); BPR-max measured better (synthetic 0.529 vs 0.463,
MovieLens MRR@20 0.044 vs 0.040 at equal recall). Updates are Adagrad, per
touched row for the item tables (so new items just add rows and accumulator
rows), with step `emb_lr` for the embeddings and `lr` for the rest.

Measured (bench/sessions.py streams, recall@20 at batch 16 unless stated; the
skip term over the last 20 items, uniform negatives and a doubled embedding
step were each measured on both streams, then kept together): synthetic 0.566
before -> 0.612 with the skip term (window mean 4 items 0.601, 10 0.610, 50
0.612; recency-weighted mean 0.617 vs uniform 0.622; sum / sqrt(n) 0.617;
the skip through a learned `embedding -> hidden` projection instead 0.572)
-> 0.622 with `alpha` 0 (0.5: 0.612, 0.25: 0.619) -> 0.626 with `emb_lr`
0.1 (3x: 0.603); MovieLens 0.139 -> 0.171 (skip, `alpha` 0.25) -> 0.173
(`alpha` 0) -> 0.183 (`emb_lr` 0.1). No better: `lr` 0.035/0.08/0.1,
`init_std` 0.05/0.07/0.2, `bpreg` 0.25/0.5, 2048 negatives, a larger
output or bias step. At batch 1, the defaults give synthetic 0.621 (0.563
before; session-kNN 0.619) and MovieLens 0.192 (0.143 before); the skip term
costs ~15% of the learning speed.

Hidden states advance with the weights as they stand before the batch: the
input half of the GRU is one batched matmul, the recurrent half a numba scan
over the rows in stream order (each session continues from its own state), so
`score` sees, for each row, a state that includes the session's earlier rows
of the batch. Only the weights lag by one batch.

State tables: `item_emb`, `item_out`, `item_bias`, `item_acc` (Adagrad
accumulators of the three, side by side), `item_count` (for sampling) are
"item" tables; `session` rows are `[stamp, last L items + 1, h, h_back]`
(an all-zero row = no state; beyond `max_sessions` live states the least
recently used is dropped); `weights` (the GRU and projection weights with
their accumulators) and `meta` (counters and the sampler's RNG state) are
blobs.

New item rows are initialised from a counter-based hash of (seed, item id,
column), so they do not depend on call order, and growing the vocabulary
never touches earlier rows: earlier items' scores are unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from models.base import Batch, Model, TableKind
from models.rows import RowTable
from numba import njit

def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
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


@njit(cache=True, fastmath=True, error_model="numpy")
def _gru_step(xg, h, w_hh, b_hh, gh, out):  # pragma: no cover - numba
    """out = GRUCell step from state h with input gates xg = W_ih x + b_ih (gates r, z, n)."""
    H = h.shape[0]
    for k in range(3 * H):
        acc = b_hh[k]
        for m in range(H):
            acc += w_hh[k, m] * h[m]
        gh[k] = acc
    for k in range(H):
        r = 0.5 + 0.5 * np.tanh(0.5 * (xg[k] + gh[k]))  # sigmoid
        z = 0.5 + 0.5 * np.tanh(0.5 * (xg[H + k] + gh[H + k]))
        n = np.tanh(xg[2 * H + k] + r * gh[2 * H + k])
        out[k] = (1.0 - z) * n + z * h[k]


@njit(cache=True, fastmath=True, error_model="numpy")
def _gru_scan(xg, inv, items, h, h_back, win, k, emb, w_ih, b_ih, w_hh, b_hh, pre_h, pre_h_back, pre_win):  # pragma: no cover - numba
    """Rows in stream order: record each row's session state, then step it with the row's item.

    xg [B, 3H] = W_ih x + b_ih of each row. Per session (updated in place): h [U, H], its last
    L items win [U, L] (-1 pads, newest last), whose last k are the BPTT window, and h_back
    [U, H], the state before that window's first item; an item leaving the window advances
    h_back through it.
    """
    H = h.shape[1]
    L = win.shape[1]
    gh = np.empty(3 * H, np.float32)
    new = np.empty(H, np.float32)
    xo = np.empty(3 * H, np.float32)
    for j in range(len(inv)):
        u = inv[j]
        pre_h[j] = h[u]
        pre_h_back[j] = h_back[u]
        pre_win[j] = win[u]
        if items[j] < 0:
            continue
        old = win[u, L - k]
        if old >= 0:  # the window is full: its oldest item leaves it
            for g in range(3 * H):
                acc = b_ih[g]
                for m in range(emb.shape[1]):
                    acc += w_ih[g, m] * emb[old, m]
                xo[g] = acc
            _gru_step(xo, h_back[u], w_hh, b_hh, gh, new)
            h_back[u] = new
        for p in range(L - 1):
            win[u, p] = win[u, p + 1]
        win[u, L - 1] = items[j]
        _gru_step(xg[j], h[u], w_hh, b_hh, gh, new)
        h[u] = new


class GRU4Rec(Model):
    """Session-based GRU recommender learning incrementally from a stream."""

    name = "gru"
    query = "session"
    tables: dict[str, TableKind] = {
        "item_emb": "item",  # [n_items, embedding]
        "item_out": "item",  # [n_items, hidden] (0 columns when shared_embedding)
        "item_bias": "item",  # [n_items, 1]
        "item_acc": "item",  # [n_items, embedding + out width + 1] Adagrad accumulators
        "item_count": "item",  # [n_items, 1] weighted event counts (negative sampling)
        "session": "session",  # [n_sessions, 1 + L + 2 * hidden]: stamp, last L items + 1, h, h_back (all 0: none)
        "weights": "blob",  # [2, n_weights]: GRU (+ projection) weights; Adagrad accumulators
        "meta": "blob",  # [1, 3 + rng bytes]: stamp counter, events learned, batches learned, rng state
    }

    def __init__(self, hidden: int = 100, embedding: int = 64, negatives: int = 1024, alpha: float = 0.0,
                 loss: str = "bpr-max", logq: float = 1.0, bpreg: float = 1.0, shared_embedding: bool = False,
                 bptt: int = 4, mean_items: int = 20, lr: float = 0.05, emb_lr: float = 0.1, acc_init: float = 0.0,
                 init_std: float = 0.1, update_bias: float = 0.0, max_sessions: int = 100_000,
                 threads: int | None = None, seed: int = 0):
        """`alpha`: negative sampling exponent on (count + 1); `logq`: weight of the logQ
        correction (loss "ce"); `bpreg`: BPR-max score regularisation; `mean_items`: how many of
        the session's last items the skip term averages (0: no skip term); `lr`, `emb_lr`: Adagrad
        steps (GRU weights, output vectors and biases; item embeddings); `acc_init`: Adagrad's
        initial accumulator; `init_std`: new item rows; `update_bias`: initial bias of the GRU
        update gate; `max_sessions`: live hidden states kept (LRU); `threads`: when set,
        `torch.set_num_threads` (process-wide)."""
        if loss not in ("ce", "bpr-max"):
            raise ValueError(f"loss must be 'ce' or 'bpr-max' (got {loss!r})")
        self.hidden = hidden
        self.embedding = embedding
        self.negatives = negatives
        self.alpha = alpha
        self.loss = loss
        self.logq = logq
        self.bpreg = bpreg
        self.shared_embedding = shared_embedding
        self.lr = lr
        self.emb_lr = emb_lr
        self.acc_init = acc_init
        self.init_std = init_std
        self.update_bias = update_bias
        if bptt < 1 or mean_items < 0:
            raise ValueError(f"bptt must be >= 1 and mean_items >= 0 (got {bptt}, {mean_items})")
        self.bptt = bptt
        self.mean_items = mean_items
        self._keep = max(bptt, mean_items)  # L: items kept per session
        self.max_sessions = max_sessions
        self.threads = threads
        self.seed = seed
        if threads:
            torch.set_num_threads(threads)
        H, E = hidden, embedding
        self._out_width = 0 if shared_embedding else H
        self._shapes = {"w_ih": (3 * H, E), "w_hh": (3 * H, H), "b_ih": (3 * H,), "b_hh": (3 * H,)}
        if shared_embedding:
            self._shapes.update({"proj": (E, H), "proj_b": (E,)})
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
        self._w[a + H : a + 2 * H] = update_bias  # z gate: < 0 lets new items overwrite the state
        self._w.requires_grad_(True)
        self._w_acc = torch.full((size,), float(acc_init))
        # item tables: torch buffers with capacity; rows [0, _n) are live
        self._cap = 0
        self._n = 0
        self._emb = torch.zeros(0, E)
        self._out = torch.zeros(0, self._out_width)
        self._bias = torch.zeros(0, 1)
        self._acc = torch.zeros(0, E + self._out_width + 1)
        self._count = torch.zeros(0)
        self._pow = torch.zeros(0)  # (count + 1) ** alpha, the sampling weights
        # sessions
        self._sess = RowTable(1 + self._keep + 2 * H, np.float64, 0.0)
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._retiring: set[int] = set()  # beyond max_sessions: dropped once their last change is drained
        self._evicted: set[int] = set()  # dropped from memory; their state lives on in the store
        self._stamp = 0
        self._events = 0
        self._batches = 0
        self._version = 0  # bumps whenever weights or session states change
        self._cache: tuple | None = None
        self._changed_items: set[int] = set()
        self._changed_sessions: set[int] = set()

    # -- parameters ----------------------------------------------------------------------
    def _dense(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: w[a:b].view(self._shapes[k]) for k, (a, b) in self._offsets.items()}

    def _init_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb = hashed_normal(self.seed, 1, rows, self.embedding) * self.init_std
        out = hashed_normal(self.seed, 2, rows, self._out_width) * self.init_std
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
        self._acc[idx] = self.acc_init
        self._count[idx] = 0.0
        self._pow[idx] = 1.0

    # -- sessions ------------------------------------------------------------------------
    def _gather_sessions(self, sessions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """h, h_back [U, H] float32 and the last items [U, L] of each session (zeros/-1 when unknown)."""
        H, k = self.hidden, self._keep
        rows = np.zeros((len(sessions), 1 + k + 2 * H))
        ok = (sessions >= 0) & (sessions < self._sess.n)
        if ok.any():
            got = self._sess.data[sessions[ok]]
            live = got[:, 0] > 0
            idx = np.flatnonzero(ok)[live]
            rows[idx] = got[live]
        t = rows[:, 1 + k :].astype(np.float32)
        win = rows[:, 1 : 1 + k].astype(np.int64) - 1
        return np.ascontiguousarray(t[:, :H]), np.ascontiguousarray(t[:, H:]), np.ascontiguousarray(win)

    def _store_sessions(self, sessions: np.ndarray, h: np.ndarray, h_back: np.ndarray, win: np.ndarray) -> None:
        H, k = self.hidden, self._keep
        self._sess.ensure(int(sessions.max()) + 1)
        data = self._sess.data
        stamps = self._stamp + 1 + np.arange(len(sessions))
        self._stamp += len(sessions)
        data[sessions, 0] = stamps
        data[sessions, 1 : 1 + k] = win + 1
        data[sessions, 1 + k : 1 + k + H] = h
        data[sessions, 1 + k + H :] = h_back
        for s in sessions.tolist():
            self._lru.pop(s, None)
            self._lru[s] = None
            self._retiring.discard(s)
        self._changed_sessions.update(sessions.tolist())
        while len(self._lru) > self.max_sessions:
            self._retiring.add(self._lru.popitem(last=False)[0])

    def _retire(self) -> None:
        """Drop the states beyond `max_sessions` whose latest change has been drained (so stored)."""
        done = [s for s in self._retiring if s not in self._changed_sessions]
        if done:
            self._sess.reset(np.array(done, np.int64))
            self._evicted.update(done)
            self._retiring.difference_update(done)

    # -- the sequential pass -------------------------------------------------------------
    def _forward(self, batch: Batch) -> dict:
        """Advance every session through the batch (no grad), each row from its session's state.

        The input half of the GRU (`W_ih x + b_ih`) is one batched matmul over the batch;
        the recurrent half runs in `_gru_scan` (numba) row by row in stream order, which
        on bursty streams (one user's events back to back: ~140 dependent steps in a batch
        of 256 on MovieLens) is several times faster than stepping torch's GRU cell.
        """
        cache = self._cache
        if cache is not None and cache[0] is batch and cache[1] == self._version:
            return cache[2]
        self._ensure_items(batch.n_items)
        items = batch.items
        uniq, inv = np.unique(batch.sessions, return_inverse=True)
        h, h_back, win = self._gather_sessions(uniq)
        w = self._dense(self._w.detach())
        valid = items >= 0
        with torch.no_grad():
            x = self._emb[torch.from_numpy(np.where(valid, items, 0))]
            xg = torch.addmm(w["b_ih"], x, w["w_ih"].T).numpy()  # [B, 3H]
        B, H = len(batch), self.hidden
        pre_h = np.empty((B, H), np.float32)
        pre_h_back = np.empty((B, H), np.float32)
        pre_win = np.empty((B, self._keep), np.int64)
        _gru_scan(xg, inv.astype(np.int64), items, h, h_back, win, self.bptt, self._emb.numpy(), w["w_ih"].numpy(), w["b_ih"].numpy(),
                  w["w_hh"].numpy(), w["b_hh"].numpy(), pre_h, pre_h_back, pre_win)
        out = {"uniq": uniq, "h": h, "h_back": h_back, "win": win, "pre_h": pre_h, "pre_h_back": pre_h_back, "pre_win": pre_win}
        self._cache = (batch, self._version, out)
        return out

    # -- Model ---------------------------------------------------------------------------
    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        fw = self._forward(batch)
        n = batch.n_items
        rows = np.asarray(rows, np.int64)
        with torch.no_grad():
            h = torch.from_numpy(fw["pre_h"][rows])  # [R, H]
            if self.shared_embedding:
                w = self._dense(self._w.detach())
                out = torch.tanh(h @ w["proj"].T + w["proj_b"]) @ self._emb[:n].T
            else:
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
        batch = batch.with_items()
        if batch is None:
            return
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
        self._store_sessions(fw["uniq"], fw["h"], fw["h_back"], fw["win"])
        self._retire()
        self._changed_items.update(batch.items.tolist())
        self._events += len(batch)
        self._batches += 1
        self._version += 1
        self._cache = None

    def _train(self, h_back: torch.Tensor, windows: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> None:
        n = self._n
        B = len(targets)
        tgt = torch.from_numpy(targets)
        if self.negatives > 0:
            neg = torch.multinomial(self._pow[:n], self.negatives, replacement=True, generator=self._gen)
            cand = torch.cat([tgt, neg])
        else:
            cand = tgt
        # windows are right-aligned: column p holds an item for the rows whose window reaches back that far
        first = int((windows >= 0).any(axis=0).argmax())
        windows = windows[:, first:]  # [B, W]
        W = windows.shape[1]
        valid = torch.from_numpy(windows >= 0)
        inp = torch.from_numpy(np.where(windows >= 0, windows, windows[:, -1:]).ravel())  # pads: any valid id
        n_in = len(inp)
        cand_emb_needed = self.shared_embedding or self.mean_items > 0
        e_ids, e_inv = torch.unique(torch.cat([inp, cand]) if cand_emb_needed else inp, return_inverse=True)
        emb_rows = self._emb[e_ids].requires_grad_(True)
        x_all = emb_rows[e_inv[:n_in]].view(B, W, -1)  # [B, W, E]
        o_ids, o_inv = torch.unique(cand, return_inverse=True)
        bias_rows = self._bias[o_ids].requires_grad_(True)
        w = self._dense(self._w)
        h = h_back
        for p in range(max(0, W - self.bptt), W):  # truncated BPTT through the window
            step = torch._VF.gru_cell(x_all[:, p], h, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
            h = step if bool(valid[:, p].all()) else torch.where(valid[:, p, None], step, h)
        if self.shared_embedding:
            cand_emb = emb_rows[e_inv[n_in:]]  # [C, E]
            logits = torch.tanh(h @ w["proj"].T + w["proj_b"]) @ cand_emb.T
        else:
            out_rows = self._out[o_ids].requires_grad_(True)
            logits = h @ out_rows[o_inv].T
            if self.mean_items:
                cand_emb = emb_rows[e_inv[n_in:]]
        if self.mean_items:
            logits = logits + self._session_mean(x_all, valid) @ cand_emb.T
        logits = logits + bias_rows[o_inv, 0]  # [B, C]
        own = torch.arange(B)
        dup = cand[None, :] == tgt[:, None]
        dup[own, own] = False
        wt = torch.from_numpy(weights.astype(np.float32))
        if self.loss == "ce":
            if self.logq:
                with torch.no_grad():
                    pop = self._count[:n] + 1.0
                    expected = B * pop[cand] / pop.sum() + self.negatives * self._pow[cand] / self._pow[:n].sum()
                    correction = self.logq * torch.log(expected)
                logits = logits - correction[None, :]
            logits = logits.masked_fill(dup, float("-inf"))
            loss = torch.nn.functional.cross_entropy(logits, own, reduction="none")
        else:  # BPR-max over the other candidates
            pos = logits[own, own][:, None]
            neg_mask = dup.clone()
            neg_mask[own, own] = True
            has_neg = ~neg_mask.all(1)  # tiny vocabularies: every candidate may be the target
            neg_mask[~has_neg] = False
            wt = wt * has_neg
            sm = torch.softmax(logits.masked_fill(neg_mask, float("-inf")), dim=1)
            loss = -torch.log((sm * torch.sigmoid(pos - logits)).sum(1) + 1e-24) + self.bpreg * (sm * logits.masked_fill(neg_mask, 0.0) ** 2).sum(1)
        if not float(wt.sum()) > 0:
            return
        loss = (loss * wt).sum() / wt.sum()
        self._w.grad = None
        shared = self.shared_embedding
        params = [self._w, emb_rows, bias_rows] + ([] if shared else [out_rows])
        grads = torch.autograd.grad(loss, params)
        lr, eps = self.lr, 1e-10
        with torch.no_grad():
            g = grads[0]
            self._w_acc += g * g
            self._w -= lr * g / (self._w_acc.sqrt() + eps)
            E, D = self.embedding, self._out_width
            self._sparse_step(self._emb, emb_rows, grads[1], e_ids, 0, E, self.emb_lr)
            self._sparse_step(self._bias, bias_rows, grads[2], o_ids, E + D, E + D + 1, lr)
            if not shared:
                self._sparse_step(self._out, out_rows, grads[3], o_ids, E, E + D, lr)
        self._changed_items.update(o_ids.tolist())
        self._changed_items.update(e_ids.tolist())

    def _sparse_step(self, table: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, ids: torch.Tensor, a: int, b: int,
                     lr: float) -> None:
        """Adagrad on rows `ids` of `table`, accumulators in columns a:b of `item_acc`."""
        acc = self._acc[ids, a:b] + grad * grad
        self._acc[ids, a:b] = acc
        table[ids] = rows.detach() - lr * grad / (acc.sqrt() + 1e-10)

    def similarity_vectors(self) -> np.ndarray:
        """The input item embeddings [n_items, embedding]."""
        return self._emb[: self._n].numpy()

    # -- state ---------------------------------------------------------------------------
    def export_state(self) -> dict[str, np.ndarray]:
        n, E = self._n, self.embedding
        rng = self._gen.get_state().numpy().astype(np.float64)
        meta = np.concatenate([[float(self._stamp), float(self._events), float(self._batches)], rng])[None, :]
        return {
            "item_emb": self._emb[:n].numpy(),
            "item_out": self._out[:n].numpy(),
            "item_bias": self._bias[:n].numpy(),
            "item_acc": self._acc[:n].numpy(),
            "item_count": self._count[:n, None].numpy(),
            "session": self._sess.data,
            "weights": torch.stack([self._w.detach(), self._w_acc]).numpy(),
            "meta": meta,
        }

    def import_state(self, state: dict[str, np.ndarray]) -> None:
        E, D = self.embedding, self._out_width
        n = max(len(state[k]) for k in ("item_emb", "item_out", "item_bias", "item_acc", "item_count"))
        self._n = 0
        self._cap = 0
        self._emb = torch.zeros(0, E)
        self._out = torch.zeros(0, D)
        self._bias = torch.zeros(0, 1)
        self._acc = torch.zeros(0, E + D + 1)
        self._count = torch.zeros(0)
        self._pow = torch.zeros(0)
        self._ensure_items(n)

        def put(dst: torch.Tensor, src: np.ndarray) -> None:
            src = np.asarray(src, np.float32)
            if src.ndim == 1:
                src = src[:, None]
            r, c = min(len(src), len(dst)), min(src.shape[1], dst.shape[1])
            dst[:r, :c] = torch.from_numpy(np.ascontiguousarray(src[:r, :c]))

        put(self._emb[:n], state["item_emb"])
        put(self._out[:n], state["item_out"])
        put(self._bias[:n], state["item_bias"])
        put(self._acc[:n], state["item_acc"])
        # rows a store never wrote come back as zeros: initialise them as new ids
        emb_in = np.asarray(state["item_emb"])
        acc_in = np.asarray(state["item_acc"])
        if len(emb_in) and len(acc_in):
            r = min(len(emb_in), len(acc_in))
            blank = np.flatnonzero(~emb_in[:r].any(axis=1) & ~acc_in[:r].any(axis=1))
            if len(blank):
                self._reset_items(blank)
        count = np.asarray(state["item_count"], np.float32).reshape(len(state["item_count"]), -1)[:, 0]
        self._count[: len(count)] = torch.from_numpy(count)
        self._pow[:n] = (self._count[:n] + 1.0) ** self.alpha
        weights = np.asarray(state["weights"], np.float32)
        with torch.no_grad():
            self._w.copy_(torch.from_numpy(weights[0]))
            self._w_acc = torch.from_numpy(weights[1].copy())
        meta = np.asarray(state["meta"], np.float64).ravel()
        self._stamp, self._events, self._batches = int(meta[0]), int(meta[1]), int(meta[2])
        if len(meta) > 3:
            self._gen.set_state(torch.from_numpy(meta[3:].astype(np.uint8)))
        sess = np.asarray(state["session"], np.float64)
        width = 1 + self._keep + 2 * self.hidden
        if sess.shape[1] != width:  # another hidden size: the states are useless, keep none
            sess = np.zeros((len(sess), width))
        self._sess.load(sess)
        live = np.flatnonzero(sess[:, 0] > 0)
        live = live[np.argsort(sess[live, 0], kind="stable")]
        self._evicted = set(live[: -self.max_sessions].tolist()) if len(live) > self.max_sessions else set()
        self._retiring = set()
        if self._evicted:
            self._sess.reset(live[: -self.max_sessions])
            live = live[-self.max_sessions :]
        self._lru = OrderedDict((int(s), None) for s in live)
        self._changed_items.clear()
        self._changed_sessions.clear()
        self._version += 1
        self._cache = None

    def drain_changes(self) -> dict[str, np.ndarray | None]:
        items = np.fromiter(self._changed_items, np.int64)
        sessions = np.fromiter(self._changed_sessions, np.int64)
        self._changed_items.clear()
        self._changed_sessions.clear()
        return {"item_emb": items, "item_out": items, "item_bias": items, "item_acc": items, "item_count": items,
                "session": sessions, "weights": None, "meta": None}

    def forget(self, kind: TableKind, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        if kind == "item":
            ids = ids[(ids >= 0) & (ids < self._n)]
            if len(ids):
                self._reset_items(ids)
        elif kind == "session":
            ids = ids[(ids >= 0) & (ids < self._sess.n)]
            self._sess.reset(ids)
            for s in ids.tolist():
                self._lru.pop(s, None)
            self._retiring.difference_update(ids.tolist())
            self._evicted.difference_update(ids.tolist())
        self._version += 1
        self._cache = None

    def evicted(self, kind: TableKind, ids: np.ndarray) -> np.ndarray:
        """Sessions among `ids` whose state this model dropped (beyond `max_sessions`) but the store keeps."""
        if kind != "session" or not self._evicted:
            return np.zeros(0, np.int64)
        return np.array([s for s in ids.tolist() if s in self._evicted], np.int64)

    def import_rows(self, table: str, ids: np.ndarray, values: np.ndarray) -> None:
        """Take back evicted session states read from the store (`values`: their stored rows, zeros
        for a state the store no longer has: that session starts afresh)."""
        if table != "session" or not len(ids):
            return
        width = self._sess.width
        rows = np.zeros((len(ids), width))
        rows[:, : min(width, values.shape[1])] = values[:, :width]
        self._sess.ensure(int(ids.max()) + 1)
        self._sess.data[ids] = rows
        for s in ids.tolist():
            self._evicted.discard(s)
            self._lru[s] = None
        while len(self._lru) > self.max_sessions:
            self._retiring.add(self._lru.popitem(last=False)[0])
        self._version += 1
        self._cache = None

    def session_items(self, session: int) -> np.ndarray:
        """The session's last `max(bptt, mean_items)` items, oldest first."""
        _, _, win = self._gather_sessions(np.array([session], np.int64))
        return win[0][win[0] >= 0]

    def hidden_state(self, session: int) -> np.ndarray:
        """The session's current hidden state (zeros when it has none)."""
        h, _, _ = self._gather_sessions(np.array([session], np.int64))
        return h[0].copy()
