"""GRU4Rec's per-session states: stored rows with a bound on those kept in memory, and the compiled
GRU steps that advance them (through a batch in stream order, or one event at a time)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from numba import njit

from models.kernels import FAST
from models.rows import Changes, RowTable


@njit(cache=True, fastmath=FAST, error_model="numpy")
def input_gates(x, w_ih, b_ih, xg):  # pragma: no cover - numba
    """xg [3H] = W_ih x + b_ih for the input x [E]."""
    for g in range(xg.shape[0]):
        acc = b_ih[g]
        for m in range(x.shape[0]):
            acc += w_ih[g, m] * x[m]
        xg[g] = acc


@njit(cache=True, fastmath=FAST, error_model="numpy")
def gru_step(xg, h, w_hh, b_hh, gh, out):  # pragma: no cover - numba
    """out = GRUCell step from state h [H] with input gates xg = W_ih x + b_ih (gates r, z, n);
    keeps gh [3H] = W_hh h + b_hh for a backward pass."""
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


@njit(cache=True, fastmath=FAST, error_model="numpy")
def advance(u, item, h, h_back, win, k, emb, dense, xg, gh, new):  # pragma: no cover - numba
    """Session u takes `item`: h [U, H] steps through it, it joins the last items win [U, L] (-1 pads,
    newest last), whose last k are the BPTT window; h_back [U, H] is the state before that window's
    first item, so an item leaving the window advances h_back through it. dense = (w_ih, w_hh, b_ih,
    b_hh); xg, gh [3H] and new [H] are work space."""
    w_ih, w_hh, b_ih, b_hh = dense
    L = win.shape[1]
    old = win[u, L - k]
    if old >= 0:  # the window is full: its oldest item leaves it
        input_gates(emb[old], w_ih, b_ih, xg)
        gru_step(xg, h_back[u], w_hh, b_hh, gh, new)
        h_back[u] = new
    for p in range(L - 1):
        win[u, p] = win[u, p + 1]
    win[u, L - 1] = item
    input_gates(emb[item], w_ih, b_ih, xg)
    gru_step(xg, h[u], w_hh, b_hh, gh, new)
    h[u] = new


@njit(cache=True, fastmath=FAST, error_model="numpy")
def gru_scan(inv, items, h, h_back, win, k, emb, dense, pre_h, pre_h_back, pre_win):  # pragma: no cover - numba
    """Rows in stream order: record the state of each row's session u = inv[j] (pre_*), then
    `advance` it with the row's item (none for -1)."""
    H = h.shape[1]
    xg = np.empty(3 * H, np.float32)
    gh = np.empty(3 * H, np.float32)
    new = np.empty(H, np.float32)
    for j in range(len(inv)):
        u = inv[j]
        pre_h[j] = h[u]
        pre_h_back[j] = h_back[u]
        pre_win[j] = win[u]
        if items[j] >= 0:
            advance(u, items[j], h, h_back, win, k, emb, dense, xg, gh, new)


class SessionStates:
    """Each session's state as a row `[stamp, last L items + 1, h, h_back]` (all 0: none).

    At most `max_sessions` states stay in memory, the least recently used dropped: a state beyond
    the bound retires once its latest change has been drained (so stored), and is then `evicted`;
    the model's caller reads it back (`take_back`) when the session returns.
    """

    def __init__(self, hidden: int, keep: int, max_sessions: int):
        self.hidden, self.keep, self.max_sessions = hidden, keep, max_sessions
        self.rows = RowTable(1 + keep + 2 * hidden, np.float64, 0.0)
        self.changes = Changes()
        self.stamp = 0  # recency stamps handed out so far
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._retiring: set[int] = set()  # beyond max_sessions: dropped once their last change is drained
        self._evicted: set[int] = set()  # dropped from memory; their state lives on in the store

    def gather(self, sessions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """h, h_back [U, H] float32 and the last items [U, L] of each session (zeros/-1 when unknown)."""
        H, k = self.hidden, self.keep
        rows = np.zeros((len(sessions), 1 + k + 2 * H))
        ok = (sessions >= 0) & (sessions < self.rows.n)
        if ok.any():
            got = self.rows.data[sessions[ok]]
            live = got[:, 0] > 0
            idx = np.flatnonzero(ok)[live]
            rows[idx] = got[live]
        t = rows[:, 1 + k :].astype(np.float32)
        win = rows[:, 1 : 1 + k].astype(np.int64) - 1
        return np.ascontiguousarray(t[:, :H]), np.ascontiguousarray(t[:, H:]), np.ascontiguousarray(win)

    def store(self, sessions: np.ndarray, h: np.ndarray, h_back: np.ndarray, win: np.ndarray) -> None:
        """Write the states of `sessions` (unique), now the most recently used, and retire what the
        bound allows."""
        H, k = self.hidden, self.keep
        self.rows.ensure(int(sessions.max()) + 1)
        data = self.rows.data
        data[sessions, 0] = self.stamp + 1 + np.arange(len(sessions))
        self.stamp += len(sessions)
        data[sessions, 1 : 1 + k] = win + 1
        data[sessions, 1 + k : 1 + k + H] = h
        data[sessions, 1 + k + H :] = h_back
        for s in sessions.tolist():
            self._lru.pop(s, None)
            self._lru[s] = None
            self._retiring.discard(s)
        self.changes.mark(sessions)
        self._bound()
        retiring = np.fromiter(self._retiring, np.int64, len(self._retiring))
        done = retiring[~self.changes.marked(retiring)].tolist()
        if done:
            self.rows.reset(np.array(done, np.int64))
            self._evicted.update(done)
            self._retiring.difference_update(done)

    def _bound(self) -> None:
        while len(self._lru) > self.max_sessions:
            self._retiring.add(self._lru.popitem(last=False)[0])

    def loaded(self) -> None:
        """After `rows` were loaded from a store: the most recent live states are in memory, the rest evicted."""
        data = self.rows.data
        live = np.flatnonzero(data[:, 0] > 0)
        live = live[np.argsort(data[live, 0], kind="stable")]
        self._evicted = set(live[: -self.max_sessions].tolist()) if len(live) > self.max_sessions else set()
        self._retiring = set()
        if self._evicted:
            self.rows.reset(live[: -self.max_sessions])
            live = live[-self.max_sessions :]
        self._lru = OrderedDict((int(s), None) for s in live)

    def forget(self, ids: np.ndarray) -> None:
        ids = ids[(ids >= 0) & (ids < self.rows.n)]
        self.rows.reset(ids)
        for s in ids.tolist():
            self._lru.pop(s, None)
        self._retiring.difference_update(ids.tolist())
        self._evicted.difference_update(ids.tolist())

    def evicted(self, ids: np.ndarray) -> np.ndarray:
        """Sessions among `ids` whose state was dropped from memory but the store keeps."""
        if not self._evicted:
            return np.zeros(0, np.int64)
        return np.array([s for s in ids.tolist() if s in self._evicted], np.int64)

    def take_back(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Evicted states as the store holds them (zeros: no longer kept, so the session starts afresh)."""
        width = self.rows.width
        rows = np.zeros((len(ids), width))
        rows[:, : min(width, values.shape[1])] = values[:, :width]
        self.rows.ensure(int(ids.max()) + 1)
        self.rows.data[ids] = rows
        for s in ids.tolist():
            self._evicted.discard(s)
            self._lru[s] = None
        self._bound()
