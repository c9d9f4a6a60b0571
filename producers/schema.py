"""The event schema of DESIGN.md section 3, with JSON encode/decode.

`decode` turns raw Kafka bytes into an `Event` or raises `InvalidEvent`
naming the field and the rule, e.g.
`event_type must be one of click, purchase, favorite (got 'teleport')`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from stream_app.errors import InvalidEvent

EVENT_TYPES: tuple[str, ...] = ("click", "purchase", "favorite")
MAX_MESSAGE_BYTES = 64 * 1024
MAX_CONTEXT_KEYS = 32
MAX_ID_CHARS = 256

Number = Union[StrictInt, StrictFloat]
ContextValue = Union[StrictBool, StrictInt, StrictFloat, StrictStr]
Id = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)]


class Event(BaseModel):
    """One user event. Frozen; build it with `Event(...)` or `decode(raw)`."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    user_id: Id
    item_id: Id
    event_type: Literal["click", "purchase", "favorite"]
    ts: Number
    event_id: Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)] | None = None
    session_id: Id | None = None
    value: Number | None = None
    context: Annotated[dict[StrictStr, ContextValue], Field(max_length=MAX_CONTEXT_KEYS)] = Field(
        default_factory=dict
    )


def _rule(err: dict[str, Any]) -> InvalidEvent:
    """Turn one pydantic error into our field + rule message."""
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "union"))]
    # Union branches add their type name to the location; keep the field path only.
    loc = [p for p in loc if p not in {"int", "float", "str", "bool"}]
    field = ".".join(loc)
    kind, got = err["type"], err.get("input")
    if kind == "missing":
        return InvalidEvent(field, "is required")
    if kind == "extra_forbidden":
        return InvalidEvent(field, "is not a field of the event schema (put extra attributes under context)")
    if field == "event_type":
        return InvalidEvent(field, f"must be one of {', '.join(EVENT_TYPES)} (got {got!r})")
    if kind == "string_too_short":
        return InvalidEvent(field, "must not be empty")
    if kind == "string_too_long":
        return InvalidEvent(field, f"must be at most {MAX_ID_CHARS} characters (got {len(got)})")
    if kind == "too_long" and field == "context":
        return InvalidEvent(field, f"must have at most {MAX_CONTEXT_KEYS} keys (got {len(got)})")
    if kind == "finite_number":
        return InvalidEvent(field, f"must be a finite number (got {got!r})")
    if field in ("ts", "value"):
        return InvalidEvent(field, f"must be a finite number (got {type(got).__name__} {got!r:.60})")
    if field == "context" or field.startswith("context."):
        return InvalidEvent(field, f"must be a string, number or bool (got {type(got).__name__})")
    return InvalidEvent(field, f"{err['msg'].lower()} (got {type(got).__name__} {got!r:.60})")


def _validate(data: Any) -> Event:
    if not isinstance(data, dict):
        raise InvalidEvent("", f"an event must be a JSON object (got {type(data).__name__})")
    try:
        return Event.model_validate(data)
    except ValidationError as exc:
        raise _rule(exc.errors()[0]) from None


def decode(raw: bytes) -> Event:
    """Parse and validate one Kafka message; raises `InvalidEvent` on anything bad."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent("", f"message must be at most {MAX_MESSAGE_BYTES} bytes (got {len(raw)})")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("", f"message must be UTF-8 JSON without NaN/Infinity ({exc})") from None
    return _validate(data)


def from_dict(data: Any) -> Event:
    """Validate an already-parsed object (e.g. an HTTP body)."""
    return _validate(data)


def encode(event: Event) -> bytes:
    """JSON bytes of an event, without absent optional fields."""
    return orjson.dumps(event.model_dump(exclude_none=True, exclude_defaults=False))


def prepare(data: Any, now: float | None = None) -> Event:
    """Fill `event_id` (a fresh uuid) and `ts` (now) when absent, then validate.

    This is what every producer does before sending.
    """
    if isinstance(data, dict) and ("event_id" not in data or "ts" not in data):
        data = dict(data)
        data.setdefault("event_id", uuid.uuid4().hex)
        data.setdefault("ts", time.time() if now is None else now)
    return _validate(data)
