"""Redis-backed model cache for the lookup API: one prepared view of each shard, kept fresh, and the
asking user's own rows read per request.

Each Kafka partition of `events` is a shard with its own vocabularies and
models (see `stream_app.worker.worker`). `ModelCache.shard(p)` returns an immutable
`ShardView` of partition `p` (`stream_app.serving.view`): what every lookup shares, the
item and context vocabularies and every served model rebuilt with `import_state` from
its item, context-value, blob and own tables in Redis, prepared for lookups, plus,
above a configurable catalogue size, hnswlib indexes of the embedding models. A view
holds no user's or session's rows, so the API's memory does not grow with the user base
(the users' history only where co-occurrence explains answers). `ModelCache.query`
reads one user's and session's rows on the request path, in one round trip: an answer
sees the asking user's events as soon as a worker committed them.

A refresher thread reads every shard's `version` key (INCR per worker commit)
in one pipelined round trip whenever a worker announces a commit on the
`commits` channel, and at least every `refresh_interval` seconds. A shard whose
version moved (and that did not catch up in the last `catch_up_interval` seconds, which
bounds the refresher's share of the process under a busy stream; a request's own rows
never wait for it) catches up by re-reading only what the commits since its view
wrote (`stream_app.io.redis.read_changes`), or, when too far behind and every
`full_interval` seconds, as one consistent snapshot (`read_snapshot`); the new
view is prepared and swapped in. Requests never wait for a view: they read the
current ones, so item state is one catch-up behind a commit.

Every Redis call has a timeout and no retries; while the last check failed,
`shard()` raises `ServiceError` (the API turns it into 503 + Retry-After), as does a
failed `query`. A Redis Cluster works the same: one partition's keys share a slot, so
its snapshot is still one MULTI/EXEC and a query one script; the version check is a
pipeline split by node.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import replace
from functools import lru_cache
from typing import Any

import numpy as np

from models.base import QUERY_KINDS, Model
from models.blend import Blend
from models.features import Featurizer
from models.registry import create
from stream_app.core.errors import ServiceError
from stream_app.core.events import prepare
from stream_app.core.memory import release_free_heap
from stream_app.core.settings import Settings, redact
from stream_app.io.kafka import partition_for
from stream_app.io.redis import (
    FAILURES,
    KINDS,
    AsyncClient,
    Client,
    Keys,
    QueryReader,
    QueryRows,
    Snapshot,
    connect,
    connect_async,
    read_changes,
    read_history_pairs,
    read_snapshot,
)
from stream_app.serving.scorers import AnnIndex, Cooccurrence, EmbeddingScorer, top_k
from stream_app.serving.view import ShardView

log = logging.getLogger("streamrec.serving")
VOCABS = ("users", "items", "sessions", "contexts")  # the featurizer's vocabulary of each of `KINDS`
VIEW_KINDS = ("item", "context")  # the vocabularies a view holds (users and sessions: read per request)


@lru_cache(maxsize=65536)
def user_partition(user_id: str, n: int) -> int:
    """The partition (shard) of a user: the producer's key partitioner over the user id."""
    return partition_for(user_id.encode("utf-8"), n)


