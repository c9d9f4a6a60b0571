"""The event schema (one JSON event per Kafka message), with JSON encode/decode.

`decode` turns raw Kafka bytes into an `Event` or raises `InvalidEvent`
naming the field and the rule, e.g.
`event_type must be one of click, purchase, favorite (got 'teleport')`.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Annotated, Any, Literal, Union, get_args

import msgspec
import orjson

from stream_app.core.errors import InvalidEvent

EventType = Literal["click", "purchase", "favorite"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
EVENT_CODE: dict[str, int] = {name: code for code, name in enumerate(EVENT_TYPES)}  # the int8 codes of batches
# How much each type says about a user's interest: the default learning weight, and which event
# explains a recommendation best (a purchase over a favorite over a click).
EVENT_WEIGHTS: dict[str, float] = {"click": 1.0, "favorite": 2.0, "purchase": 3.0}
MAX_MESSAGE_BYTES = 64 * 1024
MAX_CONTEXT_KEYS = 32
MAX_CLOCK_SKEW = 3600.0  # seconds an event's ts may be ahead of the receiver's clock, by default
MAX_ID_CHARS = 256

# NaN and +-inf fail these bounds, so only finite floats pass.
Finite = Annotated[float, msgspec.Meta(ge=-1.7976931348623157e308, le=1.7976931348623157e308)]
Number = Union[int, Finite]
ContextValue = Union[bool, int, Finite, str]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]


class Event(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One user event. Frozen; build it with `from_dict(...)` or `decode(raw)`, which validate
    (calling `Event(...)` directly does not: keep that for trusted code such as the generator).

    Not tracked by the garbage collector (`gc=False`, which makes decoding cheaper): its
    fields hold strings, numbers and a dict of those, so it can never be part of a reference cycle."""

    user_id: Id
    item_id: Id
    event_type: EventType
    ts: Number
    event_id: Union[Id, None] = None
    session_id: Union[Id, None] = None
    value: Union[Number, None] = None
    context: Annotated[dict[str, ContextValue], msgspec.Meta(max_length=MAX_CONTEXT_KEYS)] = {}

    def replace(self, **changes: Any) -> Event:
        """A copy with `changes` applied (not validated)."""
        return msgspec.structs.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (absent optional fields as None)."""
        return msgspec.structs.asdict(self)


_DECODER = msgspec.json.Decoder(Event)
_IDS = ("user_id", "item_id", "event_id", "session_id")
_AT = re.compile(r"`\$\.(\w+)")  # the field in "... - at `$.ts`" or "... at `key` in `$.context`"


def _type(value: Any) -> str:
    return type(value).__name__


def _explain(data: dict, error: str) -> InvalidEvent:
    """Name the field and the rule that `data` breaks; `error` is msgspec's account of it."""
    if error.startswith("Object missing required field"):
        return InvalidEvent(error.split("`")[1], "is required")
    if error.startswith("Object contains unknown field"):
        return InvalidEvent(error.split("`")[1], "is not a field of the event schema (put extra attributes under context)")
    at = _AT.search(error)
    field = at.group(1) if at else ""
    got = data.get(field)
    if field == "event_type":
        return InvalidEvent(field, f"must be one of {', '.join(EVENT_TYPES)} (got {got!r})")
    if field in _IDS:
        if not isinstance(got, str):
            return InvalidEvent(field, f"must be a string (got {_type(got)} {got!r:.60})")
        if not got:
            return InvalidEvent(field, "must not be empty")
        return InvalidEvent(field, f"must be at most {MAX_ID_CHARS} characters (got {len(got)})")
    if field in ("ts", "value"):
        return _not_finite(field, got)
    if field == "context":
        if not isinstance(got, dict):
            return InvalidEvent(field, f"must be an object (got {_type(got)})")
        for key, value in got.items():
            if not isinstance(key, str):
                return InvalidEvent(field, f"keys must be strings (got {_type(key)} {key!r:.60})")
            if isinstance(value, float) and not math.isfinite(value):
                return _not_finite(f"context.{key}", value)
            if not isinstance(value, (bool, int, float, str)):
                return InvalidEvent(f"context.{key}", f"must be a string, number or bool (got {_type(value)})")
        return InvalidEvent(field, f"must have at most {MAX_CONTEXT_KEYS} keys (got {len(got)})")
    return InvalidEvent(field, f"{error} (got {_type(got)} {got!r:.60})")


def _not_finite(field: str, got: Any) -> InvalidEvent:
    if isinstance(got, float):
        return InvalidEvent(field, f"must be a finite number (got {got!r})")
    return InvalidEvent(field, f"must be a finite number (got {_type(got)} {got!r:.60})")


def _validate(data: Any) -> Event:
    if not isinstance(data, dict):
        raise InvalidEvent("", f"an event must be a JSON object (got {_type(data)})")
    try:
        event = msgspec.convert(data, Event, strict=True)
    except msgspec.ValidationError as exc:
        raise _explain(data, str(exc)) from None
    for name in _IDS:  # a lone surrogate (from a lenient parser) could never be encoded again
        if not _utf8(getattr(event, name)):
            raise InvalidEvent(name, "must be valid Unicode text (got a string with lone surrogates)")
    for key, value in event.context.items():
        if not (_utf8(key) and _utf8(value)):
            raise InvalidEvent(f"context.{key}", "must be valid Unicode text (got a string with lone surrogates)")
    return event


