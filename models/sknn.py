"""Session-kNN: the next item is what recent similar sessions went on to contain.

For a session with recent items q_1..q_m (the last `query_len`, later ones
weighted more: w_p = p / m), candidate neighbours are the `sample_size` most
recently active other sessions that share an item with it (found through an
item -> recent sessions index). A candidate n has similarity

    sim(n) = sum over q_p in n of w_p / sqrt(|n|)

and the `k` most similar vote for their items with weight sim(n);
popularity (`pop_weight` times the item's share) breaks ties and covers
sessions without neighbours.

State: the last `max_sessions` sessions, live or ended, each in a slot of its own (an "own" table
recycled oldest first, so ended sessions stay neighbours after their session rows expire): a recency
stamp, then its last `max_session_len` distinct items; each live session's slot (a "session" table);
item counts (an "item" table); and the stamp and slot counters (blob). The item index is derived
from the slots and rebuilt, after an import, when first needed.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from models.base import Batch, Model, Sharing, TableKind
from models.rows import Changes, RowTable, shares


class SessionKNN(Model):
    """Session-based k nearest neighbours (V-SkNN flavour) over recent sessions."""

    name = "sknn"
    query = "session"
    sequential = True
    alike_without_session = True
    tables: ClassVar[dict[str, TableKind]] = {
        "items": "own",  # [n_slots, 1 + max_session_len]: stamp (0 = empty), then item ids + 1, 0 pads, newest last
        "slot": "session",  # [n_sessions, 1] the live session's slot + 1 (0: none yet)
        "count": "item",  # [n_items, 1] event counts
        "meta": "blob",  # [[stamp counter, slots handed out]]
    }
    shared: ClassVar[dict[str, Sharing]] = {"count": "sum"}

    def __init__(self, k: int = 100, sample_size: int = 1000, max_session_len: int = 100, query_len: int = 10,
                 sessions_per_item: int = 1000, max_sessions: int = 20_000, pop_weight: float = 1e-3, seed: int = 0):
        super().__init__()
        self.k = k
        self.sample_size = sample_size
        self.max_session_len = max_session_len
        self.query_len = query_len
        self.sessions_per_item = sessions_per_item
        self.max_sessions = max_sessions
        self.pop_weight = pop_weight
        self.seed = seed
        self._items_changed, self._sessions_changed, self._slots_changed = Changes(), Changes(), Changes()
        # ids + 1: a zero row is empty
        self._items = self._table("items", RowTable(1 + max_session_len, np.float64, 0.0), self._slots_changed)
        self._slot = self._table("slot", RowTable(1, np.float64, 0.0), self._sessions_changed)
        self._count = self._table("count", RowTable(1, np.float64, 0.0), self._items_changed)
        self._stamp = 0
        self._handed = 0  # slots handed out so far; the next is `_handed % max_sessions`
        self._blob("meta", lambda: np.array([[float(self._stamp), float(self._handed)]]), self._load_meta)
        # [item -> slots holding it, least recent first], or [None] until first used after an import; a list,
        # so the copies `narrowed` makes (which share the slots) share it too
        self._index_box: list[dict[int, dict[int, None]] | None] = [{}]
        self._owner: dict[int, int] = {}  # slot -> the live session in it

    # -- helpers -------------------------------------------------------------------------
    @property
    def _index(self) -> dict[int, dict[int, None]]:
        """The item -> recent slots index, rebuilt from the slots the first time it is needed after an
        import (a lookup server's views mostly answer queries without a session, which never need it)."""
        index = self._index_box[0]
        if index is None:
            index = self._index_box[0] = self._rebuilt_index()
        return index

    def _slot_of(self, s: int) -> int:
        """Session s's slot, -1 when it has none."""
        return int(self._slot.data[s, 0]) - 1 if 0 <= s < self._slot.n else -1

    def _new_slot(self, s: int) -> int:
        """A slot for session s: the next one round the ring, its earlier session (ended or not) dropped."""
        v = self._handed % self.max_sessions
        self._handed += 1
        table = self._items.ensure(max(self._items.n, v + 1))
        for i in _items_in(table[v, 1:]).tolist():
            idx = self._index.get(i)
            if idx is not None:
                idx.pop(v, None)
        table[v] = 0.0
        old = self._owner.pop(v, None)
        if old is not None:  # a session still live when its slot came round again starts afresh
            self._slot.data[old, 0] = 0.0
            self._sessions_changed.mark([old])
        self._owner[v] = s
        self._slot.data[s, 0] = v + 1
        self._sessions_changed.mark([s])
        return v

    def _row(self, v: int) -> np.ndarray:
        return self._items.data[v] if 0 <= v < self._items.n else np.zeros(1 + self.max_session_len)

    def session_items(self, session: int) -> np.ndarray:
        """The session's last `max_session_len` distinct items, oldest first."""
        return _items_in(self._row(self._slot_of(session))[1:])

    def _index_add(self, item: int, v: int) -> None:
        slots = self._index.get(item)
        if slots is None:
            slots = self._index[item] = {}
        slots.pop(v, None)
        slots[v] = None
        if len(slots) > self.sessions_per_item:
            del slots[next(iter(slots))]

    def _append(self, s: int, item: int) -> None:
        """Add `item` to session `s` (moving it to the end when already there).

        Every item of the session then moves its slot to the end of its index entry, so each
        entry is ordered by stamp and holds the `sessions_per_item` most recently active
        sessions containing the item: the same index `_rebuilt_index` makes after an import.
        """
        v = self._slot_of(s)
        if v < 0:
            v = self._new_slot(s)
        row = self._items.data[v]
        self._stamp += 1
        row[0] = self._stamp
        seq = row[1:]
        code = item + 1
        hit = np.flatnonzero(seq == code)
        if len(hit):
            seq[hit[0] :] = np.append(seq[hit[0] + 1 :], code)
        else:
            dropped = int(seq[0]) - 1
            seq[:-1] = seq[1:]
            seq[-1] = code
            if dropped >= 0:
                idx = self._index.get(dropped)
                if idx is not None:
                    idx.pop(v, None)
        for i in _items_in(seq).tolist():
            self._index_add(i, v)
        self._slots_changed.mark([v])

    def _query_items(self, batch: Batch, rows: np.ndarray) -> list[np.ndarray]:
        """Each row's session items so far (state, then this batch's earlier rows), oldest first."""
        want = {int(r) for r in rows.tolist()}
        extra: dict[int, list[int]] = {}
        out: dict[int, np.ndarray] = {}
        for j, (s, i) in enumerate(zip(batch.sessions.tolist(), batch.items.tolist())):
            if j in want:
                seq = self.session_items(s)
                more = extra.get(s)
                if more:
                    seq = np.concatenate([seq[~np.isin(seq, more)], np.array(more[-self.max_session_len :], np.int64)])
                out[j] = seq
            if i >= 0:
                lst = extra.setdefault(s, [])
                if i in lst:
                    lst.remove(i)
                lst.append(i)
        return [out[int(r)] for r in rows.tolist()]

    # -- Model ---------------------------------------------------------------------------
    def learn(self, batch: Batch) -> None:
        if (with_items := batch.with_items()) is None:
            return
        batch = with_items
        count = self._count.ensure(batch.n_items)
        self._slot.ensure(max(batch.n_sessions, int(batch.sessions.max()) + 1))
        np.add.at(count[:, 0], batch.items, batch.weights.astype(np.float64))
        for s, i in zip(batch.sessions.tolist(), batch.items.tolist()):
            self._append(s, i)
        self._items_changed.mark(batch.items)

    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        n = batch.n_items
        out = shares(self._count, n, len(rows), self.pop_weight)  # [R, n_items]
        table = self._items.data
        for r, (row, seq) in enumerate(zip(rows.tolist(), self._query_items(batch, rows))):
            q = seq[-self.query_len :]
            if len(q) == 0:
                continue
            me = self._slot_of(int(batch.sessions[row]))
            cand: set[int] = set()
            for i in q.tolist():
                cand.update(self._index.get(i, ()))
            cand.discard(me)
            if not cand:
                continue
            cand_arr = np.sort(np.fromiter(cand, np.int64, len(cand)))
            if len(cand_arr) > self.sample_size:
                stamps = table[cand_arr, 0]
                cand_arr = cand_arr[np.argpartition(-stamps, self.sample_size)[: self.sample_size]]
            m = table[cand_arr, 1:] - 1  # [C, L] item ids, -1 pads
            w = np.arange(1, len(q) + 1, dtype=np.float64) / len(q)  # [m]
            present = (m[:, :, None] == q[None, None, :]).any(axis=1)  # [C, m]
            length = (m >= 0).sum(axis=1)
            sim = (present @ w) / np.sqrt(np.maximum(length, 1))  # [C]
            if len(sim) > self.k:
                top = np.argpartition(-sim, self.k)[: self.k]
                m, sim = m[top], sim[top]
            ids = m.astype(np.int64)
            ok = (ids >= 0) & (ids < n)
            votes = np.broadcast_to(sim[:, None], ids.shape)[ok]
            out[r] += np.bincount(ids[ok], weights=votes, minlength=n)[:n]
        return out

    def _load_meta(self, meta: np.ndarray) -> None:
        meta = np.asarray(meta).ravel()
        self._stamp = int(meta[0])
        self._handed = int(meta[1]) if len(meta) > 1 else 0

    def import_state(self, state: dict[str, np.ndarray]) -> None:
        """Slot rows of another length are fitted to `max_session_len` (newest items kept, pads first);
        the item index and the slots' live sessions are rebuilt from them."""
        items = np.asarray(state["items"], np.float64)
        if items.shape[1] > 1 + self.max_session_len:  # keep the newest items
            items = np.concatenate([items[:, :1], items[:, -self.max_session_len :]], axis=1)
        elif items.shape[1] < 1 + self.max_session_len:  # right-align: pads go first
            pad = np.zeros((len(items), 1 + self.max_session_len - items.shape[1]))
            items = np.concatenate([items[:, :1], pad, items[:, 1:]], axis=1)
        super().import_state({**state, "items": items})
        self._index_box = [None]  # rebuilt when first needed
        slots = self._slot.data[:, 0].astype(np.int64) - 1
        self._owner = {int(slots[s]): s for s in np.flatnonzero(slots >= 0).tolist()}

    def _rebuilt_index(self) -> dict[int, dict[int, None]]:
        """The item index of the slots: each item's `sessions_per_item` most recently stamped slots holding
        it, least recent first (what `_append` keeps up), sorted at once rather than added pair by pair."""
        data = self._items.data
        order = np.argsort(data[:, 0], kind="stable")
        order = order[data[order, 0] > 0]  # [S] filled slots, least recent first
        items = (data[order, 1:] - 1).astype(np.int64).ravel()  # [S * L] slot by slot
        slots = np.repeat(order, data.shape[1] - 1)
        held = items >= 0
        items, slots = items[held], slots[held]
        by_item = np.argsort(items, kind="stable")  # each item's slots, still least recent first
        items, slots = items[by_item], slots[by_item]
        firsts = np.flatnonzero(np.r_[True, items[1:] != items[:-1]])
        ends = np.r_[firsts[1:], len(items)]
        cap = self.sessions_per_item
        return {item: dict.fromkeys(slots[max(a, b - cap) : b].tolist())
                for item, a, b in zip(items[firsts].tolist(), firsts.tolist(), ends.tolist())}

    def reserve_items(self, n: int) -> None:
        self._count.ensure(n)
        self._items_changed.flags.ensure(n)

    def forget(self, kind: TableKind, ids: np.ndarray) -> None:
        """An expired session leaves its slot as it is: ended sessions stay neighbours until their slot
        comes round again. An expired item leaves every slot."""
        ids = np.asarray(ids, np.int64)
        if kind == "session":
            ids = ids[(ids >= 0) & (ids < self._slot.n)]
            for s in ids.tolist():
                self._owner.pop(self._slot_of(s), None)
            self._slot.reset(ids)
        elif kind == "item":
            self._count.reset(ids)
            for i in ids.tolist():
                for v in self._index.pop(i, {}):
                    seq = self._items.data[v, 1:]
                    seq[seq == i + 1] = 0.0
                    self._slots_changed.mark([v])


def _items_in(codes: np.ndarray) -> np.ndarray:
    """The item ids of a slot's item codes (id + 1, 0 pads), oldest first."""
    return (codes[codes > 0] - 1).astype(np.int64)
