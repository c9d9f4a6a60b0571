"""Redis-backed model cache for the lookup API: one rebuilt copy of each shard's models, kept fresh.

Each Kafka partition of `events` is a shard with its own vocabularies and
models (see `stream_app.worker`). `ModelCache.shard(p)` returns an immutable
`ShardView` of partition `p`: vocabularies, the users' recent history and
every served model rebuilt with `import_state` from the rows in Redis. The
shard's `version` key (INCR per worker commit) is checked at most every
`refresh_interval` seconds; when it moved, the shard is re-read in one
MULTI/EXEC (every key of a partition shares one hash tag, so the read is a
consistent snapshot) and swapped in. While one request reloads a shard,
others keep answering from the previous view, so answers are at most
`refresh_interval` + one reload stale.

Every Redis call has a timeout and no retries; a failure raises
`ServiceError` (the API turns it into 503 + Retry-After).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from models.base import EVENT_TYPES, Batch, Model
from models.features import Featurizer
from models.registry import create
from stream_app.errors import ServiceError
from stream_app.kafka import partition_for
from stream_app.settings import Settings
from stream_app.state import KINDS, Keys, rows_to_array, unpack_blob

EVENT_STRENGTH = {"click": 1, "favorite": 2, "purchase": 3}
ITEM_VECTOR_TABLES = ("item", "item_emb")  # item-embedding tables of known models, tried in order


def redis_client(url: str, timeout: float = 1.0) -> redis.Redis:
    """A client that fails fast: `timeout` on connect and on every call, no retries."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


@lru_cache(maxsize=65536)
def user_partition(user_id: str, n: int) -> int:
    return partition_for(user_id.encode("utf-8"), n)


@dataclass
class Cooccurrence:
    """Binary user x item incidence of the shard's recent histories, both directions as CSR arrays."""

    item_ptr: np.ndarray  # [n_items + 1] offsets into item_users
    item_users: np.ndarray
    user_ptr: np.ndarray  # [n_users + 1] offsets into user_items
    user_items: np.ndarray
    n_items: int

    @classmethod
    def build(cls, history: dict[int, np.ndarray], n_users: int, n_items: int) -> "Cooccurrence":
        if history:
            users = np.concatenate([np.full(len(h), u, np.int64) for u, h in history.items()])
            items = np.concatenate([h[:, 0].astype(np.int64) for h in history.values()])
            ok = (items >= 0) & (items < n_items) & (users < n_users)
            pairs = np.unique(users[ok] * n_items + items[ok])
            users, items = pairs // n_items, pairs % n_items
        else:
            users = items = np.zeros(0, np.int64)
        order = np.argsort(items, kind="stable")
        item_ptr = np.zeros(n_items + 1, np.int64)
        np.cumsum(np.bincount(items, minlength=n_items), out=item_ptr[1:])
        user_ptr = np.zeros(n_users + 1, np.int64)
        np.cumsum(np.bincount(users, minlength=n_users), out=user_ptr[1:])
        return cls(item_ptr, users[order], user_ptr, items, n_items)  # pairs are sorted by user already

    def users_of(self, item: int) -> np.ndarray:
        return self.item_users[self.item_ptr[item]: self.item_ptr[item + 1]]

    def degree(self) -> np.ndarray:
        return np.diff(self.item_ptr)

    def _items_of(self, users: np.ndarray) -> np.ndarray:
        """Concatenated item lists of `users` (vectorised CSR gather)."""
        starts, ends = self.user_ptr[users], self.user_ptr[users + 1]
        lengths = ends - starts
        total = int(lengths.sum())
        if total == 0:
            return np.zeros(0, np.int64), lengths
        offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
        return self.user_items[offsets + np.arange(total)], lengths

    def counts(self, candidates: Iterable[int], anchors: list[int], max_users: int = 256) -> np.ndarray:
        """[len(candidates), len(anchors)] number of users (up to `max_users` per anchor) who had both."""
        candidates = np.asarray(list(candidates), np.int64)
        out = np.zeros((len(candidates), len(anchors)))
        if len(candidates) == 0 or not anchors:
            return out
        pos = np.full(self.n_items, -1, np.int64)
        pos[candidates] = np.arange(len(candidates))
        per_anchor = [self.users_of(a)[:max_users] for a in anchors]
        users = np.concatenate(per_anchor)
        labels = np.repeat(np.arange(len(anchors)), [len(u) for u in per_anchor])
        items, lengths = self._items_of(users)
        if len(items) == 0:
            return out
        lab = np.repeat(labels, lengths)
        p = pos[items]
        ok = p >= 0
        np.add.at(out, (p[ok], lab[ok]), 1.0)
        return out

    def similar(self, item: int) -> np.ndarray:
        """Cosine of item's user set with every item's: [n_items]."""
        users = self.users_of(item)
        if len(users) == 0:
            return np.zeros(self.n_items)
        items, _ = self._items_of(users)
        co = np.bincount(items, minlength=self.n_items).astype(np.float64)
        deg = self.degree().astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = co / np.sqrt(np.maximum(deg, 1) * max(len(users), 1))
        return out


