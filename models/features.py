"""Preprocessing shared by the worker and `streamrec evaluate`: id mapping and features.

`Vocab` maps external string ids to dense rows that grow as ids arrive and
can be expired when idle (their rows are handed out again). `Featurizer`
turns validated events into a `Batch`: event-type weights, session ids
(`session_id`, or the user's events split by an inactivity gap), and context
features (each context key=value, plus hour of day and day of week from `ts`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Protocol

import numpy as np

from models.base import Batch
from stream_app.core.events import EVENT_CODE, EVENT_WEIGHTS


class EventLike(Protocol):
    """What the featurizer reads of an event (read-only, so `Event` and `RawEvent` both fit)."""

    @property
    def user_id(self) -> str: ...
    @property
    def item_id(self) -> str: ...
    @property
    def event_type(self) -> str: ...
    @property
    def ts(self) -> float: ...
    @property
    def session_id(self) -> str | None: ...
    @property
    def value(self) -> float | None: ...
    @property
    def context(self) -> Mapping[str, Any]: ...


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
    """String id -> dense row, growing; idle ids can be expired and their rows reused.

    With `resolve` set, rows come from elsewhere instead (one vocabulary that several shards share):
    it maps unknown ids to their rows, all of a batch in one call, and rows are never reused.
    """

    def __init__(self) -> None:
        self.resolve: Callable[[list[str]], list[int]] | None = None
        self.index: dict[str, int] = {}
        self.names: list[str | None] = []
        self._seen = np.zeros(16)  # [capacity] stream time each row was last seen
        self._free: list[int] = []
        self._new: dict[str, int] = {}
        self._removed: set[str] = set()

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    @property
    def last_seen(self) -> np.ndarray:  # [len(self)]
        return self._seen[: len(self.names)]

    def get(self, key: str) -> int:
        """The row of `key`, or -1 when unknown."""
        return self.index.get(key, -1)

    def put(self, key: str, row: int, ts: float = 0.0) -> None:
        """Map `key` to `row` (a row handed out elsewhere: see `resolve`); no-op when `key` is known."""
        if key in self.index:
            return
        if row >= len(self.names):
            self.names.extend([None] * (row + 1 - len(self.names)))
            if row >= len(self._seen):
                self._seen = np.concatenate([self._seen, np.zeros(max(row + 1, 2 * len(self._seen)) - len(self._seen))])
        self.names[row] = key
        self._seen[row] = ts
        self.index[key] = row
        self._new[key] = row
        self._removed.discard(key)

    def add(self, key: str, ts: float = 0.0) -> int:
        """The row of `key`, handing out a new (or freed) row when unknown."""
        row = self.index.get(key)
        if row is None and self.resolve is not None:
            self.put(key, self.resolve([key])[0], ts)
            return self.index[key]
        if row is None:
            if self._free:
                row = self._free.pop()
                self.names[row] = key
            else:
                row = len(self.names)
                self.names.append(key)
                if row == len(self._seen):
                    self._seen = np.concatenate([self._seen, np.zeros(row)])
            self._seen[row] = ts
            self.index[key] = row
            self._new[key] = row
            self._removed.discard(key)
        elif ts > self._seen[row]:
            self._seen[row] = ts
        return row

    def add_many(self, keys: list[str | None], ts: np.ndarray) -> np.ndarray:
        """Rows of `keys` (None codes as -1), adding unknown ones in order; `ts`: [len(keys)]."""
        rows = list(map(self.index.get, keys, repeat(-2)))  # type: ignore[arg-type]  # None is never a key: -2
        if -2 in rows and self.resolve is not None:
            self.prefetch([k for k, r in zip(keys, rows) if r == -2])
            rows = list(map(self.index.get, keys, repeat(-2)))  # type: ignore[arg-type]
        if -2 in rows:  # None, or unknown ids: added one by one, so a repeated new id gets one row
            for j, row in enumerate(rows):
                if row == -2:
                    key = keys[j]
                    rows[j] = -1 if key is None else self.add(key, float(ts[j]))
        out = np.array(rows, np.int64)
        known = out >= 0
        np.maximum.at(self._seen, out[known], ts[known])
        return out

    def prefetch(self, keys: Iterable[str | None]) -> None:
        """With `resolve`: map every unknown id among `keys` (None skipped) in one call."""
        if self.resolve is None:
            return
        unknown = [k for k in dict.fromkeys(keys) if k is not None and k not in self.index]
        if unknown:
            for name, given in zip(unknown, self.resolve(unknown)):
                self.put(name, given)

    def expire(self, older_than: float) -> np.ndarray:
        """Free every id last seen before `older_than`; returns their rows."""
        live = np.array([n is not None for n in self.names], bool)
        stale = np.flatnonzero(live & (self.last_seen < older_than))
        for row in stale.tolist():
            name = self.names[row]
            assert name is not None  # a live row
            del self.index[name]
            self.names[row] = None
            self._new.pop(name, None)
            self._removed.add(name)
        self._free.extend(stale.tolist())
        return stale.astype(np.int64)

    def drain(self) -> tuple[dict[str, int], set[str]]:
        """Names added (name -> row) and names expired since the last call, for persistence."""
        new, removed = self._new, self._removed
        self._new, self._removed = {}, set()
        return new, removed

    def live(self) -> int:
        """How many ids are mapped now."""
        return len(self.index)

    def updated(self, changes: Mapping[str, int | None]) -> Vocab:
        """A copy with `changes` applied (name -> its row now, None: removed), as `restore` of the changed
        mapping would leave it, for the cost of copying the arrays plus the changes instead of a walk over
        every name."""
        out = Vocab()
        out.index, out.names = dict(self.index), list(self.names)
        free = set(self._free)
        for name, row in changes.items():
            old = out.index.pop(name, None)
            if old is not None and out.names[old] == name:  # (its row may be another name's already)
                out.names[old] = None
                free.add(old)
            if row is not None:
                if row >= len(out.names):
                    free.update(range(len(out.names), row))
                    out.names.extend([None] * (row + 1 - len(out.names)))
                out.names[row] = name
                out.index[name] = row
        out._seen = np.zeros(max(len(out.names), 16))
        out._free = sorted(r for r in free if out.names[r] is None)
        return out

    def restore(self, mapping: Mapping[str, int]) -> None:
        """Rebuild from a saved name -> row mapping (rows not in it become free)."""
        size = max(mapping.values(), default=-1) + 1
        self.index = dict(mapping)
        self.names = [None] * size
        for name, row in mapping.items():
            self.names[row] = name
        self._seen = np.zeros(max(size, 16))
        self._free = [r for r, n in enumerate(self.names) if n is None]
        self._new, self._removed = {}, set()


_SESSION = "s:"  # session keys of explicit session ids (implicit ones start "u:")


def session_key(session_id: str) -> str:
    """The session vocabulary's key of an explicit `session_id`."""
    return _SESSION + session_id


