"""The event schema (DESIGN.md section 3): round trips and every kind of rejection, with its message."""

from __future__ import annotations

import json
import math

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stream_app.core.errors import InvalidEvent
from stream_app.core.events import (
    EVENT_TYPES,
    MAX_CONTEXT_KEYS,
    MAX_ID_CHARS,
    MAX_MESSAGE_BYTES,
    Event,
    check_unique_keys,
    decode,
    encode,
    from_dict,
    prepare,
)

ids = st.text(min_size=1, max_size=MAX_ID_CHARS)
finite = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.one_of(st.integers(-(2**63), 2**63 - 1), finite)
context_values = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), finite, st.text(max_size=40))
contexts = st.dictionaries(st.text(max_size=20), context_values, max_size=MAX_CONTEXT_KEYS)


@st.composite
def event_dicts(draw: st.DrawFn) -> dict:
    data = {
        "user_id": draw(ids),
        "item_id": draw(ids),
        "event_type": draw(st.sampled_from(EVENT_TYPES)),
        "ts": draw(numbers),
    }
    for name, strategy in (("event_id", ids), ("session_id", ids), ("value", numbers), ("context", contexts)):
        if draw(st.booleans()):
            data[name] = draw(strategy)
    return data


def valid() -> dict:
    return {"user_id": "u1", "item_id": "i1", "event_type": "click", "ts": 1700000000.5}


def rejects(data: object, field: str, *rule_words: str) -> InvalidEvent:
    """from_dict rejects data, naming `field`, with every rule word in the message."""
    with pytest.raises(InvalidEvent) as info:
        from_dict(data)
    return check(info.value, field, *rule_words)


def rejects_raw(raw: bytes, field: str, *rule_words: str) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        decode(raw)
    return check(info.value, field, *rule_words)


def check(exc: InvalidEvent, field: str, *rule_words: str) -> InvalidEvent:
    assert exc.field == field, str(exc)
    message = str(exc)
    if field:
        assert message.startswith(field + " "), message
    for word in rule_words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    return exc


# ---- round trips -----------------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(event_dicts())
def test_valid_events_round_trip(data: dict) -> None:
    event = from_dict(data)
    raw = encode(event)
    back = decode(raw)
    assert back == event
    assert encode(back) == raw  # types survive too (True stays a bool, 1.0 stays a float)
    assert orjson.loads(raw) == {k: v for k, v in event.to_dict().items() if v is not None and v != {}}


@given(event_dicts())
def test_prepare_fills_only_what_is_absent(data: dict) -> None:
    event = prepare({k: v for k, v in data.items() if k not in ("event_id", "ts")}, now=123.0)
    assert event.ts == 123.0 and event.event_id
    kept = prepare({**data, "event_id": "e-1"}, now=5.0)
    assert kept.event_id == "e-1" and kept.ts == data["ts"]


def test_prepare_treats_none_as_absent_and_makes_unique_ids() -> None:
    a = prepare({**valid(), "event_id": None, "ts": None}, now=7.0)
    b = prepare({**valid(), "event_id": None})
    assert a.ts == 7.0 and a.event_id and b.event_id and a.event_id != b.event_id


def test_encode_omits_absent_optional_fields() -> None:
    assert orjson.loads(encode(from_dict(valid()))) == valid()
    assert orjson.loads(encode(from_dict({**valid(), "context": {"a": 1}}))) == {**valid(), "context": {"a": 1}}


# ---- rejections: each with its field and rule -------------------------------------------


@pytest.mark.parametrize("name", ["user_id", "item_id", "event_type", "ts"])
def test_missing_required_field(name: str) -> None:
    data = valid()
    del data[name]
    rejects(data, name, "is required")
    rejects_raw(orjson.dumps(data), name, "is required")


@pytest.mark.parametrize("name", ["user_id", "item_id", "session_id", "event_id"])
def test_empty_ids(name: str) -> None:
    rejects({**valid(), name: ""}, name, "must not be empty")