@dataclass
class ShardView:
    """A consistent, read-only snapshot of one partition's serving state."""

    partition: int
    version: int
    loaded_at: float  # monotonic
    featurizer: Featurizer
    item_names: list[str | None]
    valid_items: np.ndarray  # [n_items] bool: row currently mapped to an item id
    history: dict[int, np.ndarray]  # user row -> [n, 2] (item row, event type code), oldest first
    models: dict[str, Model]
    _cooc: Cooccurrence | None = field(default=None, repr=False)
    _vectors: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def n_items(self) -> int:
        return len(self.item_names)

    def cooccurrence(self) -> Cooccurrence:
        with self._lock:
            if self._cooc is None:
                self._cooc = Cooccurrence.build(self.history, len(self.featurizer.users), self.n_items)
            return self._cooc

    def item_vectors(self, name: str) -> np.ndarray | None:
        """L2-normalised item embeddings of model `name` ([n_items, d]) or None when it has none."""
        with self._lock:
            if name not in self._vectors:
                self._vectors[name] = _item_vectors(self.models.get(name), self.n_items)
            return self._vectors[name]

    def vector_model(self, preferred: str | None = None) -> str | None:
        """A served model with item embeddings, `preferred` first."""
        names = ([preferred] if preferred else []) + [n for n in self.models if n != preferred]
        for name in names:
            if name in self.models and self.item_vectors(name) is not None:
                return name
        return None


def _item_vectors(model: Model | None, n_items: int) -> np.ndarray | None:
    if model is None:
        return None
    getter = getattr(model, "item_embeddings", None)
    vectors = None
    if callable(getter):
        vectors = getter()
    else:
        state = model.export_state()
        for table in ITEM_VECTOR_TABLES:
            if model.tables.get(table) == "item" and table in state:
                vectors = state[table]
                break
    if vectors is None:
        return None
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[1] < 2:
        return None
    out = np.zeros((n_items, vectors.shape[1]), np.float32)
    n = min(n_items, len(vectors))
    out[:n] = vectors[:n]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


