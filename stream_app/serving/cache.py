"""Redis-backed model cache for the lookup API: one prepared copy of each shard's models, kept fresh.

Each Kafka partition of `events` is a shard with its own vocabularies and
models (see `stream_app.worker.worker`). `ModelCache.shard(p)` returns an immutable
`ShardView` of partition `p`: vocabularies, the users' recent history and
every served model rebuilt with `import_state` from the rows in Redis, plus
what a lookup needs precomputed (popularity vectors, contiguous float32 item
matrices, normalised item vectors, the co-occurrence index, and above a
configurable catalogue size hnswlib indexes).

A refresher thread reads every shard's `version` key (INCR per worker commit)
in one pipelined round trip every `refresh_interval` seconds; a shard whose
version moved is re-read in one MULTI/EXEC (every key of a partition shares
one hash tag, so the read is a consistent snapshot), prepared and swapped in.
Requests never wait for Redis: they read the current views, so answers are at
most `refresh_interval` + one reload stale.

Every Redis call has a timeout and no retries; while the last check failed,
`shard()` raises `ServiceError` (the API turns it into 503 + Retry-After).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Iterable

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from models.base import Batch, Model
from models.features import Featurizer
from models.registry import create
from stream_app.core.errors import ServiceError
from stream_app.core.events import EVENT_TYPES, EVENT_WEIGHTS
from stream_app.io.kafka import partition_for
from stream_app.core.settings import Settings
from stream_app.io.redis import KINDS, Keys, rows_to_array, session_rows, unpack_blob

ITEM_VECTOR_TABLES = ("item", "item_emb")  # item-embedding tables of known models, tried in order
log = logging.getLogger("streamrec.serving")


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
            lengths = np.fromiter((len(h) for h in history.values()), np.int64, len(history))
            users = np.repeat(np.fromiter(history.keys(), np.int64, len(history)), lengths)
            items = np.concatenate(list(history.values()))[:, 0].astype(np.int64)
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


# --------------------------------------------------------------------------- scorers, prepared once per view


class PopScorer:
    """`Popularity.score` for one query row, with everything that does not depend on the query precomputed.

    score(i) = base(i) + weight * mean over the query's usable context values c of share_c(i);
    `base` already holds -inf for rows that map to no item. Built from a popularity model's state
    (the `pop` model, or the popularity fallback inside another model).
    """

    def __init__(self, count: np.ndarray, ctx_count: np.ndarray, context_weight: float, valid: np.ndarray,
                 context_of: Any = None):
        self.context_of = context_of  # batch -> the context columns the model scores with (default: all)
        n = len(valid)
        count = _rows(count, n)[:, 0].astype(np.float64)
        total = count.sum()
        base = (count / total if total > 0 else count).astype(np.float32)
        base[~valid] = -np.inf
        self.base = base
        ctx = _rows(ctx_count, n).astype(np.float64)  # [n, n_context]
        col_total = ctx.sum(axis=0)
        self.usable = col_total > 0  # [n_context]
        self.weight = float(context_weight)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(self.usable, ctx / np.where(self.usable, col_total, 1.0), 0.0)
        self.share_t = np.ascontiguousarray(share.T, np.float32)  # [n_context, n]: a context's column is a row

    def scores(self, batch: Batch) -> np.ndarray:
        """float32 [n_items] for the one-row query `batch`."""
        out = self.base.copy()
        if self.weight:
            context_row = (self.context_of(batch) if self.context_of is not None else batch.context)[0]
            cols = context_row[(context_row >= 0) & (context_row < len(self.usable))]
            cols = cols[self.usable[cols]]
            if len(cols) == 1:
                out += self.weight * self.share_t[cols[0]]
            elif len(cols):
                out += (self.weight / len(cols)) * self.share_t[cols].sum(axis=0)
        return out

    @classmethod
    def of(cls, model: Model | None, valid: np.ndarray) -> "PopScorer | None":
        """For a `Popularity` model, or a model carrying one as `_pop` (MF's cold-start fallback)."""
        from models.popularity import Popularity

        pop = model if isinstance(model, Popularity) else getattr(model, "_pop", None)
        if not isinstance(pop, Popularity):
            return None
        state = pop.export_state()
        context_of = getattr(pop, "_context", None)  # e.g. without the time-of-day columns
        return cls(state["count"], state["ctx_count"], pop.context_weight, valid,
                   context_of if callable(context_of) else None)


def _rows(table: np.ndarray, n: int) -> np.ndarray:
    """`table` cut or zero-padded to n rows (2-D)."""
    table = np.asarray(table)
    if table.ndim == 1:
        table = table[:, None]
    if len(table) >= n:
        return table[:n]
    out = np.zeros((n, max(table.shape[1], 1)), table.dtype)
    out[: len(table), : table.shape[1]] = table
    return out


@dataclass
class EmbeddingScorer:
    """score(u, ctx, i) = q(u, ctx) . V[i] + b[i] for a model exposing an item-embedding table.

    `vectors` is the raw item table ([n, d] float32, C-contiguous), `bias` holds -inf for rows that
    map to no item. `query(batch) -> (q [d] float32, known)` gives the query vector, `known` False
    when the model itself would fall back (e.g. an MF user without a trained row); then `fallback`
    (a PopScorer) answers.
    """

    vectors: np.ndarray
    bias: np.ndarray
    query: Any
    fallback: PopScorer | None

    def scores(self, batch: Batch) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(scores float32 [n], q) for a known query, or (popularity scores, None) when it falls back."""
        q, known = self.query(batch)
        if not known:
            return (self.fallback.scores(batch) if self.fallback is not None else None), None
        return self.vectors @ q + self.bias, q


def _embedding_query(model: Model):
    """The query-vector function of a model, or None.

    Contract: a model may expose `query_embeddings(batch, rows) -> (q [R, d], known [R] bool)`.
    MF (models/mf.py) does not (yet): for it, its own compiled `_query` is used with its tables,
    which is exactly what `MF.score` computes before the dot product.
    """
    fn = getattr(model, "query_embeddings", None)
    if callable(fn):
        def query(batch: Batch):
            q, known = fn(batch, np.array([0]))
            return np.asarray(q[0], np.float32), bool(np.asarray(known)[0])
        return query
    if getattr(model, "name", None) == "mf" and all(hasattr(model, a) for a in ("_user", "_user_state", "_ctx",
                                                                                 "_ctx_state", "admit", "dim")):
        from models.mf import _query as mf_query

        U, us, C, cs = model._user.data, model._user_state.data, model._ctx.data, model._ctx_state.data
        admit = model.admit

        def query(batch: Batch):
            u = int(batch.users[0])
            known = 0 <= u < len(us) and us[u, 0] >= admit
            q = np.empty((1, model.dim), np.float32)
            mf_query(batch.users[:1], batch.context[:1], U, us, C, cs, admit, q)
            return q[0], known
        return query
    return None


def _embedding_scorer(model: Model, n_items: int, valid: np.ndarray) -> EmbeddingScorer | None:
    query = _embedding_query(model)
    if query is None:
        return None
    state = model.export_state()
    raw = _raw_item_vectors(model, state)
    if raw is None:
        return None
    vectors = np.ascontiguousarray(_rows(raw, n_items), np.float32)
    bias = np.zeros(n_items, np.float32)
    if model.tables.get("item_bias") == "item" and "item_bias" in state:
        bias[:] = _rows(state["item_bias"], n_items)[:, 0]
    bias[~valid] = -np.inf
    return EmbeddingScorer(vectors, bias, query, PopScorer.of(model, valid))


class AnnIndex:
    """An hnswlib index over one shard's item vectors (inner product), built from a snapshot.

    Candidates come from the index, then are rescored exactly with the *current* view's vectors,
    so a slightly old index only costs recall, never stale scores; rows added after the build
    (`rows >= n`) are always candidates.
    """

    def __init__(self, vectors: np.ndarray, version: int, *, m: int = 16, ef_construction: int = 100,
                 ef: int = 64, threads: int = 1):
        import hnswlib

        self.n, dim = vectors.shape
        self.version = version
        self.built_at = time.monotonic()
        self.ef = ef
        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(max_elements=max(self.n, 1), ef_construction=ef_construction, M=m)
        if self.n:
            index.add_items(vectors, np.arange(self.n), num_threads=threads)
        index.set_ef(ef)
        self.index = index
        self._lock = threading.Lock()

    def candidates(self, q: np.ndarray, m: int, n_now: int) -> np.ndarray:
        """Up to m rows by inner product with q, plus every row the index does not cover yet."""
        m = min(m, self.n)
        if m <= 0:
            found = np.zeros(0, np.int64)
        else:
            with self._lock:  # set_ef is index-wide
                self.index.set_ef(max(self.ef, m))
                labels, _ = self.index.knn_query(q[None, :], k=m, num_threads=1)
            found = labels[0].astype(np.int64)
        if n_now > self.n:
            found = np.concatenate([found, np.arange(self.n, n_now)])
        return found


@dataclass
class ShardView:
    """A consistent, read-only snapshot of one partition's serving state, prepared for lookups.

    Everything a request needs that does not depend on the request is computed once, when the view
    is built (in the cache's refresher thread): per-model scorers (popularity vectors, contiguous
    float32 item matrices), normalised item vectors and the co-occurrence index.
    """

    partition: int
    version: int
    loaded_at: float  # monotonic
    featurizer: Featurizer
    item_names: list[str | None]
    valid_items: np.ndarray  # [n_items] bool: row currently mapped to an item id
    history: dict[int, np.ndarray]  # user row -> [n, 2] (item row, event type code), oldest first
    models: dict[str, Model]
    scorers: dict[str, PopScorer | EmbeddingScorer] = field(default_factory=dict, repr=False)
    ann: dict[str, tuple[AnnIndex | None, AnnIndex | None]] = field(default_factory=dict, repr=False)
    _cooc: Cooccurrence | None = field(default=None, repr=False)
    _vectors: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def n_items(self) -> int:
        return len(self.item_names)

    def prepare(self) -> "ShardView":
        """Precompute scorers, item vectors and co-occurrence (call before the view is shared)."""
        # One query per model now, so that tables a model grows lazily to the vocabulary's size
        # (GRU, MF) grow here and not under concurrent requests.
        warm = self.featurizer.query(None, {}, time.time())
        for model in self.models.values():
            model.score(warm, np.zeros(1, np.int64))
        for name, model in self.models.items():
            scorer = PopScorer.of(model, self.valid_items) if getattr(model, "name", "") == "pop" else None
            if scorer is None:
                scorer = _embedding_scorer(model, self.n_items, self.valid_items)
            if scorer is not None:
                self.scorers[name] = scorer
            self.item_vectors(name)
        self.cooccurrence()
        return self

    def cooccurrence(self) -> Cooccurrence:
        with self._lock:
            if self._cooc is None:
                self._cooc = Cooccurrence.build(self.history, len(self.featurizer.users), self.n_items)
            return self._cooc

    def item_vectors(self, name: str) -> np.ndarray | None:
        """L2-normalised item embeddings of model `name` ([n_items, d]) or None when it has none."""
        got = self._vectors.get(name, False)
        if got is not False:
            return got
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

    # ---- ranking

    def rank(self, name: str, model: Model, batch: Batch, k: int, exclude: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """(top-k rows best first, their scores) of `model` for the one-row query `batch`.

        Uses the precomputed scorer when there is one (the ANN index for an embedding model whose
        catalogue is above the cache's threshold), else `model.score`."""
        scorer = self.scorers.get(name)
        q = None
        if isinstance(scorer, PopScorer):
            scores = scorer.scores(batch)
        elif isinstance(scorer, EmbeddingScorer):
            index = self.ann.get(name, (None, None))[0]
            q, known = scorer.query(batch)
            if known and index is not None:
                extra = 0 if exclude is None else len(exclude)
                cand = index.candidates(np.append(q, np.float32(1.0)), 4 * k + extra + 16, self.n_items)
                cand_scores = scorer.vectors[cand] @ q + scorer.bias[cand]
                if exclude is not None and len(exclude):
                    cand_scores[np.isin(cand, exclude)] = -np.inf
                order = top_k(cand_scores, k)
                return cand[order], cand_scores[order]
            if known:
                scores = scorer.vectors @ q + scorer.bias
            elif scorer.fallback is not None:
                scores = scorer.fallback.scores(batch)
            else:
                scores = self._generic(model, batch)
        else:
            scores = self._generic(model, batch)
        if exclude is not None and len(exclude):
            scores[exclude[(exclude >= 0) & (exclude < len(scores))]] = -np.inf
        idx = top_k(scores, k)
        return idx, scores[idx]

    def _generic(self, model: Model, batch: Batch) -> np.ndarray:
        raw = np.asarray(model.score(batch, np.array([0]))[0], np.float32)
        scores = np.full(self.n_items, -np.inf, np.float32)
        n = min(len(raw), self.n_items)
        scores[:n] = raw[:n]
        scores[~self.valid_items] = -np.inf
        scores[~np.isfinite(scores)] = -np.inf
        return scores

    def similar_rows(self, name: str, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cosine) of the k items closest to `row` in model `name`'s embedding space (not row itself)."""
        vectors = self.item_vectors(name)
        index = self.ann.get(name, (None, None))[1]
        if index is not None:
            cand = index.candidates(vectors[row], 4 * k + 16, self.n_items)
            sims = vectors[cand] @ vectors[row]
            sims[~self.valid_items[cand] | (cand == row)] = -np.inf
            order = top_k(sims, k)
            return cand[order], sims[order]
        sims = vectors @ vectors[row]
        sims[~self.valid_items] = -np.inf
        sims[row] = -np.inf
        idx = top_k(sims, k)
        return idx, sims[idx]


def _raw_item_vectors(model: Model, state: dict[str, np.ndarray] | None = None) -> np.ndarray | None:
    getter = getattr(model, "item_embeddings", None)
    if callable(getter):
        return getter()
    state = model.export_state() if state is None else state
    for table in ITEM_VECTOR_TABLES:
        if model.tables.get(table) == "item" and table in state:
            return state[table]
    return None


def _item_vectors(model: Model | None, n_items: int) -> np.ndarray | None:
    if model is None:
        return None
    vectors = _raw_item_vectors(model)
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
    """Per-shard serving state rebuilt from Redis, refreshed in the background when a shard's `version` moves.

    A refresher thread reads every shard's `version` key in one round trip every `refresh_interval`
    seconds and rebuilds (then prepares) the shards whose version moved; requests only read the
    views it swapped in, so the request path makes no Redis call at all. While the latest check
    failed (Redis unreachable), `shard()` raises `ServiceError` (the API answers 503).

    Above `ann_threshold` items, embedding models also get hnswlib indexes (user recommendations and
    similar items), rebuilt in the refresher thread at most every `ann_rebuild_interval` seconds.
    """

    def __init__(self, settings: Settings, models: Iterable[str] = ("pop",), *, refresh_interval: float = 0.25,
                 timeout: float = 1.0, client: redis.Redis | None = None, ann_threshold: int = 50_000,
                 ann_rebuild_interval: float = 30.0, background: bool = True):
        self.settings = settings
        self.model_names = tuple(models)
        for name in self.model_names:
            create(name)  # unknown names fail here, at start-up
        self.partitions = settings.events_partitions
        self.refresh_interval = refresh_interval
        self.timeout = timeout
        self.ann_threshold = ann_threshold
        self.ann_rebuild_interval = ann_rebuild_interval
        self.background = background
        self.client = client or redis_client(settings.redis_url, timeout)
        self._views: dict[int, ShardView] = {}
        self._checked: dict[int, float] = {}
        self._ann: dict[tuple[int, str], tuple[AnnIndex | None, AnnIndex | None]] = {}
        self._load_lock = threading.Lock()
        self._error: str | None = None
        self._ok_at = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.reloads = 0
        self.last_reload_seconds = 0.0
        self.ann_builds = 0

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
                version = int(self._call(self.client.get, self.keys(partition).version) or 0)
                view = self._install(partition, version)
            return view

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
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the thread must survive anything; refresh() recorded Redis errors
                log.warning("model cache refresh failed", exc_info=True)
            self._stop.wait(max(0.0, self.refresh_interval - (time.monotonic() - started)))

    def refresh(self) -> None:
        """Check every shard's version (one round trip) and rebuild the shards that moved."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for p in range(self.partitions):
                pipe.get(self.keys(p).version)
            versions = [int(v or 0) for v in pipe.execute()]
        except redis.RedisError as exc:
            self._error = f"Redis at {self.settings.redis_url} is not answering ({exc}); retry shortly"
            return
        now = time.monotonic()
        for p, version in enumerate(versions):
            view = self._views.get(p)
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
        started = time.perf_counter()
        view = self._load(partition).prepare()
        for name in view.models:
            view.ann[name] = self._ann.get((partition, name), (None, None))
        self.last_reload_seconds = time.perf_counter() - started
        self.reloads += 1
        self._views[partition] = view
        self._checked[partition] = time.monotonic()
        return view

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
            states[name][table] = rows_to_array(self._call(session_rows, self.client, k, name, table))
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

    def _maybe_build_ann(self) -> None:
        """(Re)build hnswlib indexes of embedding models above the threshold, at most every rebuild interval."""
        for p, view in list(self._views.items()):
            if view.n_items < self.ann_threshold:
                continue
            for name in view.models:
                scorer = view.scorers.get(name)
                vectors = view.item_vectors(name)
                if vectors is None:
                    continue
                old = self._ann.get((p, name), (None, None))
                built = old[0] or old[1]
                if built is not None and (built.version == view.version
                                          or time.monotonic() - built.built_at < self.ann_rebuild_interval):
                    continue
                recs = None
                if isinstance(scorer, EmbeddingScorer):  # [V, b] . [q, 1] = q . V + b
                    bias = np.where(np.isfinite(scorer.bias), scorer.bias, -1e4).astype(np.float32)
                    recs = AnnIndex(np.hstack([scorer.vectors, bias[:, None]]), view.version)
                sims = AnnIndex(vectors, view.version)
                self._ann[(p, name)] = (recs, sims)
                view.ann[name] = (recs, sims)
                self.ann_builds += 1


def strongest(history: np.ndarray) -> dict[int, str]:
    """Item row -> its strongest event type in a user's history (purchase > favorite > click)."""
    out: dict[int, str] = {}
    for item, code in history.tolist():
        kind = EVENT_TYPES[code] if 0 <= code < len(EVENT_TYPES) else "click"
        if item not in out or EVENT_WEIGHTS[kind] > EVENT_WEIGHTS[out[item]]:
            out[item] = kind
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite scores, best first (one np.argpartition over the whole vector)."""
    n = len(scores)
    if n == 0 or k <= 0:
        return np.zeros(0, np.int64)
    neg = -scores
    part = np.argpartition(neg, k - 1)[:k] if n > k else np.arange(n)
    part = part[np.isfinite(neg[part])]  # fewer than k finite scores: -inf rows are not answers
    return part[np.argsort(neg[part], kind="stable")]


def query_batch(view: ShardView, user_id: str | None, context: dict[str, str], ts: float,
                session_id: str | None = None, session_row: int | None = None) -> Batch:
    """`Featurizer.query`, optionally pinned to a session row (a user's open implicit session)."""
    batch = view.featurizer.query(user_id, context, ts, session_id)
    if session_row is not None and session_row >= 0:
        batch = replace(batch, sessions=np.array([session_row]))
    return batch
