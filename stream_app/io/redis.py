"""Model state, vocabularies and Kafka offsets in Redis, written exactly once per micro-batch.

Over 400 lines on purpose: the key layout, the snapshot reader and the fenced Lua write must agree
key for key, so they stay in one file.

Every key of one partition shares the hash tag `{<prefix>:<topic>:<partition>}`,
so a partition's keys live in one cluster slot and one Lua script can change
them atomically, in one round trip. See README "Redis key layout".

Redis Cluster (`connect` with a `redis+cluster://` URL): every script and MULTI here names all
its keys in KEYS and stays within one partition's slot; SCAN goes over every node (redis-py's
cluster `scan_iter`), MGET only ever asks for one partition's keys.

Fencing: claiming a partition increments its `epoch` and stores the result
as `owner`; every commit's script first compares `owner` with this worker's
token and writes nothing (FencedError) when it differs, so a worker that lost
a partition cannot write after the new owner took over.

For `streamrec status`, a claim also stores the claimer's worker id and the time, and every
commit the time, inside the same scripts (Redis server clock: readers compare it with TIME).
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import orjson
import redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import ClusterNode as AsyncNode
from redis.asyncio.cluster import RedisCluster as AsyncCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.commands.core import AsyncScript, Script
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError
from redis.retry import Retry

from models.base import Model, TableKind
from stream_app.core.errors import ConfigError, FencedError, ServiceError
from stream_app.core.settings import redact

KINDS = ("user", "item", "session", "context")


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}  # cluster scheme -> redis-py's scheme

Client = redis.Redis | redis.RedisCluster
AsyncClient = AsyncRedis | AsyncCluster
# What any Redis call may raise: redis-py's errors, and the cluster client's own (not `RedisError`s).
FAILURES = (redis.RedisError, RedisClusterException)


def connect(url: str, timeout: float = 5.0, fail_fast: bool = False) -> Client:
    """The project's Redis client: `timeout` on connect and on every call, the connection made lazily.
    `fail_fast` (the lookup API): no retries and no health checks, so a request never waits long.

    A `redis+cluster://` or `rediss+cluster://` URL (`cluster_nodes`) gives redis-py's `RedisCluster`,
    made on first use: its constructor already asks a seed node for the slot map, and a client must
    be makeable while the cluster is down (the worker waits for it, the API answers 503)."""
    options: dict[str, Any] = dict(socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30)
    if fail_fast:
        options.update(retry=Retry(NoBackoff(), 0), health_check_interval=0)
    if urlsplit(url).scheme in CLUSTER_SCHEMES:
        first, others = cluster_nodes(url)
        return cast(redis.RedisCluster, _LazyCluster(dict(url=first, startup_nodes=others, **options)))
    return redis.Redis.from_url(url, **options)


def connect_async(url: str, timeout: float) -> AsyncClient:
    """`connect(url, timeout, fail_fast=True)` for asyncio code (the lookup API's request path): a call
    waits for Redis without holding the event loop. Made here, bound to the event loop of its first use."""
    options: dict[str, Any] = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=AsyncRetry(NoBackoff(), 0))
    if urlsplit(url).scheme in CLUSTER_SCHEMES:
        first, others = cluster_nodes(url)
        return AsyncCluster.from_url(first, startup_nodes=[AsyncNode(n.host, n.port) for n in others], **options)
    return AsyncRedis.from_url(url, **options)


def cluster_nodes(url: str) -> tuple[str, list[ClusterNode]]:
    """A cluster URL `redis+cluster://[user:password@]host:port[,host:port...][/0][?options]` as
    redis-py's single-node URL of its first seed node (scheme `redis`, or `rediss` for
    `rediss+cluster`; user, password and TLS options kept) and the other seed nodes."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    seeds = [h.strip() for h in hosts.split(",")]
    nodes = []
    for seed in seeds:
        try:
            node = urlsplit(f"//{seed}")
            host, port = node.hostname, node.port or 6379
        except ValueError:  # a port that is no number
            host = None
        if not host:
            raise ConfigError(f"{redact(url)!r} names the seed node {seed!r}, not HOST:PORT; write the cluster "
                              "as redis+cluster://HOST:PORT[,HOST:PORT...]")
        nodes.append(ClusterNode(host, port))
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigError(f"{redact(url)!r} selects database {parts.path.strip('/')!r}: a Redis Cluster has only "
                          "database 0; drop the path or write /0")
    netloc = f"{userinfo}@{seeds[0]}" if userinfo else seeds[0]
    first = urlunsplit((CLUSTER_SCHEMES[parts.scheme], netloc, parts.path, parts.query, ""))
    return first, nodes[1:]


