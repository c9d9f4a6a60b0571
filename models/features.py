"""Preprocessing shared by the worker and `streamrec evaluate`: id mapping and features.

`Vocab` maps external string ids to dense rows that grow as ids arrive and
can be expired when idle (their rows are handed out again). `Featurizer`
turns validated events into a `Batch`: event-type weights, session ids
(`session_id`, or the user's events split by an inactivity gap), and context
features (each context key=value, plus hour of day and day of week from `ts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol

import numpy as np

from models.base import EVENT_CODE, Batch


class EventLike(Protocol):
    user_id: str
    item_id: str
    event_type: str
    ts: float
    session_id: str | None
    value: float | None
    context: Mapping[str, Any]


@dataclass(frozen=True)
class RawEvent:
    """A plain `EventLike` for offline streams and tests (no validation, cheap to build)."""

    user_id: str
    item_id: str
    event_type: str
    ts: float
    session_id: str | None = None
    value: float | None = None
    context: Mapping[str, Any] = field(default_factory=dict)


class Vocab:
    """String id -> dense row, growing; idle ids can be expired and their rows reused."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.names: list[str | None] = []
        self.last_seen: list[float] = []
        self._free: list[int] = []
        self._new: dict[str, int] = {}
        self._removed: set[str] = set()

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> int:
        """The row of `key`, or -1 when unknown."""
        return self.index.get(key, -1)

    def add(self, key: str, ts: float = 0.0) -> int:
        """The row of `key`, handing out a new (or freed) row when unknown."""
        row = self.index.get(key)
        if row is None:
            if self._free:
                row = self._free.pop()
                self.names[row] = key
                self.last_seen[row] = ts
            else:
                row = len(self.names)
                self.names.append(key)
                self.last_seen.append(ts)
            self.index[key] = row
            self._new[key] = row
            self._removed.discard(key)
        elif ts > self.last_seen[row]:
            self.last_seen[row] = ts
        return row

    def expire(self, older_than: float) -> np.ndarray:
        """Free every id last seen before `older_than`; returns their rows."""
        stale = [r for r, (n, t) in enumerate(zip(self.names, self.last_seen)) if n is not None and t < older_than]
        for row in stale:
            name = self.names[row]
            del self.index[name]  # type: ignore[index]
            self.names[row] = None
            self._new.pop(name, None)  # type: ignore[arg-type]
            self._removed.add(name)  # type: ignore[arg-type]
        self._free.extend(stale)
        return np.asarray(stale, dtype=np.int64)

    def drain(self) -> tuple[dict[str, int], set[str]]:
        """Names added (name -> row) and names expired since the last call, for persistence."""
        new, removed = self._new, self._removed
        self._new, self._removed = {}, set()
        return new, removed

    def live(self) -> int:
        """How many ids are mapped now."""
        return len(self.index)

    def restore(self, mapping: Mapping[str, int]) -> None:
        """Rebuild from a saved name -> row mapping (rows not in it become free)."""
        size = max(mapping.values(), default=-1) + 1
        self.index = dict(mapping)
        self.names = [None] * size
        for name, row in mapping.items():
            self.names[row] = name
        self.last_seen = [0.0] * size
        self._free = [r for r, n in enumerate(self.names) if n is None]
        self._new, self._removed = {}, set()


_HOURS = tuple(f"hour={h}" for h in range(24))
_DAYS = tuple(f"dow={d}" for d in range(7))
DEFAULT_EVENT_WEIGHTS: tuple[tuple[str, float], ...] = (("click", 1.0), ("favorite", 2.0), ("purchase", 3.0))


@dataclass
class Featurizer:
    """Codes events into batches; owns the vocabularies and the open sessions.

    `session_gap` is the inactivity (seconds) that ends a user's implicit
    session when events carry no `session_id`.
    """

    event_weights: tuple[tuple[str, float], ...] = DEFAULT_EVENT_WEIGHTS
    session_gap: float = 1800.0
    time_features: bool = True
    max_context: int = 8
    users: Vocab = field(default_factory=Vocab)
    items: Vocab = field(default_factory=Vocab)
    sessions: Vocab = field(default_factory=Vocab)
    contexts: Vocab = field(default_factory=Vocab)
    open_sessions: dict[str, tuple[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._weight = dict(self.event_weights)

    def session_key(self, event: EventLike) -> str:
        """The session an event belongs to: its `session_id`, or the user's current run."""
        if event.session_id is not None:
            return "s:" + event.session_id
        key, last = self.open_sessions.get(event.user_id, ("", -math.inf))
        if not key or event.ts - last > self.session_gap:
            key = f"u:{event.user_id}:{int(event.ts)}"
        self.open_sessions[event.user_id] = (key, max(event.ts, last))
        return key

    def context_keys(self, context: Mapping[str, Any], ts: float) -> list[str | None]:
        """The context row as `key=value` strings: the event's own context padded with
        None to `max_context` entries, then the time features (hour of day, day of week)."""
        keys: list[str | None] = [f"{k}={_norm(v)}" for k, v in list(context.items())[: self.max_context]]
        keys.extend([None] * (self.max_context - len(keys)))
        if self.time_features:
            day, second = divmod(int(ts), 86400)
            keys.append(_HOURS[second // 3600])
            keys.append(_DAYS[(day + 3) % 7])  # 1970-01-01 was a Thursday (Monday = 0)
        return keys

    def batch(self, events: Iterable[EventLike]) -> Batch:
        """Code `events` (adding new ids to the vocabularies) into a batch."""
        events = list(events)
        users, items, sessions, ts, values, rows = [], [], [], [], [], []
        add_user, add_item, add_session, add_context = self.users.add, self.items.add, self.sessions.add, self.contexts.add
        for e in events:
            t = e.ts
            users.append(add_user(e.user_id, t))
            items.append(add_item(e.item_id, t))
            sessions.append(add_session(self.session_key(e), t))
            ts.append(t)
            values.append(math.nan if e.value is None else e.value)
            rows.append([-1 if key is None else add_context(key, t) for key in self.context_keys(e.context, t)])
        kinds = [e.event_type for e in events]
        return self._wrap(
            np.array(users, np.int64), np.array(items, np.int64), np.array(sessions, np.int64),
            np.array([EVENT_CODE[k] for k in kinds], np.int8),
            np.array([self._weight.get(k, 1.0) for k in kinds], np.float32),
            np.array(ts, np.float64), np.array(values, np.float32),
            np.array(rows, np.int64).reshape(len(events), self.max_context + (2 if self.time_features else 0)),
        )


    def query(self, user_id: str | None, context: Mapping[str, Any], ts: float, session_id: str | None = None) -> Batch:
        """A one-row batch (item -1) for a lookup; unknown ids and context values code as -1."""
        context_row = np.array([[-1 if k is None else self.contexts.get(k) for k in self.context_keys(context, ts)]])
        session = self.sessions.get("s:" + session_id) if session_id is not None else -1
        return self._wrap(
            np.array([self.users.get(user_id) if user_id else -1]), np.array([-1]), np.array([session]),
            np.zeros(1, np.int8), np.ones(1, np.float32), np.array([ts]), np.full(1, np.nan, np.float32), context_row,
        )

    def _wrap(self, *columns: np.ndarray) -> Batch:
        return Batch(
            *columns, len(self.users), len(self.items), len(self.sessions), len(self.contexts),
            2 if self.time_features else 0,
        )


def _norm(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
