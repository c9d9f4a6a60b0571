"""The lookup HTTP API (DESIGN.md section 7), served from the Redis state the workers write.

    GET  /recommendations?user_id=U&k=20[&model=pop][&context.device=ios...][&include_seen=true]
    GET  /recommendations?session_id=S&k=20[&model=...]
    GET  /items/{item_id}/similar?k=20[&model=...]
    POST /events            one event object or a list of them (API key with the `events:write` scope)
    GET  /healthz, /readyz, /metrics

The answers come from `stream_app.serving.recommender`; this module is the HTTP
around them. Bad parameters get a 4xx JSON `{"error": message}`; an unreachable
Redis or Kafka gets 503 with `Retry-After`, never a traceback. What each route
takes and answers is declared in `stream_app.serving.openapi` (served at /openapi.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import threading
import time
from typing import Any

import anyio
import orjson
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.registry import parse_names
from stream_app.core.errors import InvalidEvent, ServiceError
from stream_app.core.events import MAX_CLOCK_SKEW, check_clock_skew, check_unique_keys, encode
from stream_app.core.settings import Settings
from stream_app.core.threads import limit_blas_threads
from stream_app.serving import http, openapi
from stream_app.serving.cache import ModelCache
from stream_app.serving.guards import CircuitBreaker, RateLimiter
from stream_app.serving.keys import ApiKey, KeyStore, keys_file
from stream_app.serving.metrics import ApiMetrics, MeasureRequests
from stream_app.serving.openapi import MAX_CLIENT_EVENT_ID, MAX_EVENTS_PER_POST
from stream_app.serving.params import (
    RECOMMEND_PARAMS,
    SIMILAR_PARAMS,
    ApiError,
    check_params,
    context_params,
    flag_param,
    id_param,
    k_param,
)
from stream_app.serving.recommender import Recommender

log = logging.getLogger("streamrec.api")
RETRY_AFTER = 1  # seconds, for 503 answers
PRODUCE_THREADS = 8  # POST /events sending at once; the others wait without holding a thread


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status, headers,
                    media_type="application/json")


def create_app(settings: Settings | None = None, *, producer: Any = None, blas_threads: int | None = 1) -> FastAPI:
    """The FastAPI app over the state in `settings.redis_url` for `settings.events_topic`.

    The API's own options are the `api_*` settings (models served, refresh interval, Redis timeout,
    ANN threshold, keys, CORS, limits, Kafka timeout). `producer`: the event producer of POST /events
    (made on first use when None). `blas_threads`: BLAS threads of this process (1: a server's
    parallelism comes from concurrent requests and worker processes; None leaves it alone).
    """
    settings = settings or Settings()
    if blas_threads is not None:
        limit_blas_threads(blas_threads)
    cache = ModelCache(settings, parse_names(settings.api_models), refresh_interval=settings.api_refresh,
                       timeout=settings.api_redis_timeout, ann_threshold=settings.api_ann_threshold)
    metrics = ApiMetrics()
    app = FastAPI(title="streamrec lookup API", version="1", lifespan=_lifespan,
                  description=openapi.DESCRIPTION)
    app.state.cache = cache
    app.state.recommender = Recommender(cache)
    app.state.producer = producer
    app.state.settings = settings
    app.state.keys = KeyStore(keys_file(settings))
    app.state.breaker = CircuitBreaker(settings.api_kafka_cooldown)
    app.state.produce_limiter = anyio.CapacityLimiter(PRODUCE_THREADS)
    app.state.producer_lock = threading.Lock()
    app.add_middleware(MeasureRequests, metrics=metrics)
    origins = [o.strip() for o in settings.api_cors_origins.split(",") if o.strip()]
    if origins:  # no CORS headers at all unless origins are configured
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    _add_error_handlers(app)
    _add_lookup_routes(app, app.state.recommender, settings)
    _add_event_routes(app, settings)
    _add_status_routes(app, cache, settings, metrics)
    openapi.install(app, settings)
    return app


def app_from_env() -> FastAPI:
    """App factory for uvicorn's import string (`stream_app.serving.api:app_from_env`, factory=True):
    everything from the STREAMREC_* environment (`Settings.environ()` in the parent process)."""
    return create_app(Settings())


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    """Start the cache's refresher (it loads every shard before the first request needs it), run every
    served model once, freeze the heap built so far and, in a worker process of several, take connections
    the others pass on (`http.Balancer`); on shutdown take no more, stop the refresher, close the event
    producer and unfreeze."""
    app.state.cache.start()
    # The heap of the libraries (torch's and numba's above all) leaves the collector's sight: a full
    # collection walks every tracked object, and held answers for tens of ms (README, Lookup API).
    app.state.cache.compile_models()
    gc.collect()
    gc.freeze()
    http.start_balancing()
    yield
    http.stop_balancing()
    gc.unfreeze()
    app.state.cache.close()
    await app.state.cache.aclose()
    if app.state.producer is not None:
        _close(app.state.producer)


def _close(producer: Any) -> None:
    try:
        producer.close()
    except Exception:  # noqa: BLE001 - done with it: report and carry on
        log.warning("closing the event producer failed; unsent events may be lost", exc_info=True)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON `{"error": ...}`: 4xx for the caller's, 503 + Retry-After for a service
    that is down, 500 (logged with its traceback) for anything else."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _json({"error": exc.message, **exc.extra}, exc.status, exc.headers)

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
        return _json({"error": f"{where}: {first.get('msg', 'invalid request')}"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _json({"error": str(exc.detail)}, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _json({"error": f"internal error ({type(exc).__name__}); see the server log"}, 500)


_bearer = HTTPBearer(auto_error=False, scheme_name="apiKey",
                     description="an API key from `streamrec keys add NAME --scope SCOPE`")


def _guard(scope: str):
    """A dependency that lets a request through only with a key holding `scope`: 401 without a
    known key (saying how to make one when none exists), 403 with a key lacking the scope."""

    async def check(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> ApiKey:
        store: KeyStore = request.app.state.keys
        key = store.find(credentials.credentials) if credentials is not None else None
        if key is None:
            if not store.keys():
                message = (f"this API has no keys yet: create one with `streamrec keys add NAME --scope {scope}` "
                           f"(stored in {store.path}) and send it as `Authorization: Bearer KEY`")
            elif credentials is None:
                message = f"send an API key with the {scope} scope as `Authorization: Bearer KEY`"
            else:
                message = "unknown API key"
            raise ApiError(401, message, headers={"WWW-Authenticate": "Bearer"})
        if scope not in key.scopes:
            raise ApiError(403, f"API key {key.name!r} lacks the {scope} scope (it has: {', '.join(sorted(key.scopes))})")
        return key

    return check


def _add_lookup_routes(app: FastAPI, rec: Recommender, settings: Settings) -> None:
    """GET /recommendations and GET /items/{item_id}/similar (open unless `api_read_auth`).

    A lookup awaits its user's (or session's) own rows from Redis, then ranks with short CPU work on
    the prepared views (the cache refreshes them in its own thread), all on the event loop: no
    thread-pool hop per request, and no request holds the loop while Redis answers. Lookups that reach
    the ranking in the same turn of the loop are ranked together (`Recommender.answer_user`): a model
    that scores every item reads its item rows once for all of them.
    """
    guard = [Security(_guard("read"))] if settings.api_read_auth else []
    docs = openapi.routes(settings)

    @app.get("/recommendations", dependencies=guard, **docs["recommendations"])
    async def recommendations(request: Request):
        check_params(request, RECOMMEND_PARAMS)
        user_id, session_id = id_param(request, "user_id"), id_param(request, "session_id")
        if (user_id is None) == (session_id is None):
            raise ApiError(400, "give exactly one of user_id or session_id")
        k, context = k_param(request), context_params(request)
        include_seen = flag_param(request, "include_seen")
        if user_id is not None:
            model = rec.model(request.query_params.get("model"), "user")
            return _json(await rec.answer_user(user_id, k, model, context, include_seen))
        model = rec.model(request.query_params.get("model"), "session")
        return _json(await rec.answer_session(str(session_id), k, model, context))

    @app.get("/items/{item_id}/similar", dependencies=guard, **docs["similar"])
    async def similar(request: Request):
        check_params(request, SIMILAR_PARAMS)
        item_id = request.path_params["item_id"]
        if not item_id.strip():
            raise ApiError(400, "item_id must not be empty")
        k = k_param(request)
        requested = request.query_params.get("model")
        model = rec.model(requested, "user") if requested is not None else None
        return _json(rec.similar(item_id, k, model))


def _add_event_routes(app: FastAPI, settings: Settings) -> None:
    """POST /events: authenticate, rate-limit, read the body within its limit, then validate and
    produce the events (in a thread of a small pool of its own: producing waits for Kafka)."""
    limiter = RateLimiter(settings.api_rate, settings.api_burst)
    breaker: CircuitBreaker = app.state.breaker
    docs = openapi.routes(settings)

    @app.post("/events", status_code=202, **docs["events"])
    async def events(request: Request, key: ApiKey = Security(_guard("events:write"))):
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(415, f"POST /events takes Content-Type: application/json (got {media or 'none'})")
        wait = limiter.take(key.name)
        if wait:
            retry = max(1, round(wait + 0.5))
            raise ApiError(429, f"API key {key.name!r} is over its rate limit of {settings.api_rate:g} requests/s",
                           headers={"Retry-After": str(retry)}, retry_after=retry)
        _refuse_while_open(breaker)
        body = await _read_body(request, settings.api_max_body)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"the body must be a JSON event object or a list of them ({exc})") from None
        check_unique_keys(body, data)  # orjson keeps the last of a repeated key; the worker refuses them
        send = functools.partial(_produce, app, settings, data, key.name)
        return await anyio.to_thread.run_sync(send, limiter=app.state.produce_limiter)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes: from its
    Content-Length, else while it streams in (it is never read whole first)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length must be a number of bytes (got {declared!r})")
        if int(declared) > limit:
            raise ApiError(413, f"the body is {int(declared)} bytes; at most {limit} are accepted "
                                "(send fewer events per request)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body exceeds {limit} bytes (send fewer events per request)")
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_while_open(breaker: CircuitBreaker) -> None:
    if breaker.open_for():
        retry = breaker.retry_after()
        raise ApiError(503, f"Kafka failed moments ago; POST /events is refused for {retry} s (retry then)",
                       headers={"Retry-After": str(retry)}, retry_after=retry)


def _produce(app: FastAPI, settings: Settings, data: Any, writer: str) -> Response:
    """Validate, send and flush within `api_kafka_timeout`; a failure opens the circuit breaker."""
    from producers.producer import EventProducer

    ready = _valid_events(data, writer)
    breaker: CircuitBreaker = app.state.breaker
    timeout = settings.api_kafka_timeout
    started = time.monotonic()
    try:
        # One request queues its events at a time (the Sender makes its Kafka client on first use);
        # the breaker is checked here, so requests queued behind a failing one answer 503 at once.
        with app.state.producer_lock:
            _refuse_while_open(breaker)
            if app.state.producer is None:  # no retries, no wait beyond the timeout: fail fast, say 503
                ms = int(timeout * 1000)
                app.state.producer = EventProducer(settings, retries=0, config={
                    "max_block_ms": ms, "request_timeout_ms": max(ms, 1000), "bootstrap_timeout_ms": ms})
            app.state.producer.send_many(ready)
        app.state.producer.flush(timeout=max(0.1, timeout - (time.monotonic() - started)))
    except ServiceError as exc:
        breaker.failed()
        _discard_producer(app)
        retry = breaker.retry_after()
        raise ApiError(503, str(exc), headers={"Retry-After": str(retry)}, retry_after=retry) from None
    breaker.succeeded()
    return _json({"accepted": len(ready), "event_ids": [e.event_id for e in ready]}, 202)


def _discard_producer(app: FastAPI) -> None:
    """Drop the producer after a failure, so the next request starts afresh (no stuck batches, no
    stale delivery errors answered to it). What it had not delivered is dropped with it, never
    delivered later: those requests were answered 503, and their senders send them again. The
    old producer closes in the background (its I/O thread may take a moment to stop)."""
    with app.state.producer_lock:
        old, app.state.producer = app.state.producer, None
    if old is not None:
        threading.Thread(target=_abandon, args=(old,), name="streamrec-producer-close", daemon=True).start()


def _abandon(producer: Any) -> None:
    try:
        dropped = producer.abandon()
    except Exception:  # noqa: BLE001 - done with it: report and carry on
        log.warning("closing the failed event producer failed", exc_info=True)
        return
    if dropped:
        log.warning("dropped %d event(s) Kafka had not acknowledged; their POST was answered 503 (to be retried)",
                    dropped)


def _valid_events(data: Any, writer: str) -> list:
    """The events of a POST body, each checked as the worker will; the first bad one is refused,
    named by its place in the list (`events[i].field`). A client-chosen `event_id` is put in the
    writer's namespace (`writer:event_id`), so one key cannot suppress another's events."""
    from producers.producer import to_event

    single, now = isinstance(data, dict), time.time()
    items = [data] if single else data
    if not isinstance(items, list):
        raise ApiError(422, f"the body must be an event object or a list of them (got {type(data).__name__})")
    if not items:
        raise ApiError(422, "the list of events is empty")
    if len(items) > MAX_EVENTS_PER_POST:
        raise ApiError(422, f"at most {MAX_EVENTS_PER_POST} events per request (got {len(items)})")
    ready = []
    for i, item in enumerate(items):
        try:
            if isinstance(item, dict) and isinstance(item.get("event_id"), str) and item["event_id"]:
                if len(item["event_id"]) > MAX_CLIENT_EVENT_ID:
                    raise InvalidEvent("event_id", f"must be at most {MAX_CLIENT_EVENT_ID} characters "
                                                   f"(got {len(item['event_id'])}); it is kept as key-name:event_id")
                item = {**item, "event_id": f"{writer}:{item['event_id']}"}
            event = to_event(item)
            check_clock_skew(event.ts, now, MAX_CLOCK_SKEW)  # the worker would dead-letter it
            encode(event)
        except InvalidEvent as exc:
            if single:
                raise
            field = f"events[{i}]" + (f".{exc.field}" if exc.field else "")
            raise InvalidEvent(field, exc.rule) from None
        ready.append(event)
    return ready


def _add_status_routes(app: FastAPI, cache: ModelCache, settings: Settings, metrics: ApiMetrics) -> None:
    """GET /healthz (liveness), GET /readyz (readiness) and GET /metrics (Prometheus); none of them
    waits for a thread."""
    docs = openapi.routes(settings)

    @app.get("/healthz", **docs["healthz"])
    async def healthz():
        return _json({"status": "ok", "models": list(cache.model_names), "partitions": cache.partitions,
                      "topic": settings.events_topic})

    @app.get("/readyz", **docs["readyz"])
    async def readyz():
        redis_error, loaded = cache.status()
        parts = {
            "redis": f"unreachable: {redis_error}" if redis_error else "ok",
            "state": "loaded" if loaded == cache.partitions else f"loading ({loaded} of {cache.partitions} shards)",
            "kafka": await _kafka_status(settings, app.state.breaker),
        }
        waiting = sorted(name for name, value in parts.items() if value not in ("ok", "loaded"))
        if waiting:
            return _json({"status": "not ready", "error": f"not ready: {', '.join(waiting)}", **parts,
                          "retry_after": RETRY_AFTER}, 503, {"Retry-After": str(RETRY_AFTER)})
        return _json({"status": "ready", **parts})

    @app.get("/metrics", **docs["metrics"])
    async def prometheus():
        return Response(metrics.render(cache), media_type=metrics.content_type)


async def _kafka_status(settings: Settings, breaker: CircuitBreaker) -> str:
    """Kafka's part of readiness: ok when a bootstrap server accepts a connection within
    `api_kafka_timeout` and no send failed in the last `api_kafka_cooldown` seconds; else what is wrong."""
    if breaker.open_for():
        return "failing: the last POST /events could not reach it"
    errors = []
    for address in settings.kafka_bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)),
                                               settings.api_kafka_timeout)
        except (TimeoutError, OSError, ValueError) as exc:
            errors.append(f"{address.strip()}: {exc or type(exc).__name__}")
            continue
        writer.close()
        return "ok"
    return f"unreachable: {'; '.join(errors)}"