_HOURS = tuple(f"hour={h}" for h in range(24))
_DAYS = tuple(f"dow={d}" for d in range(7))
_TIME_PREFIXES = ("hour=", "dow=")
DEFAULT_EVENT_WEIGHTS: tuple[tuple[str, float], ...] = tuple(EVENT_WEIGHTS.items())


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
        self._explicit_cache: dict[tuple, tuple[str | None, ...]] = {}

    def session_row(self, session_id: str) -> int:
        """The row of an explicit `session_id` (-1: unknown)."""
        return self.sessions.get(session_key(session_id))

    def event_context(self, row: int) -> tuple[str, str] | None:
        """The (key, value) an event brought for context value `row`; None for time features and unknown rows."""
        name = self.contexts.names[row] if 0 <= row < len(self.contexts.names) else None
        if name is None or name.startswith(_TIME_PREFIXES):
            return None
        key, _, value = name.partition("=")
        return key, value

    def session_key(self, event: EventLike) -> str:
        """The session an event belongs to: its `session_id`, or the user's current run."""
        if event.session_id is not None:
            return session_key(event.session_id)
        key, last = self.open_sessions.get(event.user_id, ("", -math.inf))
        if not key or event.ts - last > self.session_gap:
            key = f"u:{event.user_id}:{int(event.ts)}"
        self.open_sessions[event.user_id] = (key, max(event.ts, last))
        return key

    def context_keys(self, context: Mapping[str, Any], ts: float) -> list[str | None]:
        """The context row as `key=value` strings: the event's own context padded with
        None to `max_context` entries, then the time features (hour of day, day of week)."""
        keys = list(self._explicit(context))
        if self.time_features:
            keys.extend(_hour_keys(int(ts) // 3600))
        return keys

    def _explicit(self, context: Mapping[str, Any]) -> tuple[str | None, ...]:
        """The event's own context as `max_context` `key=value` strings (None-padded), cached by content."""
        key = (tuple(context.items()), tuple(map(type, context.values())))  # the types keep True apart from 1
        keys = self._explicit_cache.get(key)
        if keys is None:
            keys = tuple(f"{k}={_norm(v)}" for k, v in list(context.items())[: self.max_context])
            keys += (None,) * (self.max_context - len(keys))
            if len(self._explicit_cache) >= 65536:  # high-cardinality context values: keep the cache bounded
                self._explicit_cache.clear()
            self._explicit_cache[key] = keys
        return keys

    def batch(self, events: Iterable[EventLike]) -> Batch:
        """Code `events` (adding new ids to the vocabularies, in stream order) into a batch."""
        events = list(events)
        ts = np.array([e.ts for e in events], np.float64)  # [B]
        users = self.users.add_many([e.user_id for e in events], ts)
        items = self.items.add_many([e.item_id for e in events], ts)
        sessions = self.sessions.add_many([self.session_key(e) for e in events], ts)
        explicit = [self._explicit(e.context) for e in events]  # [B] tuples of max_context
        # [B] context rows: the explicit keys and the time keys
        columns = list(zip(explicit, _time_keys(ts))) if self.time_features else list(zip(explicit))
        width = self.max_context + 2 * self.time_features
        # Code each distinct context row once (first-appearance order, so new ids get the rows
        # they would get event by event); each keeps the latest time of the events that carry it.
        distinct: dict[tuple, int] = {}
        which = np.array([distinct.setdefault(c, len(distinct)) for c in columns], np.int64)  # [B]
        latest = np.full(len(distinct), -np.inf)
        np.maximum.at(latest, which, ts)
        flat = [k for row in distinct for part in row for k in part]
        context = self.contexts.add_many(flat, np.repeat(latest, width)).reshape(-1, width)[which]  # [B, C]
        kinds = [e.event_type for e in events]
        weight = self._weight
        return self._wrap(
            users, items, sessions,
            np.array([EVENT_CODE[k] for k in kinds], np.int8),
            np.array([weight.get(k, 1.0) for k in kinds], np.float32),
            ts, np.array([math.nan if e.value is None else e.value for e in events], np.float32),
            context,
        )

    def query(self, user_id: str | None, context: Mapping[str, Any], ts: float, session_id: str | None = None) -> Batch:
        """A one-row batch (item -1) for a lookup; unknown ids and context values code as -1."""
        session = self.session_row(session_id) if session_id is not None else -1
        return self.query_of(self.users.get(user_id) if user_id else -1, session, context, ts)

    def query_of(self, user: int, session: int, context: Mapping[str, Any], ts: float,
                 n_users: int | None = None, n_sessions: int | None = None) -> Batch:
        """`query` of a user row and a session row (-1: none) among n_users and n_sessions (default: the
        vocabularies'): a lookup scored by a model narrowed to its own rows numbers them from 0."""
        context_row = np.array([[-1 if k is None else self.contexts.get(k) for k in self.context_keys(context, ts)]])
        return self._wrap(
            np.array([user]), np.array([-1]), np.array([session]), np.zeros(1, np.int8), np.ones(1, np.float32),
            np.array([ts]), np.full(1, np.nan, np.float32), context_row, n_users, n_sessions,
        )

    def _wrap(self, users: np.ndarray, items: np.ndarray, sessions: np.ndarray, event_types: np.ndarray,
              weights: np.ndarray, ts: np.ndarray, values: np.ndarray, context: np.ndarray,
              n_users: int | None = None, n_sessions: int | None = None) -> Batch:
        """A batch of these rows in this featurizer's vocabularies (n_users, n_sessions: other counts)."""
        return Batch(
            users, items, sessions, event_types, weights, ts, values, context,
            len(self.users) if n_users is None else n_users, len(self.items),
            len(self.sessions) if n_sessions is None else n_sessions, len(self.contexts),
            2 if self.time_features else 0,
        )


@functools.lru_cache(maxsize=256)
def _hour_keys(hour: int) -> tuple[str, str]:
    """The time keys of every moment of hour number `hour` since the epoch (`_time_keys`), kept: a lookup's."""
    return _time_keys(np.array([hour * 3600.0]))[0]


def _time_keys(ts: np.ndarray) -> list[tuple[str, str]]:
    """The hour-of-day and day-of-week context keys of each time in `ts` ([B] seconds)."""
    day, second = np.divmod(ts.astype(np.int64), 86400)
    days = ((day + 3) % 7).tolist()  # 1970-01-01 was a Thursday (Monday = 0)
    return [(_HOURS[h], _DAYS[d]) for h, d in zip((second // 3600).tolist(), days)]


def _norm(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
