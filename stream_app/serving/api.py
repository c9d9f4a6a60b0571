"""The lookup HTTP API (DESIGN.md section 7), served from the Redis state the workers write.

    GET  /recommendations?user_id=U&k=20[&model=pop][&context.device=ios...][&include_seen=true]
    GET  /recommendations?session_id=S&k=20[&model=...]
    GET  /items/{item_id}/similar?k=20[&model=...]
    POST /events            one event object or a list of them
    GET  /healthz, /metrics

A user's state lives in the shard (Kafka partition) its user_id hashes to
(kafka-python's murmur2 partitioner), so a user lookup reads one shard;
sessions and similar items look in every shard. Unknown users, sessions and
items get context-aware popularity, never an error. Bad parameters get a 4xx
JSON `{"error": message}`; an unreachable Redis or Kafka gets 503 with
`Retry-After`, never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from stream_app.core.events import MAX_CONTEXT_KEYS, MAX_ID_CHARS, encode
from stream_app.core.errors import InvalidEvent, ServiceError
from stream_app.core.threads import limit_blas_threads
from stream_app.serving.cache import ModelCache, ShardView, query_batch, strongest, top_k
from stream_app.core.settings import Settings

log = logging.getLogger("streamrec.api")
MAX_K = 1000
MAX_EVENTS_PER_POST = 10_000
RETRY_AFTER = 1  # seconds, for 503 answers
RECOMMEND_PARAMS = {"user_id", "session_id", "k", "model", "include_seen"}
SIMILAR_PARAMS = {"k", "model"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        self.status = status
        self.message = message
        self.extra = extra


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status, headers,
                    media_type="application/json")


# --------------------------------------------------------------------------- parameters


def _check_params(request: Request, allowed: set[str]) -> None:
    unknown = sorted({k for k in request.query_params if k not in allowed and not k.startswith("context.")})
    if unknown:
        raise ApiError(400, f"unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
                            + (", context.<key>" if "user_id" in allowed else ""))
    for key in allowed:
        if len(request.query_params.getlist(key)) > 1:
            raise ApiError(400, f"{key} is given more than once")


def _k(request: Request) -> int:
    raw = request.query_params.get("k", "20")
    try:
        k = int(raw)
    except ValueError:
        raise ApiError(400, f"k must be an integer between 1 and {MAX_K} (got {raw!r})") from None
    if not 1 <= k <= MAX_K:
        raise ApiError(400, f"k must be between 1 and {MAX_K} (got {k})")
    return k


def _id(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    if not value.strip():
        raise ApiError(400, f"{name} must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise ApiError(400, f"{name} must be at most {MAX_ID_CHARS} characters (got {len(value)})")
    return value


def _context(request: Request) -> dict[str, str]:
    context: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if not key.startswith("context."):
            continue
        name = key[len("context."):]
        if not name:
            raise ApiError(400, "context parameters are named context.<key>, e.g. context.device=ios (got an empty key)")
        if name in context:
            raise ApiError(400, f"context.{name} is given more than once")
        if len(value) > MAX_ID_CHARS:
            raise ApiError(400, f"context.{name} must be at most {MAX_ID_CHARS} characters (got {len(value)})")
        context[name] = value
    if len(context) > MAX_CONTEXT_KEYS:
        raise ApiError(400, f"context must have at most {MAX_CONTEXT_KEYS} keys (got {len(context)})")
    return context


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "false").lower()
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no"):
        return False
    raise ApiError(400, f"{name} must be true or false (got {raw!r})")


# --------------------------------------------------------------------------- the app


class Recommender:
    """The endpoints' logic over a `ModelCache` (no HTTP in here)."""

    def __init__(self, cache: ModelCache):
        from models.registry import create

        self.cache = cache
        self.models = cache.model_names
        self.query_kind = {name: type(create(name)).query for name in self.models}

    def model(self, requested: str | None, query: str) -> str:
        if requested is None:
            matching = [n for n in self.models if self.query_kind[n] == query]
            return (matching or list(self.models))[0]
        if requested not in self.models:
            raise ApiError(400, f"unknown model {requested!r}; this server serves: {', '.join(self.models)}",
                           models=list(self.models))
        return requested

    # ---- /recommendations

    def for_user(self, user_id: str, k: int, model: str, context: dict[str, str], include_seen: bool) -> dict:
        partition = self.cache.partition_of_user(user_id)
        view = self.cache.shard(partition)
        f = view.featurizer
        row = f.users.get(user_id)
        history = view.history.get(row) if row >= 0 else None
        known = history is not None and len(history) > 0
        used, m = self._pick(view, model)
        items: list[dict] = []
        if m is not None:
            session_row = None
            if m.query == "session" and user_id in f.open_sessions:
                session_row = f.sessions.get(f.open_sessions[user_id][0])
            batch = query_batch(view, user_id, context, time.time(), session_row=session_row)
            exclude = history[:, 0] if known and not include_seen else None
            idx, scores = view.rank(used, m, batch, k, exclude)
            reasons = self._reasons(view, used, idx, history, context) if known else [_popular(context)] * len(idx)
            names = view.item_names
            items = [{"item_id": names[i], "score": s, "reason": r}
                     for i, s, r in zip(idx.tolist(), scores.tolist(), reasons)]
        return {"user_id": user_id, "model": model, "model_version": view.version, "partition": partition,
                "items": items}

    def for_session(self, session_id: str, k: int, model: str, context: dict[str, str]) -> dict:
        key = "s:" + session_id
        views = self.cache.views()
        found = [v for v in views if v.featurizer.sessions.get(key) >= 0]
        view = found[0] if found else max(views, key=lambda v: (int(v.valid_items.sum()), -v.partition))
        used, m = self._pick(view, model)
        items: list[dict] = []
        if m is not None:
            exclude = None
            if m.query == "session" and found:
                batch = query_batch(view, None, context, time.time(), session_id=session_id)
                reason: dict = {"kind": "session", "session_id": session_id}
                exclude = m.session_items(int(batch.sessions[0]))  # next items: not the ones already in it
            else:  # a user model (or an unknown session): what is popular in this context
                batch = query_batch(view, None, context, time.time())
                reason = _popular(context)
                if m.query != "session":
                    reason["note"] = f"{used} ranks for users, not sessions; answered by popularity in context"
            idx, scores = view.rank(used, m, batch, k, exclude)
            items = [{"item_id": view.item_names[i], "score": s, "reason": reason}
                     for i, s in zip(idx.tolist(), scores.tolist())]
        return {"user_id": None, "session_id": session_id, "model": model, "model_version": view.version,
                "partition": view.partition, "items": items}

    def _pick(self, view: ShardView, model: str):
        """The requested model of this shard, else its popularity (a shard without the model's state yet)."""
        if model in view.models:
            return model, view.models[model]
        if "pop" in view.models:
            return "pop", view.models["pop"]
        return model, None

    def _reasons(self, view: ShardView, model: str, idx: np.ndarray, history: np.ndarray,
                 context: dict[str, str]) -> list[dict]:
        """For each recommended item, the item of the user's recent history closest to it."""
        if len(idx) == 0:
            return []
        kinds = strongest(history)
        anchors = list(dict.fromkeys(int(i) for i in history[::-1, 0].tolist() if 0 <= i < view.n_items))
        anchors = [a for a in anchors if view.valid_items[a]]
        if not anchors:
            return [_popular(context)] * len(idx)
        vm = view.vector_model(model)
        if vm is not None:
            vectors = view.item_vectors(vm)
            sims = vectors[idx] @ vectors[anchors].T  # [k, anchors], tiny
            how = "embedding"
        else:
            sims = view.cooccurrence().counts(idx.tolist(), anchors)
            how = "co_occurrence"
        best = np.argmax(sims, axis=1)  # ties go to the most recent anchor
        top = sims[np.arange(len(best)), best].tolist()
        out = []
        for j, sim in zip(best.tolist(), top):
            a = anchors[j]
            out.append({"kind": "similar_to", "item_id": view.item_names[a], "event_type": kinds.get(a, "click"),
                        "by": how, "similarity": sim})
        return out

    # ---- /items/{id}/similar

    def similar(self, item_id: str, k: int, model: str | None) -> dict:
        merged: dict[str, tuple[float, dict]] = {}
        versions: dict[str, int] = {}
        used: set[str] = set()
        found = False
        for view in self.cache.views():
            versions[str(view.partition)] = view.version
            row = view.featurizer.items.get(item_id)
            if row < 0 or row >= view.n_items:
                continue
            found = True
            vm = view.vector_model(model)
            if vm is not None:
                used.add(vm)
                reason = {"kind": "embedding", "model": vm, "item_id": item_id}
                rows, sims = view.similar_rows(vm, row, k)
                for i, sim in zip(rows.tolist(), sims.tolist()):
                    name = view.item_names[i]
                    if name not in merged or sim > merged[name][0]:
                        merged[name] = (sim, reason)
                continue
            else:
                co = view.cooccurrence().similar(row)
                ctx_scores, ctx = self._context_popularity(view, row)
                scores = co + 1e-3 * ctx_scores / max(float(ctx_scores.max(initial=0.0)), 1e-12)
                reasons = lambda i, co=co, ctx=ctx: (  # noqa: E731
                    {"kind": "co_occurrence", "item_id": item_id} if co[i] > 0 else {"kind": "popular", "context": ctx})
                used.add("co_occurrence")
            scores[~view.valid_items] = -np.inf
            scores[row] = -np.inf
            for i in top_k(scores, k):
                name = view.item_names[i]
                if name not in merged or scores[i] > merged[name][0]:
                    merged[name] = (float(scores[i]), reasons(i))
        if not found:  # unknown item: popular overall
            for view in self.cache.views():
                used_name, m = self._pick(view, model or self.models[0])
                if m is None:
                    continue
                rows, scores = view.rank(used_name, m, query_batch(view, None, {}, time.time()), k)
                for i, score in zip(rows.tolist(), scores.tolist()):
                    name = view.item_names[i]
                    old = merged.get(name, (0.0, None))[0]
                    merged[name] = (old + score, _popular({}))
            used.add("popularity")
        best = sorted(merged.items(), key=lambda kv: -kv[1][0])[:k]
        return {"item_id": item_id, "known": found, "model": ",".join(sorted(used)), "model_version": versions,
                "items": [{"item_id": n, "score": _num(s), "reason": r} for n, (s, r) in best]}

    @staticmethod
    def _context_popularity(view: ShardView, row: int) -> tuple[np.ndarray, dict[str, str]]:
        """Popularity in the item's own top contexts (from the pop model's per-context counts)."""
        pop = view.models.get("pop")
        scorer = view.scorers.get("pop")
        if pop is None or scorer is None:
            return np.zeros(view.n_items), {}
        ctx_counts = pop.export_state()["ctx_count"]
        if row >= len(ctx_counts):
            return np.zeros(view.n_items), {}
        profile = ctx_counts[row]
        cols = [int(c) for c in np.argsort(-profile)[:3] if profile[c] > 0]
        names = view.featurizer.contexts.names
        context: dict[str, str] = {}
        for c in cols:
            name = names[c] if c < len(names) else None
            if name and "=" in name and not name.startswith(("hour=", "dow=")):
                key, _, value = name.partition("=")
                context.setdefault(key, value)
        batch = query_batch(view, None, context, time.time())
        return np.nan_to_num(scorer.scores(batch).astype(np.float64), neginf=0.0), context