class ModelCache:
    """Per-shard serving state rebuilt from Redis, refreshed when the shard's `version` moves."""

    def __init__(self, settings: Settings, models: Iterable[str] = ("pop",), *, refresh_interval: float = 0.25,
                 timeout: float = 1.0, client: redis.Redis | None = None):
        self.settings = settings
        self.model_names = tuple(models)
        for name in self.model_names:
            create(name)  # unknown names fail here, at start-up
        self.partitions = settings.events_partitions
        self.refresh_interval = refresh_interval
        self.client = client or redis_client(settings.redis_url, timeout)
        self._views: dict[int, ShardView] = {}
        self._checked: dict[int, float] = {}
        self._locks = {p: threading.Lock() for p in range(self.partitions)}
        self.reloads = 0
        self.last_reload_seconds = 0.0

    def keys(self, partition: int) -> Keys:
        return Keys(self.settings.key_prefix, self.settings.events_topic, partition)

    def partition_of_user(self, user_id: str) -> int:
        return user_partition(user_id, self.partitions)

    def ping(self) -> None:
        self._call(self.client.ping)

    def _call(self, fn, *args: Any) -> Any:
        try:
            return fn(*args)
        except redis.RedisError as exc:
            raise ServiceError(f"Redis at {self.settings.redis_url} is not answering ({exc}); retry shortly") from None

    def shard(self, partition: int) -> ShardView:
        """The shard's current view; re-read when its version changed (checked every refresh_interval s)."""
        now = time.monotonic()
        view = self._views.get(partition)
        if view is not None and now - self._checked.get(partition, 0.0) < self.refresh_interval:
            return view
        lock = self._locks[partition]
        if not lock.acquire(blocking=view is None):
            return view  # another request is refreshing this shard; the previous view is still fresh enough
        try:
            view = self._views.get(partition)
            if view is not None and time.monotonic() - self._checked.get(partition, 0.0) < self.refresh_interval:
                return view
            raw = self._call(self.client.get, self.keys(partition).version)
            version = int(raw or 0)
            if view is None or view.version != version:
                started = time.perf_counter()
                view = self._load(partition)
                self.last_reload_seconds = time.perf_counter() - started
                self.reloads += 1
                self._views[partition] = view
            self._checked[partition] = time.monotonic()
            return view
        finally:
            lock.release()

    def views(self) -> list[ShardView]:
        return [self.shard(p) for p in range(self.partitions)]

    def cached(self) -> dict[int, tuple[ShardView, float]]:
        """The views held now and when their version was last confirmed (monotonic), for metrics."""
        return {p: (v, self._checked.get(p, v.loaded_at)) for p, v in list(self._views.items())}

    def _load(self, partition: int) -> ShardView:
        k = self.keys(partition)
        probes = {name: create(name) for name in self.model_names}
        pipe = self.client.pipeline(transaction=True)  # one slot: a consistent snapshot
        pipe.get(k.version)
        for kind in KINDS:
            pipe.hgetall(k.vocab(kind))
        pipe.hgetall(k.open_sessions)
        pipe.hgetall(k.history)
        reads: list[tuple[str, str, str]] = []
        session_tables: list[tuple[str, str]] = []
        for name, model in probes.items():
            for table, kind in model.tables.items():
                if kind == "session":
                    session_tables.append((name, table))
                    continue
                reads.append((name, table, kind))
                (pipe.get if kind == "blob" else pipe.hgetall)(k.table(name, table))
        result = self._call(pipe.execute)
        version = int(result[0] or 0)
        vocabs = {kind: {n.decode(): int(r) for n, r in raw.items()} for kind, raw in zip(KINDS, result[1:5])}
        opened = {}
        for user, raw in result[5].items():
            key, _, ts = raw.decode().rpartition("|")
            opened[user.decode()] = (key, float(ts))
        history = {int(u): np.frombuffer(v, np.int32).reshape(-1, 2) for u, v in result[6].items()}
        states: dict[str, dict[str, np.ndarray]] = {name: {} for name in probes}
        for (name, table, kind), raw in zip(reads, result[7:]):
            if kind == "blob":
                if raw is not None:
                    states[name][table] = unpack_blob(raw)
            elif raw:
                states[name][table] = rows_to_array(raw)
        for name, table in session_tables:
            pattern = k.table(name, table).replace("{", "\\{").replace("}", "\\}") + ":*"
            fields = {}
            for skey in self._call(lambda: list(self.client.scan_iter(match=pattern, count=1000))):
                raw = self._call(self.client.get, skey)
                if raw is not None:
                    fields[skey.rsplit(b":", 1)[1]] = raw
            states[name][table] = rows_to_array(fields)
        f = Featurizer()
        for kind, vocab in zip(KINDS, (f.users, f.items, f.sessions, f.contexts)):
            vocab.restore(vocabs[kind])
        f.open_sessions.update(opened)
        models: dict[str, Model] = {}
        for name, model in probes.items():
            state = states[name]
            missing = [t for t, kind in model.tables.items() if t not in state]
            if len(missing) == len(model.tables):
                continue  # the worker does not run this model on this shard (yet)
            for table in missing:  # a row table nobody wrote yet: empty
                state[table] = np.zeros((0, 1), np.float32)
            try:
                model.import_state(state)
            except Exception:  # noqa: BLE001 - a half-written model must not take the API down
                continue
            models[name] = model
        names = list(f.items.names)
        valid = np.array([n is not None for n in names], bool)
        return ShardView(partition, version, time.monotonic(), f, names, valid, history, models)


def strongest(history: np.ndarray) -> dict[int, str]:
    """Item row -> its strongest event type in a user's history (purchase > favorite > click)."""
    out: dict[int, str] = {}
    for item, code in history.tolist():
        kind = EVENT_TYPES[code] if 0 <= code < len(EVENT_TYPES) else "click"
        if item not in out or EVENT_STRENGTH[kind] > EVENT_STRENGTH[out[item]]:
            out[item] = kind
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite scores, best first (np.argpartition)."""
    finite = np.flatnonzero(np.isfinite(scores))
    if len(finite) == 0:
        return finite
    vals = scores[finite]
    if len(finite) > k:
        part = np.argpartition(-vals, k - 1)[:k]
    else:
        part = np.arange(len(finite))
    order = part[np.argsort(-vals[part], kind="stable")]
    return finite[order]


def query_batch(view: ShardView, user_id: str | None, context: dict[str, str], ts: float,
                session_id: str | None = None, session_row: int | None = None) -> Batch:
    """`Featurizer.query`, optionally pinned to a session row (a user's open implicit session)."""
    batch = view.featurizer.query(user_id, context, ts, session_id)
    if session_row is not None and session_row >= 0:
        batch = Batch(batch.users, batch.items, np.array([session_row]), batch.event_types, batch.weights,
                      batch.ts, batch.values, batch.context, batch.n_users, batch.n_items, batch.n_sessions,
                      batch.n_context)
    return batch