@pytest.mark.parametrize("name", ["user_id", "item_id", "session_id"])
def test_too_long_ids(name: str) -> None:
    rejects({**valid(), name: "x" * (MAX_ID_CHARS + 1)}, name, f"at most {MAX_ID_CHARS} characters", "257")
    assert from_dict({**valid(), name: "x" * MAX_ID_CHARS})


@given(st.text().filter(lambda t: t not in EVENT_TYPES))
def test_unknown_event_type(kind: str) -> None:
    rejects({**valid(), "event_type": kind}, "event_type", "must be one of click, purchase, favorite", repr(kind))


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"])
@pytest.mark.parametrize("name", ["ts", "value"])
def test_non_finite_json_tokens(name: str, token: bytes) -> None:
    raw = orjson.dumps({**valid(), name: 0}).replace(f'"{name}":0'.encode(), f'"{name}":'.encode() + token)
    assert token in raw
    rejects_raw(raw, name, "must be a finite number")


@pytest.mark.parametrize("token", [b"NaN", b"Infinity"])
def test_non_finite_json_tokens_in_context(token: bytes) -> None:
    raw = orjson.dumps({**valid(), "context": {"price": 0}}).replace(b'"price":0', b'"price":' + token)
    rejects_raw(raw, "context.price", "must be a finite number")