class _LazyCluster:
    """A `redis.RedisCluster` made on the first attribute asked for (see `connect`); a cluster that no
    seed node answers for raises `redis.ConnectionError` then, like a single server that is down."""

    def __init__(self, kwargs: dict[str, Any]):
        self._kwargs = kwargs
        self._client: redis.RedisCluster | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    kwargs = {**self._kwargs, "startup_nodes": list(self._kwargs["startup_nodes"])}
                    try:
                        self._client = redis.RedisCluster(**kwargs)
                    except RedisClusterException as exc:
                        if not lost(exc):
                            raise
                        raise redis.ConnectionError(f"no seed node of the cluster answers ({exc.__cause__})") from None
                client = self._client
        return getattr(client, name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def lost(exc: BaseException) -> bool:
    """Whether `exc` means Redis cannot be reached now, so waiting helps: a connection refused or timed
    out, a server still loading, a cluster that is down, or one none of whose nodes answers."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, ClusterDownError, SlotNotCoveredError)):
        return True
    return isinstance(exc, RedisClusterException) and isinstance(exc.__cause__, (redis.ConnectionError, redis.TimeoutError))


def unreachable(url: str, exc: Exception) -> ServiceError:
    return ServiceError(
        f"Redis at {redact(url)} is not reachable ({exc}); start one with `streamrec up` or set STREAMREC_REDIS_URL"
    )


@contextlib.contextmanager
def reachable(url: str) -> Iterator[None]:
    """Turn a lost connection to Redis inside (refused, timed out, still loading its data after a
    restart) into `ServiceError` naming the server, password redacted, for callers that wait and retry."""
    try:
        yield
    except FAILURES as exc:
        if not lost(exc):
            raise
        raise unreachable(url, exc) from None


def pack_blob(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def unpack_blob(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


def rows_to_array(fields: Mapping[bytes, Any]) -> np.ndarray:
    """Hash of row -> float32 bytes into a dense `[max_row + 1, max_width]` array (zeros elsewhere)."""
    if not fields:
        return np.zeros((0, 1), np.float32)
    values = list(fields.values())
    rows = np.fromiter(map(int, fields.keys()), np.int64, len(values))
    width = len(values[0])
    if width and width % 4 == 0 and all(len(v) == width for v in values):  # one frombuffer for all rows
        data = np.frombuffer(b"".join(values), np.float32).reshape(len(values), width // 4)
    else:  # rows of several widths: pad the narrower ones
        width = max(len(v) for v in values) // 4 * 4
        data = np.zeros((len(values), width // 4), np.float32)
        for j, v in enumerate(values):
            data[j, : len(v) // 4] = np.frombuffer(v, np.float32, len(v) // 4)
    out = np.zeros((int(rows.max()) + 1, data.shape[1]), np.float32)
    out[rows] = data
    return out


def session_rows(client: Client, keys: Keys, model: str, table: str) -> dict[bytes, Any]:
    """Row -> float32 bytes of every live session row of a model's table (SCAN, then MGET in chunks)."""
    pattern = keys.table(model, table).replace("{", "\\{").replace("}", "\\}") + ":*"
    names = list(client.scan_iter(match=pattern, count=1000))
    rows: dict[bytes, Any] = {}
    for start in range(0, len(names), 1000):
        chunk = names[start : start + 1000]
        for name, raw in zip(chunk, client.mget(chunk)):
            if raw is not None:  # expired since the scan
                rows[name.rsplit(b":", 1)[1]] = raw
    return rows


@dataclass(frozen=True)
class Keys:
    """Key names of one partition's state."""

    prefix: str
    topic: str
    partition: int

    @property
    def tag(self) -> str:
        return f"{{{self.prefix}:{self.topic}:{self.partition}}}"

    def _key(self, name: str) -> str:
        return f"{self.tag}:{name}"

    offset = property(lambda self: self._key("offset"), doc="next offset of `events` to read")
    epoch = property(lambda self: self._key("epoch"), doc="claims so far; a claim's value is its fencing token")
    owner = property(lambda self: self._key("owner"), doc="fencing token of the current owner")
    applied = property(lambda self: self._key("applied"), doc="events applied")
    version = property(lambda self: self._key("version"), doc="commits so far")
    worker = property(lambda self: self._key("worker"), doc="worker id of the current owner")
    claimed_at = property(lambda self: self._key("claimed_at"), doc="server time of the last claim (Unix s)")
    committed_at = property(lambda self: self._key("committed_at"), doc="server time of the last commit (Unix s)")
    dedup = property(lambda self: self._key("dedup"), doc="list: JSON array of event ids per commit")
    history = property(lambda self: self._key("history"), doc="hash: user row -> int32 (item, type) pairs")
    open_sessions = property(lambda self: self._key("open_sessions"), doc="hash: user id -> 'session|last ts'")
    gaps = property(lambda self: self._key("gaps"), doc="list: JSON record of each offset gap the state was carried over")
    item_log = property(lambda self: self._key("items:log"), doc="list: the item changes of each commit (shared items)")
    item_log_base = property(lambda self: self._key("items:log:base"), doc="entries trimmed from the head of `item_log`")
    item_cursors = property(lambda self: self._key("items:cursors"),
                            doc="hash: partition -> index of the next entry of its `item_log` to fold in")
    changes = property(lambda self: self._key("changes"),
                       doc="list: per commit, 'VERSION JSON' of the keys (and hash fields) it wrote, the last "
                           "`CHANGES_KEPT`: what a server re-reads to catch up")
    commits = property(lambda self: f"{self.prefix}:{self.topic}:commits",
                       doc="pub/sub channel (no key): 'PARTITION VERSION' after every commit of any partition")

    def vocab(self, kind: str) -> str:
        return f"{self.tag}:vocab:{kind}"

    tables = property(lambda self: self._key("m:"), doc="what every model table's key starts with")

    def table(self, model: str, table: str) -> str:
        return f"{self.tables}{model}:{table}"

    def session_row(self, model: str, table: str, row: int) -> str:
        return f"{self.table(model, table)}:{row}"


@dataclass
class Snapshot:
    """A partition's state as one commit left it: what a worker resumes from and a server serves."""

    version: int
    offset: int | None
    applied: int
    vocabs: dict[str, dict[str, int]]
    open_sessions: dict[str, tuple[str, float]]
    history: dict[int, np.ndarray]  # user row -> [n, 2] int32 (item row, event type code), oldest first
    models: dict[str, dict[str, np.ndarray]]  # model -> table -> array; a blob never written is absent
    token: int = 0  # the reader's fencing token (workers)
    dedup: list[str] = field(default_factory=list)  # event ids of the dedup window (workers)
    cursors: dict[int, int] = field(default_factory=dict)  # partition -> next entry of its item log to fold in
    # Caught up from a base (`read_changes`): the names each vocabulary changed (-> row, None: removed), and
    # the users whose history changed (`history` then holds theirs only, a removed one absent); None: read whole.
    vocab_changes: dict[str, dict[str, int | None]] | None = None
    history_changed: set[int] | None = None


def read_snapshot(client: Client, keys: Keys, tables: dict[str, dict[str, TableKind]], vocabs: tuple[str, ...] = KINDS,
                  history: bool = True, open_sessions: bool = True) -> Snapshot:
    """One partition's vocabularies of `vocabs`, its history and open sessions (unless told not to), and the
    `tables` of its models, but not its dedup window: one MULTI/EXEC over its hash tag (a consistent
    snapshot), then the session rows (one key each, so SCAN + MGET; each row is written whole). What is
    not read comes back empty."""
    pipe = client.pipeline(transaction=True)
    for key in (keys.version, keys.offset, keys.applied):
        pipe.get(key)
    pipe.hgetall(keys.item_cursors)
    for kind in vocabs:
        pipe.hgetall(keys.vocab(kind))
    if open_sessions:
        pipe.hgetall(keys.open_sessions)
    if history:
        pipe.hgetall(keys.history)
    reads = [(name, table, kind) for name, model in tables.items() for table, kind in model.items() if kind != "session"]
    for name, table, kind in reads:
        (pipe.get if kind == "blob" else pipe.hgetall)(keys.table(name, table))
    got = iter(pipe.execute())
    version, offset, applied, cursors_raw = (next(got) for _ in range(4))
    vocab_raw = [next(got) for _ in vocabs]
    opened_raw = next(got) if open_sessions else {}
    history_raw = next(got) if history else {}
    models: dict[str, dict[str, np.ndarray]] = {name: {} for name in tables}
    for (name, table, kind), raw in zip(reads, got):
        if kind != "blob":
            models[name][table] = rows_to_array(raw)
        elif raw is not None:
            models[name][table] = unpack_blob(raw)
    for name, model in tables.items():
        for table, kind in model.items():
            if kind == "session":
                models[name][table] = rows_to_array(session_rows(client, keys, name, table))
    read = {kind: {n.decode(): int(r) for n, r in raw.items()} for kind, raw in zip(vocabs, vocab_raw)}
    return Snapshot(
        version=int(version or 0),
        offset=None if offset is None else int(offset),
        applied=int(applied or 0),
        vocabs={kind: read.get(kind, {}) for kind in KINDS},
        open_sessions={user.decode(): _open_session(raw) for user, raw in opened_raw.items()},
        history={int(u): _history(v) for u, v in history_raw.items()},
        models=models,
        cursors={int(p): int(c) for p, c in cursors_raw.items()},
    )


def _open_session(raw: bytes) -> tuple[str, float]:
    """A stored open session, 'KEY|LAST TS', as (key, last ts)."""
    key, _, ts = raw.decode().rpartition("|")
    return key, float(ts)


def _history(raw: bytes) -> np.ndarray:
    """A stored history row as [n, 2] int32 (item row, event type code), oldest first."""
    return np.frombuffer(raw, np.int32).reshape(-1, 2)


HISTORY_SCAN = 10_000  # history hash fields asked for per HSCAN call by `read_history_pairs`


def read_history_pairs(client: Client, keys: Keys) -> tuple[np.ndarray, np.ndarray]:
    """Every history of the partition as (user row, item row) pairs, [n] int64 each, read in HSCAN chunks
    and kept as arrays only, so no object per user outlives its chunk (a server's memory stays with the
    pairs). Outside any snapshot's transaction: it may hold later commits' histories, which the catch-up
    from that snapshot re-reads anyway; a pair HSCAN returns twice is the caller's to drop."""
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    cursor = 0
    while True:
        cursor, chunk = cast(tuple[int, dict[bytes, bytes]], client.hscan(keys.history, cursor, count=HISTORY_SCAN))
        if chunk:
            raw = list(chunk.values())
            lengths = np.fromiter((len(v) // 8 for v in raw), np.int64, len(raw))  # (item, type) int32 pairs
            users.append(np.repeat(np.fromiter(map(int, chunk), np.int64, len(raw)), lengths))
            items.append(_history(b"".join(raw))[:, 0].astype(np.int64))
        if not cursor:
            break
    if not users:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(users), np.concatenate(items)


def read_changes(client: Client, keys: Keys, tables: dict[str, dict[str, TableKind]], base: Snapshot,
                 version: int, vocabs: tuple[str, ...] = KINDS, history: bool = True,
                 open_sessions: bool = True) -> Snapshot | None:
    """`base` brought up to at least `version` by re-reading only the keys and hash fields that the commits
    after it wrote (their `changes` entries): two round trips, a small read where `read_snapshot` reads every
    row. None when the entries no longer reach back to `base`, or the version went back (read a full
    snapshot then).

    The result carries the version of the last entry read; rows it re-read may already hold later commits
    (never older ones), and the next catch-up re-reads those commits' keys again. Keys that expire by TTL
    (session rows) write no entry: a full snapshot now and then drops them. `tables`, `vocabs`, `history` and
    `open_sessions` say what `base` holds, as `read_snapshot` read it: only those are re-read. Histories are
    not merged into `base`'s: the result holds the changed users' only (`history_changed`)."""
    behind = version - base.version
    if behind == 0:
        return base
    if behind < 0 or behind > CHANGES_KEPT:  # behind < 0: the state went back (Redis lost it): read it anew
        return None
    entries = []
    for raw in client.lrange(keys.changes, -min(CHANGES_KEPT, behind + 8), -1):
        head, _, body = cast(bytes, raw).partition(b" ")
        if int(head) > base.version:
            entries.append((int(head), body))
    if not entries or [v for v, _ in entries] != list(range(base.version + 1, base.version + 1 + len(entries))):
        return None
    touched: dict[str, set | None] = {}
    for _, body in entries:
        for key, fields in orjson.loads(body).items():
            seen = touched.setdefault(key, set())
            if fields is None or seen is None:
                touched[key] = None
            else:
                seen.update(fields)  # row numbers of tables and histories, names of vocabularies
    hashes: dict[str, tuple[str, Any]] = {keys.vocab(kind): ("vocab", kind) for kind in vocabs}
    if open_sessions:
        hashes[keys.open_sessions] = ("open", "")
    if history:
        hashes[keys.history] = ("history", "")
    plain, session_prefix = {}, {}
    for name, model in tables.items():
        for table, kind in model.items():
            key = keys.table(name, table)
            if kind == "session":
                session_prefix[key + ":"] = (name, table)
            elif kind == "blob":
                plain[key] = (name, table)
            else:
                hashes[key] = ("table", (name, table))
    reads: list[tuple[str, Any, list]] = []  # (what, where, fields)
    pipe = client.pipeline(transaction=True)
    for key, fields in touched.items():
        if key in hashes and fields:
            names = list(fields)
            if hashes[key][0] in ("table", "history"):  # row numbers: one argument, split in Redis
                pipe.execute_command("EVAL", _HMGET_ROWS, 1, key, ",".join(map(str, names)))  # a cluster pipeline blocks .eval
            else:
                pipe.hmget(key, names)
            reads.append((*hashes[key], names))
        elif key in plain:
            pipe.get(key)
            reads.append(("blob", plain[key], []))
        else:
            prefix, _, row = key.rpartition(":")
            if prefix + ":" in session_prefix:
                pipe.get(key)
                reads.append(("session", (*session_prefix[prefix + ":"], int(row)), []))
    got = pipe.execute() if reads else []
    all_vocabs, opened = dict(base.vocabs), dict(base.open_sessions)
    users_history: dict[int, np.ndarray] = {}
    vocab_changes: dict[str, dict[str, int | None]] = {}
    history_changed: set[int] = set()
    models = {name: dict(state) for name, state in base.models.items()}
    rows: dict[tuple[str, str], dict[int, Any]] = {}
    for (what, where, fields), values in zip(reads, got):
        if what == "vocab":
            vocab = all_vocabs[where] = dict(base.vocabs[where])  # each key is read once
            delta = vocab_changes[where] = {}
            for name, row in zip(fields, values):
                if row is None:
                    vocab.pop(name, None)
                    delta[name] = None
                else:
                    vocab[name] = delta[name] = int(row)
        elif what == "open":
            for user, raw in zip(fields, values):
                if raw is None:
                    opened.pop(user, None)
                else:
                    opened[user] = _open_session(raw)
        elif what == "history":
            history_changed.update(map(int, fields))
            for user, raw in zip(fields, values):
                if raw is None:
                    users_history.pop(int(user), None)
                else:
                    users_history[int(user)] = _history(raw)
        elif what == "table":
            rows.setdefault(where, {}).update(zip(map(int, fields), values))
        elif what == "blob":
            if values is not None:
                models[where[0]][where[1]] = unpack_blob(values)
        else:  # a session row
            rows.setdefault(where[:2], {})[where[2]] = values
    for (name, table), changed in rows.items():
        models.setdefault(name, {})[table] = _patched(models[name].get(table), changed)
    return Snapshot(version=entries[-1][0], offset=base.offset, applied=base.applied, vocabs=all_vocabs,
                    open_sessions=opened, history=users_history, models=models, cursors=base.cursors,
                    vocab_changes=vocab_changes, history_changed=history_changed)


# HMGET of the hash KEYS[1] for the fields in ARGV[1], comma-separated (row numbers): a catch-up reads
# thousands of rows of a table, and a client packs each argument of a command one by one (redis-py: about
# a millisecond per thousand), where one joined string is one argument.
_HMGET_ROWS = """
local fields, out = {}, {}
for f in string.gmatch(ARGV[1], '[^,]+') do fields[#fields + 1] = f end
for i = 1, #fields, 4000 do
  local got = redis.call('HMGET', KEYS[1], unpack(fields, i, math.min(i + 3999, #fields)))
  for j = 1, #got do out[#out + 1] = got[j] end
end
return out
"""


def _patched(table: np.ndarray | None, changed: dict[int, Any]) -> np.ndarray:
    """A copy of `table` with the rows in `changed` (row -> float32 bytes, None: deleted, a zero row):
    one copy of the table, then only the changed rows decoded."""
    old = np.zeros((0, 1), np.float32) if table is None else table
    rows = np.fromiter(changed, np.int64, len(changed))
    values = [v for v in changed.values() if v is not None]
    width = max([old.shape[1], *(len(v) // 4 for v in values)])
    n = max(len(old), int(rows.max()) + 1)
    if (n, width) == old.shape:
        out = old.copy()
    else:
        out = np.zeros((n, width), np.float32)
        out[: len(old), : old.shape[1]] = old
    out[rows] = 0.0
    kept = rows[[v is not None for v in changed.values()]]
    if len(kept) and all(len(v) == width * 4 for v in values):  # one decode for all rows
        out[kept] = np.frombuffer(b"".join(values), np.float32).reshape(len(kept), width)
    else:
        for row, v in zip(kept.tolist(), values):
            out[row, : len(v) // 4] = np.frombuffer(v, np.float32)
    return out


@dataclass(frozen=True)
class QueryRows:
    """One query's own state, as a server reads it per request (`read_query`): the rows of its user and
    session (-1: unknown), the user's recent history [n, 2] (None: none), and every model's rows of its
    user and session tables (model -> table -> [1, w] float32; absent where the row is unknown)."""

    user: int
    session: int
    history: np.ndarray | None
    models: dict[str, dict[str, np.ndarray]]


class QueryReader:
    """Reads `QueryRows` of one partition in one round trip (a read-only script over the partition's hash
    tag): vocabulary rows first, then the rows they name, which a pipeline could not chain. `tables`:
    each model's user and session tables (`Model.query_tables`), whose names the script holds, so that a
    read sends the user, the session and the partition's table prefix, not every table's key. `read`
    waits on a client, `aread` on an asyncio client (the lookup API's event loop)."""

    def __init__(self, tables: dict[str, dict[str, TableKind]]):
        listed = [(model, table, kind) for model, own in tables.items() for table, kind in own.items()]
        self.tables = sorted(listed, key=lambda t: t[2] != "user")  # the user tables, then the session tables
        self._source = _read_query({kind: [f"{m}:{t}" for m, t, k in self.tables if k == kind]
                                    for kind in ("user", "session")})
        self._script: Script | None = None
        self._ascript: AsyncScript | None = None
        self._keys: dict[Keys, tuple[list[str], str]] = {}  # a partition's KEYS and its table prefix

    def read(self, client: Client, keys: Keys, user_id: str | None, session_key: str | None) -> QueryRows:
        """The rows of `user_id` and of the session `session_key` (a session vocabulary key; None: the
        user's open session) in partition `keys`."""
        if self._script is None:
            self._script = client.register_script(self._source)
        call_keys, args = self._call(keys, user_id, session_key)
        return self._rows(self._script(keys=call_keys, args=args, client=client))

    async def aread(self, client: AsyncClient, keys: Keys, user_id: str | None, session_key: str | None) -> QueryRows:
        """`read` on an asyncio client."""
        if self._ascript is None:
            self._ascript = client.register_script(self._source)
        call_keys, args = self._call(keys, user_id, session_key)
        return self._rows(await self._ascript(keys=call_keys, args=args, client=client))  # a client made anew too

    def _call(self, keys: Keys, user_id: str | None, session_key: str | None) -> tuple[list[str], list[str]]:
        """The script's KEYS and ARGV."""
        named = self._keys.get(keys)
        if named is None:
            named = self._keys[keys] = ([keys.vocab("user"), keys.vocab("session"), keys.history, keys.open_sessions],
                                        keys.tables)
        return named[0], [user_id or "", session_key or "", named[1]]

    def _rows(self, got: list) -> QueryRows:
        user, session, history, *rows = got
        models: dict[str, dict[str, np.ndarray]] = {}
        for (model, table, _), raw in zip(self.tables, rows):
            if raw is not None:
                models.setdefault(model, {})[table] = np.frombuffer(raw, np.float32)[None, :]
        return QueryRows(-1 if user is None else int(user), -1 if session is None else int(session),
                         None if history is None else _history(history), models)


_TABLE_NAME = re.compile(r"[A-Za-z0-9_.:]+")


def _read_query(tables: dict[str, list[str]]) -> str:
    """The script of `QueryReader` for these user and session tables (`MODEL:TABLE`, after the partition's
    table prefix). KEYS: the user and session vocabularies, the history, the open sessions. ARGV: user id,
    session key ('': the user's open session), the table prefix (a session row is the key `TABLE:ROW`, in
    this slot). Returns {user row, session row, history, user table rows..., session table rows...}, false
    where unknown."""
    def lua(names: list[str]) -> str:
        odd = [n for n in names if not _TABLE_NAME.fullmatch(n)]
        if odd:  # model and table names are identifiers: a quote or an escape would need Lua's own rules
            raise ValueError(f"table names {odd!r} cannot be written into the read script: use letters, digits, "
                             "'_', '.' and ':'")
        return "{" + ", ".join(f"'{n}'" for n in names) + "}"

    return f"""
local user, key, prefix = ARGV[1], ARGV[2], ARGV[3]
local u = false
if user ~= '' then u = redis.call('HGET', KEYS[1], user) end
if key == '' and user ~= '' then
  local open = redis.call('HGET', KEYS[4], user)
  if open then key = string.match(open, '^(.*)|[^|]*$') end
end
local s = false
if key ~= '' then s = redis.call('HGET', KEYS[2], key) end
local out = {{u, s, u and redis.call('HGET', KEYS[3], u)}}
for _, name in ipairs({lua(tables["user"])}) do
  out[#out + 1] = u and redis.call('HGET', prefix .. name, u)
end
for _, name in ipairs({lua(tables["session"])}) do
  out[#out + 1] = s and redis.call('GET', prefix .. name .. ':' .. s)
end
return out
"""


@dataclass
class Changes:
    """One micro-batch's writes for one partition."""

    next_offset: int | None  # None: no event read yet (a commit of folded-in item changes only)
    applied: int
    vocab_new: dict[str, dict[str, int]]
    vocab_removed: dict[str, set[str]]
    open_sessions: dict[str, tuple[str, float]]
    dedup: list[str]  # event ids applied in this commit
    history: dict[int, bytes]  # user row -> int32 (item row, event type) pairs
    tables: list[tuple[str, str, str, np.ndarray | None, np.ndarray]]  # model, table, kind, ids (None: blob), values
    expired: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> rows freed this batch
    item_log: bytes | None = None  # shared items: this commit's item changes, for the other partitions
    cursors: dict[int, int] = field(default_factory=dict)  # shared items: the other partitions' logs folded in so far
    log_trim: int = 0  # entries to drop from the head of the item log (every partition has folded them in)


class PartitionStore:
    """Reads and atomically writes one partition's state in Redis."""

    def __init__(self, client: Client, keys: Keys, dedup_window: int = 100_000, session_ttl: float = 1800.0,
                 worker_id: str = ""):
        self.client = client
        self.keys = keys
        self.worker_id = worker_id  # stored at claim, for `streamrec status`
        self.dedup_window = dedup_window
        self.session_ttl = max(1, int(session_ttl))
        self.token = 0
        self._dedup_sizes: deque[int] = deque()  # ids in each entry of the dedup list, oldest first
        self._script: Script | None = None  # the registered `_FENCED_WRITE`
        self.tables: dict[str, dict[str, TableKind]] = {}  # model -> table -> kind, known after `load`

    def claim(self) -> int:
        """Become the partition's owner; every earlier owner is fenced from now on. One script: the new
        token, the owner and its worker id change together, so `status` never pairs a token with another id."""
        k = self.keys
        token = self.client.register_script(_CLAIM)(keys=[k.epoch, k.owner, k.worker, k.claimed_at], args=[self.worker_id])
        self.token = int(token)
        return self.token

    def load(self, models: dict[str, Model]) -> Snapshot:
        """Read everything the partition needs to resume (claim first). A model some of whose blobs
        were never written (a model new to this partition) is left out: it starts fresh."""
        self.tables = {name: dict(model.tables) for name, model in models.items()}
        snap = read_snapshot(self.client, self.keys, self.tables)
        snap.token, snap.dedup = self.token, self._load_dedup()
        snap.models = {name: state for name, state in snap.models.items() if len(state) == len(self.tables[name])}
        return snap

    def record_gap(self, record: dict) -> None:
        """Mark the state as carried over an offset gap (a lost log); the last 100 such records are kept."""
        pipe = self.client.pipeline(transaction=True)
        pipe.rpush(self.keys.gaps, orjson.dumps(record))
        pipe.ltrim(self.keys.gaps, -100, -1)
        pipe.execute()

    def session_rows_of(self, model: str, table: str, rows: np.ndarray) -> np.ndarray:
        """The stored session rows `[len(rows), width]` (one MGET); zeros where none is stored."""
        k = self.keys
        raw = self.client.mget([k.session_row(model, table, r) for r in rows.tolist()])
        stored = rows_to_array({str(j).encode(): v for j, v in enumerate(raw) if v is not None})
        out = np.zeros((len(rows), stored.shape[1]), np.float32)
        out[: len(stored)] = stored
        return out

    def _load_dedup(self) -> list[str]:
        entries = [orjson.loads(raw) for raw in self.client.lrange(self.keys.dedup, 0, -1)]
        self._dedup_sizes = deque(len(ids) for ids in entries)
        return [i for ids in entries for i in ids]

    def _dedup_trim(self, added: int) -> int:
        """How many of the oldest dedup entries to drop after adding one of `added` ids, keeping
        at least `dedup_window` ids."""
        sizes = list(self._dedup_sizes) + [added]
        total, drop = sum(sizes), 0
        while drop < len(sizes) - 1 and total - sizes[drop] >= self.dedup_window:
            total -= sizes[drop]
            drop += 1
        return drop

    def commit(self, changes: Changes) -> int:
        """Write one batch's changes and the next offset atomically; returns the new version.

        Raises FencedError when another worker owns the partition now.
        """
        k = self.keys
        drop = self._dedup_trim(len(changes.dedup)) if changes.dedup else 0
        writes = _Writes()
        self._write(writes, changes, drop)
        if self._script is None:
            self._script = self.client.register_script(_FENCED_WRITE)
        try:
            version = self._script(keys=[k.owner, k.committed_at, k.changes, *writes.keys],
                                   args=[self.token, orjson.dumps(writes.touched), CHANGES_KEPT, k.commits,
                                         k.partition, *writes.args])
        except redis.ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise FencedError(
                    f"partition {k.partition} of {k.topic} is owned by token {str(exc).split()[-1]}, not {self.token}"
                ) from None
            raise
        if changes.dedup:
            self._dedup_sizes.append(len(changes.dedup))
            for _ in range(drop):
                self._dedup_sizes.popleft()
        return int(version)

    def _write(self, w: _Writes, ch: Changes, dedup_drop: int) -> None:
        k = self.keys
        for kind, names in ch.vocab_new.items():
            w.hset(k.vocab(kind), list(names), list(map(str, names.values())))
        for kind, removed in ch.vocab_removed.items():
            w.fields("HDEL", k.vocab(kind), list(removed))
        w.hset(k.open_sessions, list(ch.open_sessions), [f"{key}|{ts!r}" for key, ts in ch.open_sessions.values()])
        if ch.dedup:
            w.call("RPUSH", k.dedup, orjson.dumps(ch.dedup))
            if dedup_drop:
                w.call("LTRIM", k.dedup, dedup_drop, -1)
        w.hset(k.history, list(ch.history), list(ch.history.values()))
        for model, table, kind, ids, values in ch.tables:
            key = k.table(model, table)
            if ids is None:
                w.call("SET", key, pack_blob(values))
            elif kind == "session":
                for r, row in zip(ids.tolist(), values.astype(np.float32)):
                    w.call("SET", k.session_row(model, table, r), row.tobytes(), "EX", self.session_ttl)
            else:
                w.hset(key, ids.tolist(), values.astype(np.float32))
        for kind, rows in ch.expired.items():
            fields = rows.tolist()
            if kind == "user":
                w.fields("HDEL", k.history, fields)
            for model, tables in self.tables.items():
                for table, table_kind in tables.items():
                    if table_kind == kind == "session":
                        for r in fields:
                            w.call("DEL", k.session_row(model, table, r))
                    elif table_kind == kind:
                        w.fields("HDEL", k.table(model, table), fields)
        if ch.log_trim:
            w.call("LTRIM", k.item_log, ch.log_trim, -1)
            w.call("INCRBY", k.item_log_base, ch.log_trim)
        if ch.item_log is not None:
            w.call("RPUSH", k.item_log, ch.item_log)
        w.hset(k.item_cursors, list(ch.cursors), list(map(str, ch.cursors.values())))
        if ch.next_offset is not None:
            w.call("SET", k.offset, ch.next_offset)
        w.call("INCRBY", k.applied, ch.applied)
        w.call("INCR", k.version)


# KEYS: epoch, owner, worker, claimed_at; ARGV[1]: the claimer's worker id. Returns the new token.
_CLAIM = """
local token = redis.call('INCR', KEYS[1])
local now = redis.call('TIME')
redis.call('SET', KEYS[2], token)
redis.call('SET', KEYS[3], ARGV[1])
redis.call('SET', KEYS[4], now[1] .. '.' .. string.format('%06d', now[2]))
return token
"""

# One round trip, atomic, fenced: KEYS[1] is `owner`, ARGV[1] the caller's token, KEYS[2] `committed_at`
# (set to the server's time), KEYS[3] `changes`; ARGV[2] the JSON of the keys written, ARGV[3] how many
# `changes` entries to keep, ARGV[4] the commits channel, ARGV[5] the partition; then per write ARGV holds
# m (the command and its arguments), the index of its key in KEYS, the command, its arguments. The last
# write is the INCR of `version`: the script returns the new version, logs the change entry under it and
# announces it on the channel.
# `HSET*` is HSET with packed arguments (fields blob, its spec, values blob, its spec; see `_pack`).
_FENCED_WRITE = """
local function split(blob, spec)
  local out, pos = {}, 1
  if string.sub(spec, 1, 1) == '*' then
    local w = tonumber(string.sub(spec, 2))
    for j = 1, #blob / w do
      out[j] = string.sub(blob, pos, pos + w - 1)
      pos = pos + w
    end
  else
    for len in string.gmatch(spec, '%d+') do
      local n = tonumber(len)
      out[#out + 1] = string.sub(blob, pos, pos + n - 1)
      pos = pos + n
    end
  end
  return out
end
local owner = redis.call('GET', KEYS[1])
if owner ~= ARGV[1] then return redis.error_reply('FENCED ' .. tostring(owner)) end
local now = redis.call('TIME')
redis.call('SET', KEYS[2], now[1] .. '.' .. string.format('%06d', now[2]))
local i, result = 6, nil
while i <= #ARGV do
  local m, key = tonumber(ARGV[i]), KEYS[tonumber(ARGV[i + 1])]
  if ARGV[i + 2] == 'HSET*' then
    local fields, values = split(ARGV[i + 3], ARGV[i + 4]), split(ARGV[i + 5], ARGV[i + 6])
    local args = {}
    for j = 1, #fields do
      args[#args + 1] = fields[j]
      args[#args + 1] = values[j]
      if #args >= 4000 or j == #fields then
        result = redis.call('HSET', key, unpack(args))
        args = {}
      end
    end
  else
    result = redis.call(ARGV[i + 2], key, unpack(ARGV, i + 3, i + 1 + m))
  end
  i = i + 2 + m
end
redis.call('RPUSH', KEYS[3], result .. ' ' .. ARGV[2])
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[3]), -1)
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ' ' .. result)
return result
"""
_MAX_ARGS = 4000  # per command: Lua's unpack() takes about 8000 values at most
CHANGES_KEPT = 64  # commits whose change entries a partition keeps (a server further behind reads everything)


class _Writes:
    """Commands for `_FENCED_WRITE`: every key is declared in KEYS (cluster-safe)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.args: list = []
        self._index: dict[str, int] = {}
        self.touched: dict[str, list | None] = {}  # key -> hash fields set or deleted (None: the key itself)

    def call(self, command: str, key: str, *args) -> None:
        index = self._index.get(key)
        if index is None:
            self.keys.append(key)
            index = self._index[key] = len(self.keys) + 3  # KEYS[1..3]: owner, committed_at, changes
        self.args += (len(args) + 1, index, command, *args)
        if command in ("SET", "DEL"):
            self.touched[key] = None

    def fields(self, command: str, key: str, values: list) -> None:
        """A command over hash fields (HDEL), split to fit Lua's argument limit."""
        self.touched.setdefault(key, []).extend(values)  # type: ignore[union-attr]
        for start in range(0, len(values), _MAX_ARGS):
            self.call(command, key, *values[start : start + _MAX_ARGS])

    def hset(self, key: str, fields: list, values: list | np.ndarray) -> None:
        """HSET `fields` (ints or strings) to `values` (strings or bytes, or the rows of a 2-D
        array), sent as one packed argument each that the script splits: per-field arguments
        cost the client more than the rest of the commit."""
        if not len(fields):
            return
        self.touched.setdefault(key, []).extend(fields)  # type: ignore[union-attr]
        self.call("HSET*", key, *_pack(fields), *_pack(values))


def _pack(parts: list | np.ndarray) -> tuple[bytes, str]:
    """Parts as one blob and the spec `_FENCED_WRITE` splits it by: `*w` (all w bytes long)
    or the space-separated byte lengths."""
    if isinstance(parts, np.ndarray):
        width = parts.shape[1] * parts.itemsize
        if width:
            return parts.tobytes(), f"*{width}"
        parts = [b""] * len(parts)
    elif isinstance(parts[0], int):
        parts = list(map(str, parts))
    if isinstance(parts[0], str):
        parts = [p.encode() for p in parts]
    return b"".join(parts), " ".join(map(str, map(len, parts)))


def shared_tag(prefix: str, topic: str) -> str:
    """The hash tag of the keys every partition of a topic shares (shared items)."""
    return f"{{{prefix}:{topic}:shared}}"


def exchange_stream_times(client: Client, prefix: str, topic: str, own: dict[int, tuple[float, int]]
                          ) -> dict[int, tuple[float, int]]:
    """Store the stream time (ts of the latest event learned) and lag (events waiting; -1: unknown) of the
    caller's partitions, and read every partition's: one hash per topic, one round trip. Advisory, so not
    fenced: a zombie's value stops moving and its readers stop counting it (`Worker._align_due`)."""
    key = f"{shared_tag(prefix, topic)}:stream_times"
    pipe = client.pipeline(transaction=False)
    if own:
        pipe.hset(key, mapping={str(p): f"{ts!r} {lag}" for p, (ts, lag) in own.items()})
    pipe.hgetall(key)
    *_, stored = pipe.execute()
    out = {}
    for partition, value in stored.items():
        ts, lag = value.split()
        out[int(partition)] = (float(ts), int(lag))
    return out


class SharedVocab:
    """Rows of ids that every partition of a topic shares (items, context values): one hash per kind,
    rows handed out in order by a counter in the same slot. Not fenced: an id's row never changes, so
    any worker, a fenced one too, may ask."""

    def __init__(self, client: Client, prefix: str, topic: str, kind: str):
        tag = shared_tag(prefix, topic)
        self.client, self.keys = client, [f"{tag}:vocab:{kind}", f"{tag}:vocab:{kind}:n"]
        self._script: Script | None = None

    def __call__(self, names: list[str]) -> list[int]:
        if self._script is None:
            self._script = self.client.register_script(_SHARED_ROWS)
        rows: list[int] = []
        for start in range(0, len(names), _MAX_ARGS):
            rows += self._script(keys=self.keys, args=names[start : start + _MAX_ARGS])
        return rows


# KEYS: the kind's hash (id -> row) and its counter; ARGV: ids. Returns their rows, new ids getting the next ones.
_SHARED_ROWS = """
local out = {}
for i, name in ipairs(ARGV) do
  local row = redis.call('HGET', KEYS[1], name)
  if not row then
    row = redis.call('INCR', KEYS[2]) - 1
    redis.call('HSET', KEYS[1], name, row)
  end
  out[i] = tonumber(row)
end
return out
"""


def read_item_log(client: Client, keys: Keys, start: int, count: int) -> tuple[int, list[bytes]]:
    """Up to `count` entries of a partition's item log from index `start` on (indexes count trimmed
    entries too), read atomically with the trimmed count; returns the index of the first entry given
    (above `start` when entries up to it were trimmed) and the entries."""
    first, entries = client.register_script(_READ_LOG)(keys=[keys.item_log, keys.item_log_base], args=[start, count])
    return int(first), list(entries)


# KEYS: the log, its trimmed count; ARGV: start index, count. Returns {index of the first entry, entries}.
_READ_LOG = """
local base = tonumber(redis.call('GET', KEYS[2]) or '0')
local from = math.max(tonumber(ARGV[1]) - base, 0)
return {base + from, redis.call('LRANGE', KEYS[1], from, from + tonumber(ARGV[2]) - 1)}
"""


def log_trim(client: Client, keys: Keys, readers: Iterable[int]) -> int:
    """How many entries of a partition's item log every reader (partitions) has folded in and its
    head may drop: the least of their committed cursors, less the entries trimmed already."""
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.item_log_base)
    readers = list(readers)
    for reader in readers:
        pipe.hget(Keys(keys.prefix, keys.topic, reader).item_cursors, str(keys.partition))
    base, *cursors = pipe.execute()
    if not readers:
        return 0
    return max(0, min(int(c or 0) for c in cursors) - int(base or 0))


def applied_total(client: Client, prefix: str, topic: str, partitions: Iterable[int]) -> int:
    """Sum of the applied-event counters of a topic's partitions."""
    return sum(int(client.get(Keys(prefix, topic, p).applied) or 0) for p in partitions)