def decode(raw: bytes | None) -> Event:
    """Parse and validate one Kafka message; raises `InvalidEvent` on anything bad."""
    if raw is None:
        raise InvalidEvent("", "message must have a value (got a tombstone: a message with a null value)")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent("", f"message must be at most {MAX_MESSAGE_BYTES} bytes (got {len(raw)})")
    try:  # fast path: msgspec parses and validates in one pass
        event = _DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as exc:
        error = str(exc)
    else:
        # msgspec keeps the last of a repeated key. Each key is followed by a colon, so when the message
        # has no more colons than the event has keys, no key is repeated; else `_check_event_keys` looks closer.
        ctx = event.context
        keys = (4 + (event.event_id is not None) + (event.session_id is not None) + (event.value is not None)
                + (len(ctx) + 1 if ctx else 0))
        if raw.count(b":") != keys:
            _check_event_keys(raw, event, keys)
        return event
    # Slow path, to name the field and the rule: the lenient stdlib parser keeps NaN, Infinity,
    # 1e400 (as inf) and lone surrogates, so validation can say `ts must be a finite number (got nan)`.
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_Object)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidEvent("", f"message must be UTF-8 JSON without NaN/Infinity ({error})") from None
    _no_repeated_key(data)
    _validate(data)
    # What still gets here parses leniently but not strictly (no such message is known).
    raise InvalidEvent("", f"message must be strict UTF-8 JSON ({error})")


def check_unique_keys(raw: bytes, data: Any) -> None:
    """Raise `InvalidEvent` naming a key that the JSON text `raw` repeats, at the top of an event or in
    its `context`; `data` is what a parser that keeps the last value (orjson, msgspec) made of `raw`:
    an event object, or a list of them (a POST body; the field is then named `events[i].<field>`)."""
    objects = data if isinstance(data, list) else [data]
    keys = 0
    for obj in objects:
        if not isinstance(obj, dict):
            return  # not events: validation says so
        ctx = obj.get("context")
        keys += len(obj) + (len(ctx) if isinstance(ctx, dict) else 0)
    if raw.count(b":") != keys and _keys_in(raw) != keys:
        _check_slowly(raw)


def _check_event_keys(raw: bytes, event: Event, keys: int) -> None:
    """Raise `InvalidEvent` naming a key that `raw` repeats; `event`, with `keys` keys, is what msgspec
    made of it. The stdlib parser checks (at ten times the cost) only when the count leaves it open:
    an escape, or a null field written with spaces."""
    found = _keys_in(raw)
    if found is not None and found > keys:  # optional fields given as null, or context as {} (compact)
        keys += ((event.event_id is None and b'"event_id":null' in raw)
                 + (event.session_id is None and b'"session_id":null' in raw)
                 + (event.value is None and b'"value":null' in raw) + (not event.context and b'"context":{}' in raw))
    if found != keys:
        _check_slowly(raw)


def _keys_in(raw: bytes) -> int | None:
    """How many keys the JSON text `raw` holds, or None when it has an escape.

    Without escapes every quote opens or closes a string, so splitting at quotes alternates outside
    and inside strings; each key is followed by the one colon outside strings. (So, too, a text such
    as `"value":null` is a key: a string cannot hold a quote.)"""
    if b"\\" in raw:
        return None
    return b"".join(raw.split(b'"')[::2]).count(b":")


def _check_slowly(raw: bytes) -> None:
    """`_no_repeated_key` of the stdlib's parse of `raw`, or of each object of a list (none when `raw`
    does not parse: what a strict parser took and this one does not has no repeated key to name)."""
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_Object)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return
    if not isinstance(data, list):
        _no_repeated_key(data)
        return
    for i, obj in enumerate(data):
        try:
            _no_repeated_key(obj)
        except InvalidEvent as exc:
            raise InvalidEvent(f"events[{i}].{exc.field}", exc.rule) from None


class _Object(dict):
    """A parsed JSON object that remembers the first key its text gave twice (`repeated`)."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        self.repeated: str | None = None
        if len(self) < len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self.repeated = key
                    break
                seen.add(key)


def _no_repeated_key(data: Any) -> None:
    """Raise `InvalidEvent` when a `_Object` parse repeated a key, at its top or one level down."""
    if not isinstance(data, _Object):
        return
    field = data.repeated
    if field is None:
        field = next((f"{key}.{value.repeated}" for key, value in data.items()
                      if isinstance(value, _Object) and value.repeated is not None), None)
    if field is not None:
        raise InvalidEvent(field, "is given more than once (JSON parsers differ on which value of a repeated key wins)")


def _utf8(value: Any) -> bool:
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def from_dict(data: Any) -> Event:
    """Validate an already-parsed object (e.g. an HTTP body)."""
    return _validate(data)


def encode(event: Event) -> bytes:
    """JSON bytes of an event, without absent optional fields (an empty context is absent).

    Raises `InvalidEvent` when the bytes would be rejected by `decode`: over
    `MAX_MESSAGE_BYTES` (a valid event can get there through long context
    strings) or not encodable (an integer beyond 64 bits).
    """
    try:
        raw = orjson.dumps({k: v for k, v in event.to_dict().items() if v is not None and v != {}})
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


def check_clock_skew(ts: float, now: float, max_skew: float | None) -> None:
    """Raise `InvalidEvent` when `ts` is more than `max_skew` seconds after `now` (None: no limit).

    A time far in the future (a clock running ahead, milliseconds sent as seconds) would move the
    decayed models' clocks there, and every real event after it would count as old.
    """
    if max_skew is None or not ts > now + max_skew:
        return
    hint = " (it looks like milliseconds: ts is in epoch seconds)" if 500 * now < ts < 2000 * now else ""
    raise InvalidEvent(
        "ts", f"is more than {max_skew:g} s in the future (got {ts!r}, {ts - now:.3g} s after this clock){hint}; "
        "send epoch seconds from a synchronised clock, or raise --max-clock-skew")
