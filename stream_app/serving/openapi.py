"""The OpenAPI document of the lookup API: every parameter, body, status code and content type.

The routes parse their parameters themselves (`stream_app.serving.params`: strict, with 400s that
say what is wrong, and POST /events reads its body under a size limit before parsing it), so
FastAPI cannot infer them; they are declared here, next to the answers' schemas, and
`tests/test_openapi.py` runs Schemathesis against a live server to keep both in step.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from fastapi import FastAPI, Response
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from stream_app.core.events import MAX_CLOCK_SKEW, MAX_CONTEXT_KEYS, MAX_ID_CHARS, Event
from stream_app.core.settings import Settings
from stream_app.serving.metrics import ApiMetrics
from stream_app.serving.params import FLAG_VALUES, MAX_K

MAX_EVENTS_PER_POST = 10_000
KEY_NAME_CHARS = 64  # stream_app.serving.keys.NAME
MAX_CLIENT_EVENT_ID = MAX_ID_CHARS - KEY_NAME_CHARS - 1  # stored as `key-name:event_id`
ID_PATTERN = r"\S"  # not empty or blank

DESCRIPTION = """Recommendations, similar items and event intake over the state the stream workers keep in Redis.

* Reads are open unless the server sets `STREAMREC_API_READ_AUTH=true` (then they need the `read` scope).
* `POST /events` needs an API key with the `events:write` scope: `Authorization: Bearer KEY`
  (`streamrec keys add NAME --scope events:write` prints one). Its body is `application/json`, at most
  `STREAMREC_API_MAX_BODY` bytes; each key is rate-limited (`STREAMREC_API_RATE`, `STREAMREC_API_BURST`).
