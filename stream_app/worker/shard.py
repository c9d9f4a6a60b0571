"""One partition's shard: its models, vocabularies, evaluator, dedup window and pending changes.

Each Kafka partition of `events` is a shard; its state lives under the partition's Redis hash tag
together with the next offset to read (see `stream_app.io.redis`).
"""

from __future__ import annotations

import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from models.base import Model, TableKind
from models.features import Featurizer, Vocab
from models.registry import create
from stream_app.core.errors import (
    InvalidEvent,
)
from stream_app.core.events import Event, check_clock_skew, decode
from stream_app.evaluation.prequential import Evaluator, restore, step
from stream_app.io import kafka
from stream_app.io.redis import Changes, PartitionStore
from stream_app.worker.config import WorkerConfig
from stream_app.worker.items import SharedItems

HISTORY = 50  # recent (item, event type) pairs kept per user for exclusion and reasons
STEPS = ("decode", "featurize", "evaluate", "learn", "history", "commit")  # of `Shard.process`, timed


def _tick(clock: dict[str, float], step: str, since: float) -> float:
    """Add the time since `since` to `step`; returns now."""
    now = time.perf_counter()
    clock[step] += now - since
    return now


@dataclass
class _Pending:
    """What a shard has learned since its last commit."""

    events: int = 0
    folded: bool = False  # the other partitions' item changes were folded in (shared items)
    next_offset: int | None = None
    since: float | None = None  # when the first of them was learned (monotonic)
    ids: dict[str, None] = field(default_factory=dict)  # new event ids, in order
    touched: set[int] = field(default_factory=set)  # user rows whose history changed
    ts: list[float] = field(default_factory=list)  # event times
    opened: dict[str, tuple[str, float]] = field(default_factory=dict)  # implicit sessions now open