@given(st.sampled_from(["ts", "value", "context"]), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_python_floats(name: str, bad: float) -> None:
    if name == "context":
        rejects({**valid(), "context": {"x": bad}}, "context.x", "must be a finite number")
    else:
        rejects({**valid(), name: bad}, name, "must be a finite number")


@pytest.mark.parametrize(
    ("patch", "field", "words"),
    [
        ({"user_id": 5}, "user_id", ["must be a string", "int"]),
        ({"item_id": None}, "item_id", ["must be a string", "NoneType"]),
        ({"session_id": ["s"]}, "session_id", ["must be a string", "list"]),
        ({"ts": "1700000000"}, "ts", ["must be a finite number", "str"]),
        ({"ts": True}, "ts", ["must be a finite number", "bool"]),
        ({"value": "4.5"}, "value", ["must be a finite number", "str"]),
        ({"value": False}, "value", ["must be a finite number", "bool"]),
        ({"event_type": 1}, "event_type", ["must be one of"]),
        ({"context": ["device", "ios"]}, "context", ["must be an object", "list"]),
        ({"context": None}, "context", ["must be an object", "NoneType"]),
        ({"context": {"device": ["ios"]}}, "context.device", ["must be a string, number or bool", "list"]),
        ({"context": {"geo": {"lat": 1}}}, "context.geo", ["must be a string, number or bool", "dict"]),
        ({"context": {"device": None}}, "context.device", ["must be a string, number or bool", "NoneType"]),
        ({"context": {3: "x"}}, "context", ["keys must be strings", "int"]),
        ({"device": "ios"}, "device", ["is not a field", "context"]),
    ],
)
def test_wrong_types(patch: dict, field: str, words: list[str]) -> None:
    rejects({**valid(), **patch}, field, *words)


@given(st.integers(MAX_CONTEXT_KEYS + 1, 3 * MAX_CONTEXT_KEYS))
def test_oversized_context(n: int) -> None:
    context = {f"k{i}": i for i in range(n)}
    rejects({**valid(), "context": context}, "context", f"at most {MAX_CONTEXT_KEYS} keys", f"got {n}")
    rejects_raw(orjson.dumps({**valid(), "context": context}), "context", f"at most {MAX_CONTEXT_KEYS} keys")


def test_context_of_exactly_max_keys_is_fine() -> None:
    assert len(from_dict({**valid(), "context": {f"k{i}": i for i in range(MAX_CONTEXT_KEYS)}}).context) == 32


def test_message_over_64_kib() -> None:
    raw = orjson.dumps({**valid(), "context": {"note": "x" * MAX_MESSAGE_BYTES}})
    rejects_raw(raw, "", f"at most {MAX_MESSAGE_BYTES} bytes", str(len(raw)))
    # A valid event that encodes too large is refused by encode, so producers never send it.
    event = from_dict({**valid(), "context": {"note": "x" * MAX_MESSAGE_BYTES}})
    with pytest.raises(InvalidEvent, match=f"at most {MAX_MESSAGE_BYTES} bytes"):
        encode(event)


def test_encode_refuses_ints_beyond_64_bits() -> None:
    with pytest.raises(InvalidEvent, match="cannot be encoded"):
        encode(from_dict({**valid(), "ts": 2**70}))


@given(st.binary(min_size=1, max_size=200))
def test_bytes_that_are_not_utf8(junk: bytes) -> None:
    try:
        junk.decode("utf-8")
        assume(False)
    except UnicodeDecodeError:
        pass
    raw = b'{"user_id": "' + junk + b'", "item_id": "i", "event_type": "click", "ts": 1}'
    rejects_raw(raw, "", "UTF-8")


def test_lone_surrogate_escape() -> None:
    raw = b'{"user_id": "\\ud800", "item_id": "i", "event_type": "click", "ts": 1}'
    rejects_raw(raw, "user_id", "unicode")


int64 = st.integers(-(2**63), 2**63 - 1)


@given(st.one_of(st.lists(int64, max_size=3), st.text(), int64, finite, st.none(), st.booleans()))
def test_json_that_is_not_an_object(data: object) -> None:
    rejects_raw(orjson.dumps(data), "", "must be a JSON object")
    rejects(data, "", "must be a JSON object")


@pytest.mark.parametrize("raw", [b"", b"{", b'{"user_id": "u",}', b"\x00", b"{'user_id': 'u'}"])
def test_malformed_json(raw: bytes) -> None:
    rejects_raw(raw, "", "JSON")


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=300), event_dicts().map(orjson.dumps).map(lambda b: b[: len(b) // 2])))
def test_decode_never_raises_anything_but_invalid_event(raw: bytes) -> None:
    try:
        assert isinstance(decode(raw), Event)
    except InvalidEvent as exc:
        assert str(exc)


# ---- repeated keys: rejected by name, on every path; no false alarms ------------------------

EVENT = b'"item_id":"i","event_type":"click","ts":1'


@pytest.mark.parametrize(("raw", "field"), [
    (b'{"user_id":"a","user_id":"b",' + EVENT + b"}", "user_id"),
    (b'{"user_id":"a",' + EVENT + b',"user_id":"a"}', "user_id"),  # the same value twice is still ambiguous
    (b'{"user_id":"a",' + EVENT + b',"ts":2}', "ts"),
    (b'{"user_id":"a",' + EVENT + b',"context":{"d":"x","d":"y"}}', "context.d"),
    (b'{"user_id":"a",' + EVENT + b',"context":{"a":1},"context":{"b":2}}', "context"),
    (b'{"user_id":"a:b","user_id":"c:d",' + EVENT + b"}", "user_id"),  # colons inside the values
    (b'{"user_id":"a",' + EVENT + b',"context":{"u:rl":"x:y","u:rl":"z"}}', "context.u:rl"),
    (b'{"user_id":"a","user\\u005fid":"b",' + EVENT + b"}", "user_id"),  # the same key, escaped
    (b'{"user_id" : "a" , "user_id" : "b" , "item_id" : "i" , "event_type" : "click" , "ts" : 1}', "user_id"),
    (b'{"user_id":"a",' + EVENT + b',"event_id":null,"event_id":"e"}', "event_id"),
    (b'{"user_id":"a",' + EVENT + b',"event_id":"e","event_id":null}', "event_id"),
    (b'{"user_id":"a",' + EVENT + b',"event_id":null,"event_id":null}', "event_id"),
    (b'{"user_id":"a",' + EVENT + b',"context":{},"context":{}}', "context"),
    (b'{"ts":"yesterday","user_id":"a",' + EVENT + b"}", "ts"),  # the first value would fail on its own
    (b'{"user_id":"a",' + EVENT + b',"ts":NaN}', "ts"),  # the slow path (NaN) checks too
])
def test_a_repeated_key_is_rejected_by_name(raw: bytes, field: str) -> None:
    rejects_raw(raw, field, "more than once")
    with pytest.raises(InvalidEvent) as info:
        check_unique_keys(raw, json.loads(raw))  # what the file readers call on orjson's parse
    check(info.value, field, "more than once")


@pytest.mark.parametrize("raw", [
    b'{"user_id":"urn:user:1","item_id":"https://x.example/a:b?c=d:e","event_type":"click","ts":1}',
    b'{"user_id":"user_id","item_id":"\\"item_id\\":","event_type":"click","ts":1,"context":{"user_id":"ts:"}}',
    b'{"user_id":"a","item_id":"event_id","event_type":"click","ts":1,"session_id":"context","context":{"ts":"ts"}}',
    b'{"user_id":"a","item_id":"\\"event_id\\":null","event_type":"click","ts":1}',
    b'{"user_id":"a","item_id":"i","event_type":"click","ts":1,"event_id":null,"session_id":null,"value":null}',
    b'{"user_id":"a","item_id":"i","event_type":"click","ts":1,"context":{}}',
    b'{"user_id": "a", "item_id": "i:j", "event_type": "click", "ts": 1, "event_id": null, "context": { }}',
    b'{"user_id":"a","item_id":"i","event_type":"click","ts":1,"context":{"a:b:c":"d:e","f":"::"}}',
])
def test_colons_nulls_and_field_names_in_values_are_no_repeated_keys(raw: bytes) -> None:
    event = decode(raw)
    assert event == from_dict(json.loads(raw))
    check_unique_keys(raw, json.loads(raw))


def test_a_list_of_events_names_the_event_that_repeats_a_key() -> None:
    """A POST body may be a list of events; the repeated key is named by the event's place."""
    good = b'{"user_id":"u:1","item_id":"i","event_type":"click","ts":1,"context":{"url":"http://x"}}'
    bad = b'{"user_id":"u",' + EVENT + b',"context":{"k":1,"k":2}}'
    check_unique_keys(b"[" + good + b"," + good + b"]", json.loads(b"[" + good + b"," + good + b"]"))
    with pytest.raises(InvalidEvent) as info:
        check_unique_keys(b"[" + good + b"," + bad + b"]", json.loads(b"[" + good + b"," + bad + b"]"))
    check(info.value, "events[1].context.k", "more than once")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(event_dicts(), st.sampled_from([(",", ":"), (", ", ": "), (" , ", " : ")]), st.booleans(), st.data())
def test_repeated_keys_are_found_and_unique_keys_pass(data: dict, separators, ascii_only: bool, draw) -> None:
    """Any valid event, written by any JSON writer, decodes; the same text with one key given twice does not."""
    raw = json.dumps(data, separators=separators, ensure_ascii=ascii_only).encode()
    assert decode(raw) == from_dict(data)
    check_unique_keys(raw, json.loads(raw))
    # give a key twice, at the top or in context: first on its own, then where it was
    inner = data.get("context")
    where = draw.draw(st.sampled_from(["top", "context"] if inner else ["top"]))
    obj = inner if where == "context" else data
    key = draw.draw(st.sampled_from(sorted(obj)))
    text = json.dumps(obj, separators=separators, ensure_ascii=ascii_only)
    doubled = "{" + json.dumps(key, ensure_ascii=ascii_only) + separators[1] + json.dumps(obj[key]) + separators[0] + text[1:]
    whole = json.dumps({**data, "context": "@@"}, separators=separators, ensure_ascii=ascii_only).replace(
        '"@@"', doubled) if where == "context" else doubled
    field = f"context.{key}" if where == "context" else key
    rejects_raw(whole.encode(), field, "more than once")
    with pytest.raises(InvalidEvent):
        check_unique_keys(whole.encode(), json.loads(whole))
