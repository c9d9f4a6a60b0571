"""Model state, vocabularies and Kafka offsets in Redis, written exactly once per micro-batch.

Every key of one partition shares the hash tag `{<prefix>:<topic>:<partition>}`,
so a partition's keys live in one cluster slot and one MULTI/EXEC can change
them atomically. See README "Redis key layout".

Fencing: claiming a partition increments its `epoch` and stores the result
as `owner`; every commit WATCHes `owner` and aborts (FencedError) when it is
not this worker's token any more, so a worker that lost a partition cannot
write after the new owner took over.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import redis

from models.base import Model
from stream_app.errors import FencedError, ServiceError

KINDS = ("user", "item", "session", "context")


def connect(url: str, timeout: float = 5.0) -> redis.Redis:
    """A Redis client with timeouts on every call; connection is lazy."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30)


def unreachable(url: str, exc: Exception) -> ServiceError:
    return ServiceError(
        f"Redis at {url} is not reachable ({exc}); start one with `streamrec up` or set STREAMREC_REDIS_URL"
    )


def pack_blob(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def unpack_blob(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


def rows_to_array(fields: dict[bytes, bytes]) -> np.ndarray:
    """Hash of row -> float32 bytes into a dense `[max_row + 1, max_width]` array (zeros elsewhere)."""
    if not fields:
        return np.zeros((0, 1), np.float32)
    rows = {int(k): np.frombuffer(v, np.float32) for k, v in fields.items()}
    out = np.zeros((max(rows) + 1, max(len(v) for v in rows.values())), np.float32)
    for r, v in rows.items():
        out[r, : len(v)] = v
    return out


@dataclass(frozen=True)
class Keys:
    """Key names of one partition's state."""

    prefix: str
    topic: str
    partition: int

    @property
    def tag(self) -> str:
        return f"{{{self.prefix}:{self.topic}:{self.partition}}}"

    def __getattr__(self, name: str) -> str:  # offset, epoch, owner, applied, dedup, version, history, open_sessions
        if name.startswith("_"):
            raise AttributeError(name)
        return f"{self.tag}:{name}"

    def vocab(self, kind: str) -> str:
        return f"{self.tag}:vocab:{kind}"

    def table(self, model: str, table: str) -> str:
        return f"{self.tag}:m:{model}:{table}"

    def session_row(self, model: str, table: str, row: int) -> str:
        return f"{self.tag}:m:{model}:{table}:{row}"


@dataclass
class Snapshot:
    """What a claimed partition resumes from."""

    token: int
    offset: int | None
    applied: int
    vocabs: dict[str, dict[str, int]]
    open_sessions: dict[str, tuple[str, float]]
    dedup: list[str]
    history: dict[int, np.ndarray]
    models: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass
class Changes:
    """One micro-batch's writes for one partition."""

    next_offset: int
    applied: int
    vocab_new: dict[str, dict[str, int]]
    vocab_removed: dict[str, set[str]]
    open_sessions: dict[str, tuple[str, float]]
    dedup: dict[str, int]  # event_id -> offset
    history: dict[int, bytes]  # user row -> int32 (item row, event type) pairs
    tables: list[tuple[str, str, str, np.ndarray | None, np.ndarray]]  # model, table, kind, ids (None: blob), values
    expired: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> rows freed this batch


class PartitionStore:
    """Reads and atomically writes one partition's state in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, dedup_window: int = 100_000, session_ttl: float = 1800.0):
        self.client = client
        self.keys = keys
        self.dedup_window = dedup_window
        self.session_ttl = max(1, int(session_ttl))
        self.token = 0
        self.tables: dict[str, dict[str, str]] = {}  # model -> table -> kind, known after `load`

    def claim(self) -> int:
        """Become the partition's owner; every earlier owner is fenced from now on."""
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(self.keys.epoch)
        token = pipe.execute()[0]
        self.client.set(self.keys.owner, token)
        self.token = int(token)
        return self.token

    def load(self, models: dict[str, Model]) -> Snapshot:
        """Read everything the partition needs to resume (claim first)."""
        k, c = self.keys, self.client
        self.tables = {name: dict(model.tables) for name, model in models.items()}
        offset = c.get(k.offset)
        vocabs = {kind: {n.decode(): int(r) for n, r in c.hgetall(k.vocab(kind)).items()} for kind in KINDS}
        opened = {}
        for user, raw in c.hgetall(k.open_sessions).items():
            key, _, ts = raw.decode().rpartition("|")
            opened[user.decode()] = (key, float(ts))
        history = {int(u): np.frombuffer(v, np.int32).reshape(-1, 2) for u, v in c.hgetall(k.history).items()}
        snap = Snapshot(
            token=self.token,
            offset=None if offset is None else int(offset),
            applied=int(c.get(k.applied) or 0),
            vocabs=vocabs,
            open_sessions=opened,
            dedup=[m.decode() for m in c.zrange(k.dedup, 0, -1)],
            history=history,
        )
        for name, model in models.items():
            state: dict[str, np.ndarray] = {}
            for table, kind in model.tables.items():
                key = k.table(name, table)
                if kind == "blob":
                    raw = c.get(key)
                    if raw is not None:
                        state[table] = unpack_blob(raw)
                elif kind == "session":
                    fields = {}
                    for skey in c.scan_iter(match=key.replace("{", "\\{").replace("}", "\\}") + ":*", count=1000):
                        raw = c.get(skey)
                        if raw is not None:
                            fields[skey.rsplit(b":", 1)[1]] = raw
                    state[table] = rows_to_array(fields)
                else:
                    state[table] = rows_to_array(c.hgetall(key))
            if len(state) == len(model.tables):
                snap.models[name] = state
        return snap

    def commit(self, changes: Changes) -> int:
        """Write one batch's changes and the next offset atomically; returns the new version.

        Raises FencedError when another worker owns the partition now.
        """
        k = self.keys
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(k.owner)
                owner = pipe.get(k.owner)
                if owner is None or int(owner) != self.token:
                    raise FencedError(f"partition {k.partition} of {k.topic} is owned by token {owner!r}, not {self.token}")
                pipe.multi()
                self._write(pipe, changes)
                result = pipe.execute()
            except redis.WatchError:
                raise FencedError(f"partition {k.partition} of {k.topic} was claimed by another worker") from None
        return int(result[-1])

    def _write(self, pipe: redis.client.Pipeline, ch: Changes) -> None:
        k = self.keys
        for kind, names in ch.vocab_new.items():
            if names:
                pipe.hset(k.vocab(kind), mapping=names)
        for kind, names in ch.vocab_removed.items():
            if names:
                pipe.hdel(k.vocab(kind), *names)
        if ch.open_sessions:
            pipe.hset(k.open_sessions, mapping={u: f"{key}|{ts!r}" for u, (key, ts) in ch.open_sessions.items()})
        if ch.dedup:
            pipe.zadd(k.dedup, ch.dedup)
            pipe.zremrangebyrank(k.dedup, 0, -self.dedup_window - 1)
        if ch.history:
            pipe.hset(k.history, mapping=ch.history)
        for model, table, kind, ids, values in ch.tables:
            key = k.table(model, table)
            if ids is None:
                pipe.set(key, pack_blob(values))
            elif kind == "session":
                for r, row in zip(ids.tolist(), values.astype(np.float32)):
                    pipe.set(k.session_row(model, table, r), row.tobytes(), ex=self.session_ttl)
            elif len(ids):
                rows = values.astype(np.float32)
                pipe.hset(key, mapping={str(r): row.tobytes() for r, row in zip(ids.tolist(), rows)})
        for kind, rows in ch.expired.items():
            fields = [str(r) for r in rows.tolist()]
            if kind == "user":
                pipe.hdel(k.history, *fields)
            for model, tables in self.tables.items():
                for table, table_kind in tables.items():
                    if table_kind == kind == "session":
                        pipe.delete(*(k.session_row(model, table, r) for r in rows.tolist()))
                    elif table_kind == kind:
                        pipe.hdel(k.table(model, table), *fields)
        pipe.set(k.offset, ch.next_offset)
        pipe.incrby(k.applied, ch.applied)
        pipe.incr(k.version)


def applied_total(client: redis.Redis, prefix: str, topic: str, partitions: Iterable[int]) -> int:
    """Sum of the applied-event counters of a topic's partitions."""
    return sum(int(client.get(Keys(prefix, topic, p).applied) or 0) for p in partitions)