class ModelCache:
    """Per-shard serving state rebuilt from Redis, refreshed in the background when a shard's `version` moves,
    and each query's own rows read on request.

    A refresher thread reads every shard's `version` key in one round trip when a commit is announced
    (at least every `refresh_interval` seconds) and rebuilds (then prepares) the shards whose version
    moved, from the rows that changed; requests read the views it swapped in and make one Redis call
    of their own (`query`). While the latest check failed (Redis unreachable), `shard()` raises
    `ServiceError` (the API answers 503).

    Above `ann_threshold` items, embedding models also get hnswlib indexes (user recommendations and
    similar items), rebuilt in the refresher thread at most every `ann_rebuild_interval` seconds.
    """

    def __init__(self, settings: Settings, models: Iterable[str] = ("pop",), *, refresh_interval: float = 0.25,
                 timeout: float = 1.0, client: Client | None = None, ann_threshold: int = 50_000,
                 ann_rebuild_interval: float = 30.0, background: bool = True, full_interval: float = 600.0,
                 catch_up_interval: float | None = None):
        self.settings = settings
        self.model_names = tuple(models)
        probes = {name: create(name) for name in self.model_names}  # unknown names fail here, at start-up
        # A view holds what every query shares: item, context-value, blob and own tables, and the item and
        # context vocabularies; a user's and a session's own rows are read per request (`query`). The users'
        # history only when no served model has similarity vectors: co-occurrence explains answers then.
        self.view_tables = {name: {t: kind for t, kind in m.tables.items() if kind not in QUERY_KINDS}
                            for name, m in probes.items()}
        self.view_history = all(m.similarity_vectors() is None for m in probes.values())
        self.partitions = settings.events_partitions
        self.refresh_interval = refresh_interval
        # at least this long between two catch-ups of a shard (None: `refresh_interval`)
        self.catch_up_interval = refresh_interval if catch_up_interval is None else catch_up_interval
        self.timeout = timeout
        self.ann_threshold = ann_threshold
        self.ann_rebuild_interval = ann_rebuild_interval
        self.background = background
        self.full_interval = full_interval
        self._full_at: dict[int, float] = {}  # partition -> when its last full snapshot was read (monotonic)
        self.client = client or connect(settings.redis_url, timeout, fail_fast=True)
        self._query = QueryReader({name: m.query_tables() for name, m in probes.items()})
        self._aclient: AsyncClient | None = None  # the request path's, made in the event loop that first asks
        self._views: dict[int, ShardView] = {}
        self._checked: dict[int, float] = {}
        self._ann: dict[tuple[int, str], tuple[AnnIndex | None, AnnIndex | None]] = {}
        self._load_lock = threading.Lock()
        self._error: str | None = None
        self._ok_at = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.reloads = 0
        self.full_reloads = 0
        self.last_reload_seconds = 0.0
        self.ann_builds = 0

    def compile_models(self) -> None:
        """Learn and answer a made-up two-event session with a new instance of each served model, alone
        and as lookups that wait together are answered, and pick its top items, so that what numba builds
        on first use (its typing context and the kernels, tens of thousands of objects) exists now: a
        server that freezes its heap after this keeps them out of every later full collection, and no
        lookup waits for a compilation."""
        now = time.time()
        events = [prepare({"user_id": "u", "session_id": "s", "item_id": item, "event_type": "click", "ts": now})
                  for item in ("a", "b")]
        for name in self.model_names:
            featurizer, model = Featurizer(), create(name)
            model.learn(featurizer.batch(events))
            query = featurizer.query("u", {}, now, "s")
            top_k(model.score(query, np.zeros(1, np.int64))[0], 1)
            if model.item_vectors() is not None:
                model.query_vectors(query, np.zeros(1, np.int64))
            # as lookups that wait together are scored (`Recommender._ranked`)
            if isinstance(model, Blend):
                Blend.explain_each([(model, query)] * 2)
            else:
                type(model).score_each([(model, query)] * 2)

    def keys(self, partition: int) -> Keys:
        return Keys(self.settings.key_prefix, self.settings.events_topic, partition)

    def partition_of_user(self, user_id: str) -> int:
        return user_partition(user_id, self.partitions)

    def query(self, partition: int, user_id: str | None, session_key: str | None = None) -> QueryRows:
        """The asking user's and session's own rows in partition `partition`, read now in one round trip
        (`session_key` None: the user's open session): answers see a user's events as soon as they are
        committed, whatever the views' age."""
        return self._call(lambda client: self._query.read(client, self.keys(partition), user_id, session_key))

    async def aquery(self, partition: int, user_id: str | None, session_key: str | None = None) -> QueryRows:
        """`query` for the event loop: it serves other requests while Redis answers."""
        if self._aclient is None:
            self._aclient = connect_async(self.settings.redis_url, self.timeout)
        try:
            return await self._query.aread(self._aclient, self.keys(partition), user_id, session_key)
        except FAILURES as exc:
            raise self._unanswered(exc) from None

    async def aclose(self) -> None:
        """Close the request path's client (the refresher's is closed by `close`)."""
        client, self._aclient = self._aclient, None
        if client is not None:
            await client.aclose()

    def ping(self) -> None:
        self._call(lambda client: client.ping())

    def _call(self, fn, *args: Any) -> Any:
        """`fn(client, *args)`, any Redis failure (a cluster client's first use included) as `ServiceError`."""
        try:
            return fn(self.client, *args)
        except FAILURES as exc:
            raise self._unanswered(exc) from None

    def _unanswered(self, exc: Exception) -> ServiceError:
        return ServiceError(f"Redis at {redact(self.settings.redis_url)} is not answering ({exc}); retry shortly")

    # ---- the request path (no Redis)

    def shard(self, partition: int) -> ShardView:
        """The shard's current view (loaded here only the first time; later refreshed in the background)."""
        if self._thread is None and self.background:
            self.start()
        if self._error is not None:
            raise ServiceError(self._error)
        view = self._views.get(partition)
        if view is not None:
            if not self.background and time.monotonic() - self._checked.get(partition, 0.0) >= self.refresh_interval:
                self.refresh()
                view = self._views[partition]
            return view
        with self._load_lock:
            view = self._views.get(partition)
            if view is None:
                version = int(self._call(lambda client: client.get(self.keys(partition).version)) or 0)
                view = self._install(partition, version)
            return view

    def status(self) -> tuple[str | None, int]:
        """(the last refresh's Redis error or None, how many shards are loaded), for readiness: no I/O."""
        return self._error, len(self._views)

    def views(self) -> list[ShardView]:
        return [self.shard(p) for p in range(self.partitions)]

    def cached(self) -> dict[int, tuple[ShardView, float]]:
        """The views held now and when their version was last confirmed (monotonic), for metrics."""
        return {p: (v, self._checked.get(p, v.loaded_at)) for p, v in list(self._views.items())}

    # ---- the refresher

    def start(self) -> None:
        with self._load_lock:
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="streamrec-model-cache", daemon=True)
                self._thread.start()

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.timeout + 5)
        self.background = False

    def _run(self) -> None:
        commits: Any = None  # a pub/sub connection to the commits channel, while Redis answers
        warned = False  # that announcements fail (said once per outage)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the thread must survive anything; refresh() recorded Redis errors
                log.warning("model cache refresh failed", exc_info=True)
            wait = max(0.0, self.refresh_interval - (time.monotonic() - started))
            try:
                if commits is None:
                    commits = self.client.pubsub(ignore_subscribe_messages=True)
                    commits.subscribe(self.keys(0).commits)
                if commits.get_message(timeout=wait) is not None:
                    while commits.get_message(timeout=0) is not None:  # one refresh for every commit announced so far
                        pass
                warned = False
            except FAILURES as exc:  # polled only, until Redis answers again
                if not warned:
                    warned = True
                    log.warning("no commit announcements on %s (%s); checking versions every %.2f s",
                                self.keys(0).commits, exc, self.refresh_interval)
                _closed(commits)
                commits = None
                self._stop.wait(wait)
        _closed(commits)

    def refresh(self) -> None:
        """Check every shard's version (one round trip) and rebuild the shards that moved."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for p in range(self.partitions):
                pipe.get(self.keys(p).version)
            versions = [int(v or 0) for v in pipe.execute()]
        except FAILURES as exc:
            self._error = str(self._unanswered(exc))
            return
        now = time.monotonic()
        for p, version in enumerate(versions):
            view = self._views.get(p)
            if view is not None and view.version != version and now - view.loaded_at < self.catch_up_interval:
                continue  # caught up moments ago: at most one catch-up per shard and interval (the next check)
            if view is None or view.version != version:
                try:
                    with self._load_lock:
                        self._install(p, version)
                except ServiceError as exc:
                    self._error = str(exc)
                    return
            else:
                self._checked[p] = now
        self._error = None
        self._ok_at = now
        self._maybe_build_ann()

    def _install(self, partition: int, version: int) -> ShardView:
        started, full_reloads = time.perf_counter(), self.full_reloads
        view = self._load(partition, version).prepare()
        if self.full_reloads != full_reloads:  # a read whole leaves its peak resident unless handed back
            release_free_heap()
        for name in view.models:
            view.ann[name] = self._ann.get((partition, name), (None, None))
        self.last_reload_seconds = time.perf_counter() - started
        self.reloads += 1
        self._views[partition] = view
        self._checked[partition] = time.monotonic()
        return view

    def _load(self, partition: int, version: int | None = None) -> ShardView:
        """Partition `partition` read from Redis, its models rebuilt (not yet prepared): its current view
        caught up to `version` from the rows that changed (vocabularies and co-occurrence updated, not
        rebuilt), else (and every `full_interval` s) a full snapshot."""
        probes = {name: create(name) for name in self.model_names}
        keys, old, snap = self.keys(partition), self._views.get(partition), None
        if (version is not None and old is not None and old.snapshot is not None
                and (old.cooc is not None or not self.view_history)
                and time.monotonic() - self._full_at.get(partition, 0.0) < self.full_interval):
            base = old.snapshot
            snap = self._call(lambda client: read_changes(client, keys, self.view_tables, base, version, VIEW_KINDS,
                                                          self.view_history, open_sessions=False))
        if snap is None:
            self._full_at[partition] = time.monotonic()
            self.full_reloads += 1
            snap = self._call(lambda client: read_snapshot(client, keys, self.view_tables, VIEW_KINDS, history=False,
                                                           open_sessions=False))
        f = _featurizer(snap, None if old is None else old.featurizer)
        models = {name: model for name, model in probes.items() if _import(partition, name, model, snap)}
        names = list(f.items.names)
        valid = np.array([n is not None for n in names], bool)
        cooc = None
        if self.view_history:  # the co-occurrence index is all a view keeps of the users' histories
            if snap.history_changed is None:  # read whole
                users, items = self._call(read_history_pairs, keys)
                cooc = Cooccurrence.of_pairs(users, items, len(names))
            elif old is not None and old.cooc is not None:
                cooc = old.cooc.updated(snap.history, snap.history_changed, len(names))
            snap = replace(snap, history={}, history_changed=set())
        return ShardView(partition, snap.version, time.monotonic(), f, names, valid, models, snap, cooc=cooc)

    def _maybe_build_ann(self) -> None:
        """(Re)build hnswlib indexes of embedding models above the threshold, at most every rebuild interval."""
        for p, view in list(self._views.items()):
            if view.n_items < self.ann_threshold:
                continue
            for name in view.models:
                scorer = view.scorers.get(name)
                vectors = view.item_vectors(name)
                if vectors is None and not isinstance(scorer, EmbeddingScorer):
                    continue
                old = self._ann.get((p, name), (None, None))
                built = old[0] or old[1]
                if built is not None and (built.version == view.version
                                          or time.monotonic() - built.built_at < self.ann_rebuild_interval):
                    continue
                recs = AnnIndex.for_recommendations(scorer, view.version) if isinstance(scorer, EmbeddingScorer) else None
                sims = AnnIndex(vectors, view.version) if vectors is not None else None
                self._ann[(p, name)] = (recs, sims)
                view.ann[name] = (recs, sims)
                self.ann_builds += 1


def _closed(commits: Any) -> None:
    """Close a pub/sub connection (None: none), whatever state it is in."""
    if commits is not None:
        with contextlib.suppress(Exception):
            commits.close()


def _featurizer(snap: Snapshot, base: Featurizer | None) -> Featurizer:
    """The partition's vocabularies and open sessions, as the worker left them: `base`'s vocabularies
    updated when the snapshot was caught up from the one `base` was made of."""
    f = Featurizer()
    for kind, attr in zip(KINDS, VOCABS):
        if kind not in VIEW_KINDS:
            continue
        if base is not None and snap.vocab_changes is not None:
            setattr(f, attr, getattr(base, attr).updated(snap.vocab_changes.get(kind, {})))
        else:
            getattr(f, attr).restore(snap.vocabs[kind])
    return f


def _import(partition: int, name: str, model: Model, snap: Snapshot) -> bool:
    """Load `model`'s state from the snapshot; False (logged) when this shard cannot serve it."""
    read = snap.models[name]
    if not any(len(v) for v in read.values()):
        log.debug("partition %s: model %s not served, the worker has written no state for it yet", partition, name)
        return False
    # tables a view does not hold (users', sessions') and blobs nobody wrote yet: empty
    state = {**dict.fromkeys(model.tables, np.zeros((0, 1), np.float32)), **read}
    try:
        model.import_state(state)
    except Exception as exc:  # noqa: BLE001 - a half-written model must not take the API down
        log.warning("partition %s: model %s not served, its state does not load (%s: %s)",
                    partition, name, type(exc).__name__, exc)
        return False
    return True
