"""The lookup HTTP API (DESIGN.md section 7), served from the Redis state the workers write.

    GET  /recommendations?user_id=U&k=20[&model=pop][&context.device=ios...][&include_seen=true]
    GET  /recommendations?session_id=S&k=20[&model=...]
    GET  /items/{item_id}/similar?k=20[&model=...]
    POST /events            one event object or a list of them
    GET  /healthz, /metrics

The answers come from `stream_app.serving.recommender`; this module is the HTTP
around them. Bad parameters get a 4xx JSON `{"error": message}`; an unreachable
Redis or Kafka gets 503 with `Retry-After`, never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.registry import parse_names
from stream_app.core.errors import InvalidEvent, ServiceError
from stream_app.core.events import encode
from stream_app.core.settings import Settings
from stream_app.core.threads import limit_blas_threads
from stream_app.serving.cache import ModelCache
from stream_app.serving.metrics import ApiMetrics, MeasureRequests
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
MAX_EVENTS_PER_POST = 10_000
RETRY_AFTER = 1  # seconds, for 503 answers


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status, headers,
                    media_type="application/json")


def create_app(settings: Settings | None = None, *, producer: Any = None, blas_threads: int | None = 1) -> FastAPI:
    """The FastAPI app over the state in `settings.redis_url` for `settings.events_topic`.

    The API's own options are the `api_*` settings (models served, refresh interval, Redis timeout,
    ANN threshold). `producer`: the event producer of POST /events (made on first use when None).
    `blas_threads`: BLAS threads of this process (1: a server's parallelism comes from concurrent
    requests and worker processes; None leaves it alone).
    """
    settings = settings or Settings()
    if blas_threads is not None:
        limit_blas_threads(blas_threads)
    cache = ModelCache(settings, parse_names(settings.api_models), refresh_interval=settings.api_refresh,
                       timeout=settings.api_redis_timeout, ann_threshold=settings.api_ann_threshold)
    metrics = ApiMetrics()
    app = FastAPI(title="streamrec lookup API", version="1", lifespan=_lifespan)
    app.state.cache = cache
    app.state.recommender = Recommender(cache)
    app.state.producer = producer
    app.state.settings = settings
    app.add_middleware(MeasureRequests, metrics=metrics)
    _add_error_handlers(app)
    _add_lookup_routes(app, app.state.recommender)
    _add_event_routes(app, settings)
    _add_status_routes(app, cache, settings, metrics)
    return app


def app_from_env() -> FastAPI:
    """App factory for uvicorn's import string (`stream_app.serving.api:app_from_env`, factory=True):
    everything from the STREAMREC_* environment (`Settings.environ()` in the parent process)."""
    return create_app(Settings())


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    """Start the cache's refresher (it loads every shard before the first request needs it); on
    shutdown stop it and close the event producer."""
    app.state.cache.start()
    yield
    app.state.cache.close()
    if app.state.producer is not None:
        try:
            app.state.producer.close()
        except Exception:  # noqa: BLE001 - shutting down: report and carry on
            log.warning("closing the event producer failed; unsent events may be lost", exc_info=True)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON `{"error": ...}`: 4xx for the caller's, 503 + Retry-After for a service
    that is down, 500 (logged with its traceback) for anything else."""

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


def _add_lookup_routes(app: FastAPI, rec: Recommender) -> None:
    """GET /recommendations and GET /items/{item_id}/similar.

    The lookups are short CPU work on prepared arrays and never wait for Redis (the cache refreshes
    in its own thread), so they run on the event loop: no thread-pool hop per request.
    """

    @app.get("/recommendations")
    async def recommendations(request: Request):
        check_params(request, RECOMMEND_PARAMS)
        user_id, session_id = id_param(request, "user_id"), id_param(request, "session_id")
        if (user_id is None) == (session_id is None):
            raise ApiError(400, "give exactly one of user_id or session_id")
        k, context = k_param(request), context_params(request)
        include_seen = flag_param(request, "include_seen")
        if user_id is not None:
            model = rec.model(request.query_params.get("model"), "user")
            return _json(rec.for_user(user_id, k, model, context, include_seen))
        model = rec.model(request.query_params.get("model"), "session")
        return _json(rec.for_session(str(session_id), k, model, context))

    @app.get("/items/{item_id}/similar")
    async def similar(item_id: str, request: Request):
        check_params(request, SIMILAR_PARAMS)
        if not item_id.strip():
            raise ApiError(400, "item_id must not be empty")
        k = k_param(request)
        requested = request.query_params.get("model")
        model = rec.model(requested, "user") if requested is not None else None
        return _json(rec.similar(item_id, k, model))


def _add_event_routes(app: FastAPI, settings: Settings) -> None:
    """POST /events: validate one event or a list, then produce them to the events topic (in a
    thread: producing waits for Kafka)."""

    @app.post("/events", status_code=202)
    async def events(request: Request):
        body = await request.body()
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"the body must be a JSON event object or a list of them ({exc})") from None
        return await run_in_threadpool(_produce, app, settings, data)


def _produce(app: FastAPI, settings: Settings, data: Any) -> Response:
    from producers.producer import EventProducer

    ready = _valid_events(data)
    if app.state.producer is None:
        app.state.producer = EventProducer(settings)
    producer = app.state.producer
    producer.send_many(ready)
    producer.flush(timeout=10)
    return _json({"accepted": len(ready), "event_ids": [e.event_id for e in ready]}, 202)


def _valid_events(data: Any) -> list:
    """The events of a POST body, each checked as the worker will; the first bad one is refused,
    named by its place in the list (`events[i].field`)."""
    from producers.producer import to_event

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
    return ready


def _add_status_routes(app: FastAPI, cache: ModelCache, settings: Settings, metrics: ApiMetrics) -> None:
    """GET /healthz (the process answers; whether Redis does) and GET /metrics (Prometheus)."""

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
    def prometheus():
        return Response(metrics.render(cache), media_type=metrics.content_type)