class Shard:
    """One partition's models, vocabularies, evaluator and dedup window."""

    def __init__(self, store: PartitionStore, config: WorkerConfig, seconds: dict[str, float] | None = None,
                 partitions: int = 1):
        """`partitions`: how many the events topic has (the item logs a shard folds in, with shared items)."""
        self.store = store
        self.config = config
        self.featurizer = Featurizer(session_gap=config.session_gap)
        self.models: dict[str, Model] = {name: create(name, seed=config.seed) for name in config.models}
        self.evaluator = Evaluator(config.k, config.window, config.sample_rate, seed=config.seed + store.keys.partition)
        self.dedup: dict[str, None] = {}  # event ids of the dedup window, oldest first
        self._dedup_parts: deque[dict[str, None]] = deque()  # the ids of `dedup` in insertion runs, oldest first
        self.history: dict[int, array] = {}  # user row -> (item, event type) pairs, the last HISTORY after a commit
        self.offset: int | None = None  # next offset to learn
        self.committed: int | None = None  # next offset to learn after a restart (in Redis)
        self.pending = _Pending()
        self.commit_seconds = 0.0  # how long the last commit took
        self.version = 0
        self.last_ts = np.zeros(0)  # event times of the last commit (freshness)
        self.stream_time = -float("inf")  # the latest event time learned since the shard was loaded
        self._expired_at = -float("inf")
        self.seconds = dict.fromkeys(STEPS, 0.0) if seconds is None else seconds  # wall time per step
        self.shared = (SharedItems(store, self.models, self.featurizer, partitions, self.evaluator.know)
                       if config.shared_items else None)

    def resume(self) -> int | None:
        """Claim the partition and load its state; returns the offset to seek to."""
        self.store.claim()
        snap = self.store.load(self.models)
        f = self.featurizer
        for kind, vocab in (("user", f.users), ("item", f.items), ("session", f.sessions), ("context", f.contexts)):
            vocab.restore(snap.vocabs[kind])
        f.open_sessions.update(snap.open_sessions)
        for name, state in snap.models.items():
            self.models[name].import_state(state)
        self.dedup = dict.fromkeys(snap.dedup)
        self._dedup_parts = deque(dict.fromkeys(snap.dedup[s : s + 4096]) for s in range(0, len(snap.dedup), 4096))
        self.history = {u: array("i", h.ravel().tobytes()) for u, h in snap.history.items()}
        restore(
            self.evaluator,
            np.fromiter(f.items.index.values(), np.int64, len(f.items.index)),
            {u: h[:, 0] for u, h in snap.history.items()},
        )
        if self.shared is not None:
            self.shared.loaded(snap.cursors)
        self.offset = self.committed = snap.offset
        return snap.offset

    def _expire(self, now: float) -> dict[str, np.ndarray]:
        """Expire idle sessions (and users and items with `idle_expiry`), at most once per session gap
        of stream time; models, evaluator and histories forget them. Returns the freed rows per kind."""
        if now - self._expired_at < self.config.session_gap:
            return {}
        self._expired_at = now
        f = self.featurizer
        plan: list[tuple[TableKind, Vocab, float]] = [("session", f.sessions, self.config.session_gap)]
        if self.config.idle_expiry is not None:
            plan.append(("user", f.users, self.config.idle_expiry))
            if self.shared is None:  # shared items are never expired: their rows are every shard's
                plan.append(("item", f.items, self.config.idle_expiry))
        freed: dict[str, np.ndarray] = {}
        for kind, vocab, idle in plan:
            rows = vocab.expire(now - idle)
            if len(rows):
                for model in self.models.values():
                    model.forget(kind, rows)
                self.evaluator.forget(kind, rows)
                freed[kind] = rows
        for user in freed.get("user", np.zeros(0, np.int64)).tolist():
            self.history.pop(user, None)
        return freed

    def process(self, messages: kafka.Messages, dead_letter: Callable[[kafka.Record, str], None]) -> int:
        """Evaluate and learn `messages` in micro-batches of `batch_size`; `commit` makes them
        durable. Returns the events learned."""
        clock, pending = self.seconds, self.pending
        t = time.perf_counter()
        events, new_ids = self._decode(messages, dead_letter)
        t = _tick(clock, "decode", t)
        f = self.featurizer
        if self.shared is not None:  # the rows of a whole poll's new items and context values in two calls
            f.items.prefetch(e.item_id for e in events)
            f.contexts.prefetch(k for e in events for k in f.context_keys(e.context, e.ts))
        size = self.config.batch_size
        for start in range(0, len(events), size):
            batch = f.batch(events[start : start + size])
            self._refill(batch)
            t = _tick(clock, "featurize", t)
            if self.shared is None:
                step([self.evaluator], batch, self.models, clock)  # each row scored just before it is learned
            else:
                self.shared.reserve(batch.n_items)
                scales = self.shared.scales()
                step([self.evaluator], batch, self.models, clock)
                self.shared.rescaled(scales)
            t = time.perf_counter()
            users, history = batch.users.tolist(), self.history
            for u, i, e in zip(users, batch.items.tolist(), batch.event_types.tolist()):
                h = history.get(u)
                if h is None:
                    h = history[u] = array("i")
                h.append(i)  # flat (item, event type) pairs
                h.append(e)
            pending.touched.update(users)
            t = _tick(clock, "history", t)
        if pending.since is None:
            pending.since = time.monotonic()
        pending.next_offset = messages.next_offset
        pending.events += len(events)
        pending.ids.update(new_ids)
        pending.ts += [e.ts for e in events]
        if events:
            self.stream_time = max(self.stream_time, max(e.ts for e in events))
        pending.opened.update((e.user_id, f.open_sessions[e.user_id]) for e in events if e.session_id is None)
        self.offset = pending.next_offset
        if new_ids:
            self.dedup.update(new_ids)
            self._dedup_parts.append(new_ids)
            # Drop the oldest runs while `dedup_window` ids remain (a plain dict: cheaper than an OrderedDict).
            parts = self._dedup_parts
            while len(self.dedup) - len(parts[0]) >= self.config.dedup_window:
                for event_id in parts.popleft():
                    del self.dedup[event_id]
        return len(events)

    def fold(self) -> int:
        """Fold the other partitions' changes to the shared items in; they reach Redis with the next commit,
        which they make due. Returns the log entries folded."""
        if self.shared is None:
            return 0
        folded = self.shared.fold()
        if folded:
            self.pending.folded = True
            if self.pending.since is None:
                self.pending.since = time.monotonic()
        return folded

    def _refill(self, batch) -> None:
        """Give models back, from Redis, the session states of this batch that their LRU dropped."""
        sessions = None
        for name, model in self.models.items():
            for table, kind in model.tables.items():
                if kind != "session":
                    continue
                sessions = np.unique(batch.sessions) if sessions is None else sessions
                rows = model.evicted(kind, sessions)
                if len(rows):
                    model.import_rows(table, rows, self.store.session_rows_of(name, table, rows))

    def commit(self) -> int:
        """Write everything learned since the last commit, with the next offset, in one atomic
        Redis write; returns the events committed."""
        pending, f = self.pending, self.featurizer
        if pending.next_offset is None and not pending.folded:
            return 0
        t = time.perf_counter()
        tables: list = []
        shared: list = []  # the changed rows of shared item tables
        for name, model in self.models.items():
            state = model.export_state()
            for table, ids in model.drain_changes().items():
                values = state[table] if ids is None else state[table][ids]
                tables.append((name, table, model.tables[table], ids, values))
                if ids is not None and table in model.shared and len(ids):
                    shared.append((name, table, ids, values))
        ts = np.array(pending.ts, np.float64)  # [n]
        expired = self._expire(float(ts.max())) if len(ts) else {}
        vocab_new, vocab_removed = {}, {}
        for kind, vocab in (("user", f.users), ("item", f.items), ("session", f.sessions), ("context", f.contexts)):
            vocab_new[kind], vocab_removed[kind] = vocab.drain()
        history = {}  # user row -> its last HISTORY pairs, for the users this commit touched
        for u in pending.touched:
            h = self.history.get(u)
            if h is not None:  # None: expired since
                del h[: -2 * HISTORY]
                history[u] = h.tobytes()
        changes = Changes(
            next_offset=pending.next_offset,
            applied=pending.events,
            vocab_new=vocab_new,
            vocab_removed=vocab_removed,
            open_sessions=pending.opened,
            dedup=list(pending.ids),
            history=history,
            tables=tables,
            expired=expired,
        )
        if self.shared is not None:
            changes.item_log = self.shared.publish(shared)
            changes.cursors = dict(self.shared.cursors)
            changes.log_trim = self.shared.trim()
        self.version = self.store.commit(changes)
        if pending.next_offset is not None:
            self.committed = pending.next_offset
        self.last_ts = ts
        self.pending = _Pending()
        self.commit_seconds = _tick(self.seconds, "commit", t) - t
        return changes.applied

    def _decode(self, messages: kafka.Messages, dead_letter: Callable[[kafka.Record, str], None]
                ) -> tuple[list[Event], dict[str, None]]:
        """Valid, not yet seen events of `messages` in order (dead letters for the rest), and their new ids.

        An event whose `ts` is more than `max_clock_skew` ahead of this host's clock is not valid: it
        would move the decayed models' clocks into the future (see `check_clock_skew`)."""
        valid: list[Event] = []
        now, skew = time.time(), self.config.max_clock_skew
        latest = now + skew if skew is not None else float("inf")
        for j, raw in enumerate(messages.values):
            try:
                event = decode(raw)
                if event.ts > latest:
                    check_clock_skew(event.ts, now, skew)
                valid.append(event)
            except InvalidEvent as exc:
                dead_letter(messages.record(j), str(exc))
        given = dict.fromkeys([e.event_id for e in valid])
        seen = self.dedup
        if len(given) == len(valid) and None not in given and seen.keys().isdisjoint(given):
            return valid, cast(dict[str, None], given)  # the common case: every id new, and given once
        events: list[Event] = []
        new_ids: dict[str, None] = {}
        for event in valid:
            event_id = event.event_id
            if event_id is not None:
                if event_id in seen or event_id in new_ids:
                    continue
                new_ids[event_id] = None
            events.append(event)
        return events, new_ids
