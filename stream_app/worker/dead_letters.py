"""Dead-letter records: a message the worker cannot learn, with the reason, small enough to send.

A record is JSON: `reason`, where the message was (`topic`, `partition`, `offset`), its payload
(`raw`: UTF-8 text, or base64 when it is not UTF-8, in `raw_encoding`) cut to `RAW_LIMIT` bytes,
with the whole payload's length and SHA-256 (`raw_bytes`, `raw_sha256`, `raw_truncated`), the time
and the worker. With the reason and key cut too, a record stays under 512 KB (JSON escapes of
control characters make text up to six times longer), half of Kafka's default 1 MB limit.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time

import orjson

from stream_app.io import kafka

log = logging.getLogger("streamrec.worker")

RAW_LIMIT = 64 * 1024  # payload bytes kept
REASON_LIMIT = 4096  # characters of the reason kept
KEY_LIMIT = 1024  # key bytes kept (the dead letter's own key, which picks its partition)


def record(msg: kafka.Record, reason: str, worker: str, keep: int = RAW_LIMIT) -> bytes:
    """The dead-letter record of `msg`, with at most `keep` bytes of its payload (see the module doc)."""
    value = msg.value or b""
    cut = len(value) if len(value) <= keep else _utf8_boundary(value, keep)
    kept = value[:cut]
    try:
        raw, encoding = kept.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        raw, encoding = base64.b64encode(kept).decode(), "base64"
    if len(reason) > REASON_LIMIT:
        reason = reason[:REASON_LIMIT] + f"... ({len(reason)} characters)"
    return orjson.dumps({
        "reason": reason, "topic": msg.topic, "partition": msg.partition, "offset": msg.offset,
        "raw": raw, "raw_encoding": encoding, "raw_bytes": len(value),
        "raw_sha256": hashlib.sha256(value).hexdigest(), "raw_truncated": cut < len(value),
        "ts": time.time(), "worker": worker,
    })


def _utf8_boundary(value: bytes, limit: int) -> int:
    """The largest cut at most `limit` (< len(value)) that splits no UTF-8 character: one that falls
    on a continuation byte (10xxxxxx) moves back, at most three bytes."""
    cut = limit
    while cut > max(limit - 3, 0) and value[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut


def send(sender: kafka.Sender, topic: str, msg: kafka.Record, reason: str, worker: str) -> None:
    """Send `msg`'s dead-letter record to `topic`.

    A worker never dies on a message: when Kafka refuses the record (a topic limit below its size,
    say), a record without the payload goes instead, and when that fails too the loss is logged
    with the offset and the reason. An unreachable broker (`ServiceError`) is raised as ever.
    """
    key = None if msg.key is None else msg.key[:KEY_LIMIT]
    try:
        sender.send(topic, record(msg, reason, worker), key=key)
        return
    except kafka.KafkaError as exc:
        first = exc
    log.error("dead letter of %s[%s]@%s refused by Kafka (%r); sending it without its payload",
              msg.topic, msg.partition, msg.offset, first)
    try:
        sender.send(topic, record(msg, f"{reason} [payload left out: {first!r:.200}]", worker, keep=0), key=key)
    except kafka.KafkaError as exc:
        log.error("dead letter of %s[%s]@%s lost (%r); reason: %s", msg.topic, msg.partition, msg.offset, exc, reason)