def _popular(context: dict[str, str]) -> dict:
    return {"kind": "popular", "context": dict(context)}


def _num(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def create_app(settings: Settings | None = None, models: tuple[str, ...] | list[str] = ("pop",), *,
               refresh_interval: float = 0.25, redis_timeout: float = 1.0, producer: Any = None,
               ann_threshold: int = 50_000, blas_threads: int | None = 1) -> FastAPI:
    """The FastAPI app over the state in `settings.redis_url` for `settings.events_topic`.

    `ann_threshold`: catalogue size (items per shard) from which embedding models answer through an
    hnswlib index instead of an exact mat-vec. `blas_threads`: BLAS threads of this process (1: a
    server's parallelism comes from concurrent requests and worker processes; None leaves it alone).
    """
    settings = settings or Settings()
    if blas_threads is not None:
        limit_blas_threads(blas_threads)
    cache = ModelCache(settings, models, refresh_interval=refresh_interval, timeout=redis_timeout,
                       ann_threshold=ann_threshold)
    rec = Recommender(cache)
    registry = CollectorRegistry()
    latency = Histogram("streamrec_api_request_seconds", "Request latency by endpoint", ["endpoint"],
                        registry=registry,
                        buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
    requests = Counter("streamrec_api_requests", "Requests by endpoint and status", ["endpoint", "status"],
                       registry=registry)
    cache_age = Gauge("streamrec_api_cache_age_seconds", "Seconds since the shard's version was last confirmed",
                      ["partition"], registry=registry)
    view_age = Gauge("streamrec_api_view_age_seconds", "Seconds since the shard's view was loaded from Redis",
                     ["partition"], registry=registry)
    version = Gauge("streamrec_api_model_version", "Shard version (worker commits) being served",
                    ["partition"], registry=registry)
    served = Gauge("streamrec_api_model_served", "Models with state in each shard", ["partition", "model"],
                   registry=registry)
    reloads = Gauge("streamrec_api_cache_reloads", "Shard reloads from Redis so far", registry=registry)
    reload_s = Gauge("streamrec_api_cache_last_reload_seconds", "Duration of the last shard reload",
                     registry=registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        cache.start()  # the refresher thread loads every shard now, before the first request needs it
        yield
        cache.close()
        if app.state.producer is not None:
            try:
                app.state.producer.close()
            except Exception:  # noqa: BLE001
                log.warning("producer close failed", exc_info=True)

    app = FastAPI(title="streamrec lookup API", version="1", lifespan=lifespan)
    app.state.cache = cache
    app.state.recommender = rec
    app.state.producer = producer
    app.state.settings = settings

    app.add_middleware(_Measure, latency=latency, requests=requests)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _json({"error": exc.message, **exc.extra}, exc.status)

    @app.exception_handler(InvalidEvent)
    async def invalid_event(request: Request, exc: InvalidEvent):
        return _json({"error": str(exc), "field": exc.field, "rule": exc.rule}, 422)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return _json({"error": str(exc), "retry_after": RETRY_AFTER}, 503, {"Retry-After": str(RETRY_AFTER)})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _json({"error": f"{where}: {first.get('msg', 'invalid request')}"}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _json({"error": str(exc.detail)}, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _json({"error": f"internal error ({type(exc).__name__}); see the server log"}, 500)

    # The lookups are short CPU work on prepared arrays and never wait for Redis (the cache refreshes in
    # its own thread), so they run on the event loop: no thread-pool hop per request.
    @app.get("/recommendations")
    async def recommendations(request: Request):
        _check_params(request, RECOMMEND_PARAMS)
        user_id, session_id = _id(request, "user_id"), _id(request, "session_id")
        if (user_id is None) == (session_id is None):
            raise ApiError(400, "give exactly one of user_id or session_id")
        k, context = _k(request), _context(request)
        include_seen = _flag(request, "include_seen")
        if user_id is not None:
            model = rec.model(request.query_params.get("model"), "user")
            return _json(rec.for_user(user_id, k, model, context, include_seen))
        model = rec.model(request.query_params.get("model"), "session")
        return _json(rec.for_session(session_id, k, model, context))

    @app.get("/items/{item_id}/similar")
    async def similar(item_id: str, request: Request):
        _check_params(request, SIMILAR_PARAMS)
        if not item_id.strip():
            raise ApiError(400, "item_id must not be empty")
        k = _k(request)
        requested = request.query_params.get("model")
        model = rec.model(requested, "user") if requested is not None else None
        return _json(rec.similar(item_id, k, model))

    @app.post("/events", status_code=202)
    async def events(request: Request):
        body = await request.body()
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"the body must be a JSON event object or a list of them ({exc})") from None
        return await run_in_threadpool(_produce, data)

    def _produce(data: Any) -> Response:
        from producers.producer import EventProducer, to_event

        single = isinstance(data, dict)
        items = [data] if single else data
        if not isinstance(items, list):
            raise ApiError(422, f"the body must be an event object or a list of them (got {type(data).__name__})")
        if not items:
            raise ApiError(422, "the list of events is empty")
        if len(items) > MAX_EVENTS_PER_POST:
            raise ApiError(413, f"at most {MAX_EVENTS_PER_POST} events per request (got {len(items)})")
        ready = []
        for i, item in enumerate(items):
            try:
                event = to_event(item)
                encode(event)
            except InvalidEvent as exc:
                if single:
                    raise
                field = f"events[{i}]" + (f".{exc.field}" if exc.field else "")
                raise InvalidEvent(field, exc.rule) from None
            ready.append(event)
        if app.state.producer is None:
            app.state.producer = EventProducer(settings)
        producer = app.state.producer
        producer.send_many(ready)
        producer.flush(timeout=10)
        return _json({"accepted": len(ready), "event_ids": [e.event_id for e in ready]}, 202)

    @app.get("/healthz")
    def healthz():
        try:
            cache.ping()
            redis_ok = "ok"
        except ServiceError:
            redis_ok = "unreachable"
        return _json({"status": "ok", "redis": redis_ok, "models": list(cache.model_names),
                      "partitions": cache.partitions, "topic": settings.events_topic})

    @app.get("/metrics")
    def metrics():
        now = time.monotonic()
        for p, (view, checked) in cache.cached().items():
            cache_age.labels(str(p)).set(now - checked)
            view_age.labels(str(p)).set(now - view.loaded_at)
            version.labels(str(p)).set(view.version)
            for name in cache.model_names:
                served.labels(str(p), name).set(1 if name in view.models else 0)
        reloads.set(cache.reloads)
        reload_s.set(cache.last_reload_seconds)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _Measure:
    """Pure ASGI middleware: latency histogram and request counter per route (no BaseHTTPMiddleware cost)."""

    def __init__(self, app, latency: Histogram, requests: Counter):
        self.app = app
        self.latency = latency
        self.requests = requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.latency.labels(endpoint).observe(time.perf_counter() - started)
            self.requests.labels(endpoint, str(status[0])).inc()


API_ENV = {  # read by app_from_env (what `streamrec serve --workers N` hands its worker processes)
    "models": "STREAMREC_API_MODELS",
    "refresh": "STREAMREC_API_REFRESH",
    "redis_timeout": "STREAMREC_API_REDIS_TIMEOUT",
    "ann_threshold": "STREAMREC_API_ANN_THRESHOLD",
}


def app_from_env() -> FastAPI:
    """App factory for uvicorn's import string (`stream_app.serving.api:app_from_env`, factory=True).

    Settings come from the STREAMREC_* environment (`Settings.environ()` in the parent), the API's own
    options from STREAMREC_API_* (see `API_ENV`)."""
    import os

    from models.registry import parse_names

    env = os.environ
    return create_app(
        Settings(), tuple(parse_names(env.get(API_ENV["models"], "pop"))),
        refresh_interval=float(env.get(API_ENV["refresh"], "0.25")),
        redis_timeout=float(env.get(API_ENV["redis_timeout"], "1.0")),
        ann_threshold=int(env.get(API_ENV["ann_threshold"], "50000")),
    )
