"""Hostile input against a real worker, broker and Redis: times far in the future, and messages too big
for a dead-letter record (issue 15, rows 4 and 5). Also the dead-letter record's own bounds."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import time

import numpy as np
import orjson
import pytest

from models.registry import create
from stream_app.core.events import encode, prepare
from stream_app.io import kafka
from stream_app.io.redis import Keys, connect, read_snapshot
from stream_app.worker import dead_letters
from stream_app.worker.config import WorkerConfig
from stream_app.worker.worker import Worker

KAFKA_MAX_MESSAGE = 1 << 20  # Kafka's default max.message.bytes, and kafka-python's max_request_size


def valid(n: int, start: int, ts: float, item: str = "i") -> list[bytes]:
    return [encode(prepare({"user_id": f"u{j % 7}", "item_id": f"{item}{j % 5}", "event_type": "click",
                            "ts": ts + j, "event_id": f"e{start + j}"})) for j in range(n)]


def produce(settings, values: list[bytes], max_request_size: int = KAFKA_MAX_MESSAGE) -> None:
    """Everything to partition 0, in this order."""
    with kafka.Sender(kafka.target(settings), config={"max_request_size": max_request_size}) as sender:
        for value in values:
            sender.send(settings.events_topic, value, key=b"k", partition=0)


def dead_letter_records(settings, expected: int, timeout: float = 30.0) -> list[bytes]:
    consumer = kafka.consumer(kafka.target(settings), None)
    consumer.assign([kafka.TopicPartition(settings.dlq_topic, p) for p in consumer.partitions_for_topic(settings.dlq_topic)])
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(out) < expected:
        for msgs in consumer.poll(timeout_ms=300).values():
            out.extend(m.value for m in msgs)
    consumer.close()
    return out


def stored(settings, model: str):
    """Partition 0's vocabulary of items and `model`'s tables, as the worker committed them to Redis."""
    snap = read_snapshot(connect(settings.redis_url), Keys(settings.key_prefix, settings.events_topic, 0),
                         {model: dict(create(model).tables)})
    return snap.applied, snap.vocabs["item"], snap.models[model]


def run_worker(settings, models: tuple[str, ...] = ("pop",), sender: kafka.Sender | None = None) -> Worker:
    worker = Worker(settings, WorkerConfig(models=models, metrics_interval=3600.0))
    if sender is not None:
        worker.sender = sender
    worker.run(max_idle=4)
    return worker


# ---- row 4: a ts far in the future is a dead letter, and never reaches the models ----------------


@pytest.mark.parametrize("client", kafka.CLIENTS)
def test_a_ts_hours_ahead_is_a_dead_letter_and_now_is_learned(topics, client):
    topics = topics.with_(kafka_client=client)
    now = time.time()
    future = encode(prepare({"user_id": "u0", "item_id": "future", "event_type": "click", "ts": now + 7200.0}))
    millis = encode(prepare({"user_id": "u0", "item_id": "millis", "event_type": "click", "ts": now * 1000.0}))
    produce(topics, valid(30, 0, now - 60.0) + [future, millis] + valid(30, 100, now, item="j"))
    run_worker(topics, models=("pop", "markov"))
    applied, items, pop = stored(topics, "pop")
    assert applied == 60
    assert "future" not in items and "millis" not in items and {"i0", "j0"} <= set(items)
    count = pop["count"][:, 0]
    assert np.isfinite(count).all() and (count[[items[f"j{k}"] for k in range(5)]] > 0).all()
    assert pop["meta"][0, 0] <= now + 60.0  # the models' clock stayed at the events' time
    dead = [orjson.loads(r) for r in dead_letter_records(topics, 2)]
    assert [d["offset"] for d in dead] == [30, 31]
    assert all(d["reason"].startswith("ts is more than 3600 s in the future") for d in dead)
    assert "milliseconds" in dead[1]["reason"] and "milliseconds" not in dead[0]["reason"]
    assert orjson.loads(dead[0]["raw"])["item_id"] == "future"


def test_the_worker_command_takes_its_clock_skew_from_the_flag(topics, tmp_path):
    now = time.time()
    ahead = encode(prepare({"user_id": "u0", "item_id": "ahead", "event_type": "click", "ts": now + 60.0}))
    produce(topics, valid(5, 0, now - 10.0) + [ahead] + valid(5, 100, now))
    log = tmp_path / "worker.log"
    proc = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "worker", "--max-clock-skew", "10", "--max-idle", "4"],
        env=topics.environ(), stdout=log.open("wb"), stderr=subprocess.STDOUT, timeout=180)
    assert proc.returncode == 0, log.read_text()[-2000:]
    applied, items, _ = stored(topics, "pop")
    assert applied == 10 and "ahead" not in items
    (dead,) = [orjson.loads(r) for r in dead_letter_records(topics, 1)]
    assert dead["offset"] == 5 and dead["reason"].startswith("ts is more than 10 s in the future")


# ---- row 5: a dead-letter record stays within Kafka's limit, and the worker goes on --------------


@pytest.mark.parametrize("client", kafka.CLIENTS)
def test_huge_and_binary_messages_become_bounded_dead_letters_and_learning_goes_on(topics, client):
    topics = topics.with_(kafka_client=client)
    huge = b'{"user_id":"u","item_id":"i","event_type":"click","ts":1,"context":{"x":"' + b"a" * (5 << 20) + b'"}}'
    binary = bytes(np.random.default_rng(0).integers(0, 256, 900 * 1024, dtype=np.uint8))  # not UTF-8
    assert len(huge) > 5 << 20
    now = time.time()
    produce(topics, valid(40, 0, now) + [huge, binary] + valid(60, 100, now + 100), max_request_size=6 << 20)
    worker = run_worker(topics)
    applied, items, _ = stored(topics, "pop")
    assert applied == worker.applied == 100 and worker.dead == 2
    records = dead_letter_records(topics, 2)
    assert len(records) == 2 and all(len(r) < KAFKA_MAX_MESSAGE // 2 for r in records)
    dead = [orjson.loads(r) for r in records]
    for d, payload in zip(dead, (huge, binary)):
        assert d["raw_bytes"] == len(payload) and d["raw_sha256"] == hashlib.sha256(payload).hexdigest()
        assert d["raw_truncated"] is True and "at most 65536 bytes" in d["reason"]
    assert dead[0]["raw_encoding"] == "utf-8" and huge.startswith(dead[0]["raw"].encode())
    assert dead[1]["raw_encoding"] == "base64" and binary.startswith(base64.b64decode(dead[1]["raw"]))
    assert len(dead[0]["raw"]) == dead_letters.RAW_LIMIT


def test_a_dead_letter_kafka_refuses_goes_without_its_payload_and_the_worker_goes_on(topics):
    """A producer limit below the record (as a topic's own limit could be): the record goes without
    its payload, still with its length and hash, and the events behind it are learned."""
    payload = b'{"user_id":"u","item_id":"i","event_type":"click","ts":1,"context":{"x":"' + b"b" * 200_000 + b'"}}'
    now = time.time()
    produce(topics, valid(10, 0, now) + [payload] + valid(10, 100, now + 100))
    small = kafka.Sender(kafka.target(topics), config={"max_request_size": 16 * 1024})
    worker = run_worker(topics, sender=small)
    assert stored(topics, "pop")[0] == worker.applied == 20
    (record,) = dead_letter_records(topics, 1)
    dead = orjson.loads(record)
    assert dead["offset"] == 10 and dead["raw"] == "" and dead["raw_truncated"] is True
    assert dead["raw_bytes"] == len(payload) and dead["raw_sha256"] == hashlib.sha256(payload).hexdigest()
    assert "at most 65536 bytes" in dead["reason"] and "payload left out" in dead["reason"]


# ---- the record itself ------------------------------------------------------------------------


def record_of(value: bytes | None, reason: str = "bad", key: bytes | None = None) -> dict:
    raw = dead_letters.record(kafka.Record("events", 3, 17, key, value), reason, "w1")  # type: ignore[arg-type]
    assert len(raw) < KAFKA_MAX_MESSAGE // 2
    return orjson.loads(raw)


def test_a_small_payload_is_kept_whole():
    d = record_of(b'{"a": 1}')
    assert (d["raw"], d["raw_encoding"], d["raw_bytes"], d["raw_truncated"]) == ('{"a": 1}', "utf-8", 8, False)
    assert (d["topic"], d["partition"], d["offset"], d["worker"]) == ("events", 3, 17, "w1")
    assert record_of(None)["raw"] == "" and record_of(None)["raw_bytes"] == 0  # a tombstone


def test_the_cut_never_splits_a_character_and_escapes_stay_within_bounds():
    text = ("é" * dead_letters.RAW_LIMIT).encode()  # two bytes each: the limit falls inside one
    d = record_of(text)
    assert d["raw_encoding"] == "utf-8" and d["raw"] == "é" * (dead_letters.RAW_LIMIT // 2)
    odd = b"x" + text  # now the limit falls after the first byte of a character
    assert record_of(odd)["raw"] == "x" + "é" * (dead_letters.RAW_LIMIT // 2 - 1)
    controls = bytes([1]) * (2 * dead_letters.RAW_LIMIT)  # JSON escapes each as \u0001: six times longer
    assert record_of(controls, reason="\x02" * 10**6, key=b"k" * 10**6)["raw_bytes"] == len(controls)
