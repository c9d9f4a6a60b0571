"""The event schema of DESIGN.md section 3, with JSON encode/decode.

`decode` turns raw Kafka bytes into an `Event` or raises `InvalidEvent`
naming the field and the rule, e.g.
`event_type must be one of click, purchase, favorite (got 'teleport')`.
"""

from __future__ import annotations

import json
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
    if field.endswith(".[key]"):
        return InvalidEvent("context", f"keys must be strings (got {type(got).__name__} {got!r:.60})")
    if kind == "dict_type" and field == "context":
        return InvalidEvent(field, f"must be an object (got {type(got).__name__})")
    if kind == "string_type":
        return InvalidEvent(field, f"must be a string (got {type(got).__name__} {got!r:.60})")
    if kind == "string_unicode":
        return InvalidEvent(field, "must be valid Unicode text (got a string with lone surrogates)")
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
        errors = exc.errors()
        # A union field reports one error per branch; a non-finite float is the telling one.
        first = errors[0]
        finite = [e for e in errors if e["type"] == "finite_number" and e["loc"][:-1] == first["loc"][:-1]]
        raise _rule(finite[0] if finite else first) from None


def decode(raw: bytes) -> Event:
    """Parse and validate one Kafka message; raises `InvalidEvent` on anything bad."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent("", f"message must be at most {MAX_MESSAGE_BYTES} bytes (got {len(raw)})")
    try:  # fast path: pydantic parses and validates in one pass
        return Event.model_validate_json(raw)
    except ValidationError:
        pass  # the slower path below finds the field and rule to report
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        _name_the_field(raw)
        raise InvalidEvent("", f"message must be UTF-8 JSON without NaN/Infinity ({exc})") from None
    return _validate(data)


def _name_the_field(raw: bytes) -> None:
    """On a JSON error, retry with the lenient stdlib parser (NaN, Infinity, lone surrogates):
    when that parses, validation names the field at fault (`ts must be a finite number (got nan)`)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return
    _validate(data)  # raises InvalidEvent naming the field; returning means no field to name


def from_dict(data: Any) -> Event:
    """Validate an already-parsed object (e.g. an HTTP body)."""
    return _validate(data)


def encode(event: Event) -> bytes:
    """JSON bytes of an event, without absent optional fields.

    Raises `InvalidEvent` when the bytes would be rejected by `decode`: over
    `MAX_MESSAGE_BYTES` (a valid event can get there through long context
    strings) or not encodable (an integer beyond 64 bits).
    """
    try:
        raw = orjson.dumps(event.model_dump(exclude_none=True, exclude_defaults=False))
    except orjson.JSONEncodeError as exc:
        raise InvalidEvent("", f"event cannot be encoded as JSON ({exc})") from None
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent("", f"message must be at most {MAX_MESSAGE_BYTES} bytes (got {len(raw)})")
    return raw


def prepare(data: Any, now: float | None = None) -> Event:
    """Fill `event_id` (a fresh uuid) and `ts` (now) when absent or None, then validate.

    This is what every producer does before sending.
    """
    if isinstance(data, dict) and (data.get("event_id") is None or data.get("ts") is None):
        data = dict(data)
        if data.get("event_id") is None:
            data["event_id"] = uuid.uuid4().hex
        if data.get("ts") is None:
            data["ts"] = time.time() if now is None else now
    return _validate(data)