* Context goes in query parameters named `context.<key>` (e.g. `context.device=ios`), at most 32 of them.
* Errors are JSON `{"error": "..."}`; 503 answers carry `Retry-After`.
"""


class ErrorBody(BaseModel):
    """Every error answer."""

    model_config = ConfigDict(extra="allow")
    error: str = Field(description="what is wrong and what to do about it")
    field: str | None = Field(None, description="the offending event field (422), e.g. `events[3].user_id`")
    rule: str | None = Field(None, description="the rule that field breaks (422)")
    retry_after: float | None = Field(None, description="seconds to wait before retrying (429, 503)")


class ScoredItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    item_id: str
    score: float | None = Field(description="higher is better; null for a non-finite score")
    reason: dict[str, Any] = Field(description='why: e.g. {"kind": "similar_to", "item_id": ...} or {"kind": "popular"}')


class Recommendations(BaseModel):
    model_config = ConfigDict(extra="allow")
    user_id: str | None
    session_id: str | None = None
    model: str
    model_version: int = Field(description="the shard's version (worker commits) answered from")
    partition: int
    items: list[ScoredItem]


class SimilarItems(BaseModel):
    model_config = ConfigDict(extra="allow")
    item_id: str
    known: bool = Field(description="false: the item is unknown, popular items are answered instead")
    model: str
    model_version: dict[str, int] = Field(description="each shard's version, by partition")
    items: list[ScoredItem]


class Accepted(BaseModel):
    accepted: int
    event_ids: list[str] = Field(description="ids as produced (a client's own ids as `key-name:event_id`)")


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str
    models: list[str]
    partitions: int
    topic: str


class Readiness(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str = Field(description="ready | not ready")
    redis: str
    kafka: str
    state: str
    error: str | None = None


def _error(description: str, *headers: str) -> dict[str, Any]:
    declared = {name: {"description": HEADERS[name], "schema": {"type": "string"}} for name in headers}
    return {"model": ErrorBody, "description": description, **({"headers": declared} if declared else {})}


HEADERS = {
    "Retry-After": "seconds to wait before retrying",
    "WWW-Authenticate": "Bearer",
}
ERRORS = {
    500: _error("an unexpected error (a bug; the server logged it)"),
}
UNAVAILABLE = {503: _error("Redis (or Kafka) is unreachable; retry later", "Retry-After")}
READ_AUTH = {
    401: _error("no API key, or an unknown one", "WWW-Authenticate"),
    403: _error("the API key lacks the `read` scope"),
}


def _query(name: str, description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema, **extra}


_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS, "pattern": ID_PATTERN}
_K = _query("k", "how many items to answer", {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 20})
_CONTEXT = {
    "pattern": r"^context\.[^.]+$",
    "in": "query",
    "description": f"the query context, one parameter per key: `context.device=ios` (at most {MAX_CONTEXT_KEYS})",
    "schema": {"type": "string", "maxLength": MAX_ID_CHARS},
}


def _model(settings: Settings) -> dict[str, Any]:
    from models.registry import parse_names

    names = parse_names(settings.api_models)
    return _query("model", "served model to answer with (default: the first served one for the query)",
                  {"type": "string", "enum": names})


def routes(settings: Settings) -> dict[str, dict[str, Any]]:
    """The keyword arguments of each route's decorator: summary, responses, declared parameters."""
    reads = READ_AUTH if settings.api_read_auth else {}
    model = _model(settings)
    return {
        "recommendations": dict(
            summary="Top-k items for a user or a session, in context",
            description="Give exactly one of `user_id` or `session_id` (400 otherwise). Unknown users and "
                        "sessions get popular items in their context, never an error. Context parameters are "
                        "named `context.<key>`.",
            response_model=None,
            responses={200: {"model": Recommendations, "description": "the ranked items, best first"},
                       400: _error("a bad, unknown or repeated parameter"), **reads, **UNAVAILABLE, **ERRORS},
            openapi_extra={"parameters": [
                _query("user_id", "the user to recommend to", _ID),
                _query("session_id", "the session whose next item to recommend", _ID),
                _K, model,
                _query("include_seen", "also rank items the user already interacted with",
                       {"type": "string", "enum": list(FLAG_VALUES), "default": "false"}),
            ], "x-parameter-patterns": [_CONTEXT]},
        ),
        "similar": dict(
            summary="Items close to an item",
            response_model=None,
            responses={200: {"model": SimilarItems, "description": "the closest items, best first"},
                       400: _error("a bad, unknown or repeated parameter"),
                       404: _error("no such route (an item_id cannot contain `/`)"),
                       **reads, **UNAVAILABLE, **ERRORS},
            openapi_extra={"parameters": [
                {"name": "item_id", "in": "path", "required": True, "description": "the item",
                 "schema": {"type": "string", "minLength": 1, "pattern": r"^[^/]*[^/\s][^/]*$"}},
                _K, model,
            ]},
        ),
        "events": dict(
            summary="Validate events and produce them to the events topic",
            description="One event object or a list of them; all are checked before any is sent. "
                        "`event_id` (when given) is stored as `key-name:event_id`, so writers cannot collide; "
                        "absent `event_id` and `ts` are filled (a fresh id, now). A 503 means the events may not "
                        "have been written: retry with the same `event_id`s to keep them exactly once.",
            response_model=None,
            responses={
                202: {"model": Accepted, "description": "every event was produced"},
                400: _error("the body is not JSON, or a bad Content-Length"),
                401: _error("no API key, or an unknown one", "WWW-Authenticate"),
                403: _error("the API key lacks the `events:write` scope"),
                413: _error("the body is over the size limit (STREAMREC_API_MAX_BODY bytes)"),
                415: _error("the body is not `application/json`"),
                422: _error("an event breaks the schema (`field` and `rule` say where and why), or the list "
                            f"is empty or over {MAX_EVENTS_PER_POST} events"),
                429: _error("this key is over its rate limit", "Retry-After"),
                503: _error("Kafka is unreachable (the answer comes within STREAMREC_API_KAFKA_TIMEOUT)",
                            "Retry-After"),
                **ERRORS,
            },
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                "oneOf": [
                    {"$ref": "#/components/schemas/EventIn"},
                    {"type": "array", "items": {"$ref": "#/components/schemas/EventIn"}, "minItems": 1,
                     "maxItems": MAX_EVENTS_PER_POST},
                ]}}}}},
        ),
        "healthz": dict(
            summary="Liveness: the process answers (no I/O)",
            response_model=None,
            responses={200: {"model": Health, "description": "alive"}},
        ),
        "readyz": dict(
            summary="Readiness: Redis reachable, Kafka reachable, every shard loaded",
            response_model=None,
            responses={200: {"model": Readiness, "description": "ready"},
                       503: {"model": Readiness, "description": "not ready: the parts say which and why",
                             "headers": {"Retry-After": {"description": HEADERS["Retry-After"],
                                                         "schema": {"type": "string"}}}}},
        ),
        "metrics": dict(
            summary="Prometheus metrics (text exposition format 0.0.4)",
            response_model=None,
            response_class=_PrometheusText,
            responses={200: {"description": "the metrics",
                             "content": {ApiMetrics.content_type: {"schema": {"type": "string"}}}}},
        ),
    }


class _PrometheusText(Response):
    """The media type of /metrics, for the document (the route builds its own Response)."""

    media_type = ApiMetrics.content_type


def event_schema() -> dict[str, Any]:
    """The event as POST /events takes it: the worker's schema, with `ts` and `event_id` optional
    (filled when absent) and a client's `event_id` short enough for its key-name prefix."""
    schema = copy.deepcopy(msgspec.json.schema(Event)["$defs"]["Event"])
    schema["title"] = "EventIn"
    schema["description"] = "One user event; unknown fields are refused (put extra attributes under context)."
    schema["required"] = [f for f in schema["required"] if f != "ts"]
    schema["properties"]["ts"]["anyOf"].append({"type": "null"})
    schema["properties"]["ts"]["description"] = (
        f"seconds since the epoch (absent or null: now); at most {MAX_CLOCK_SKEW:g} s ahead of the server's clock")
    schema["properties"]["event_id"]["anyOf"][0]["maxLength"] = MAX_CLIENT_EVENT_ID
    schema["properties"]["event_id"]["description"] = "your id for deduplication, stored as `key-name:event_id`"
    return schema


def install(app: FastAPI, settings: Settings) -> None:
    """Make `app.openapi()` the full document (adds the event schema the declared body refers to)."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description,
                              routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {})["EventIn"] = event_schema()
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
