"""`stream_app.io.kafka` against a real Tansu broker: Sender -> broker -> consumer."""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest
from kafka import TopicPartition

from stream_app.core.errors import ServiceError
from stream_app.core.settings import Settings
from stream_app.dev import embedded
from stream_app.io.kafka import (
    CLIENTS,
    Messages,
    Record,
    Sender,
    Target,
    consumer,
    ensure_topics,
    group_consumer,
    target,
)

pytestmark = pytest.mark.integration


def drain(c, expected: int, timeout: float = 30.0) -> list:
    """Poll until `expected` records arrived (or time ran out); records in arrival order."""
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < expected and time.monotonic() < deadline:
        for batch in c.poll(timeout_ms=500).values():
            records.extend(batch)
    return records


def test_round_trip_with_keys_keeps_order_per_key(topics: Settings) -> None:
    users = [f"user-{i}" for i in range(12)]
    sent: dict[bytes, list[bytes]] = defaultdict(list)
    with Sender(target(topics)) as sender:
        for seq in range(600):
            key = users[(seq * 7) % len(users)].encode()
            value = f"{key.decode()}:{seq}".encode()
            sender.send(topics.events_topic, value, key)
            sent[key].append(value)
        sender.flush()
        assert sender.sent == 600

    c = consumer(target(topics), topics.consumer_group)
    try:
        c.subscribe([topics.events_topic])
        records = drain(c, 600)
    finally:
        c.close()
    assert len(records) == 600

    received: dict[bytes, list[bytes]] = defaultdict(list)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for record in records:
        received[record.key].append(record.value)
        partitions[record.key].add(record.partition)
    assert received == sent  # every message, with its key, in send order per key
    assert all(len(p) == 1 for p in partitions.values())  # one user, one partition
    assert len({p for ps in partitions.values() for p in ps}) == topics.events_partitions  # both used


@pytest.mark.parametrize("client", CLIENTS)
def test_group_consumer_polls_each_partition_as_one_run_in_offset_order(topics: Settings, client: str) -> None:
    keys = [b"a", b"b", b"c", b"d"]  # both partitions get some
    with Sender(target(topics)) as sender:
        for seq in range(2000):
            sender.send(topics.events_topic, b"%d" % seq, keys[seq % 4])
    assigned: list[int] = []

    def on_assign(partitions: list[int]) -> dict[int, int | None]:
        assigned.extend(partitions)
        return {p: None for p in partitions}

    group = group_consumer(client, target(topics), topics.consumer_group, topics.events_topic,
                           on_assign, lambda partitions: None, max_records=300)
    by_partition: dict[int, list[Record]] = defaultdict(list)
    deadline = time.monotonic() + 30
    try:
        while sum(map(len, by_partition.values())) < 2000 and time.monotonic() < deadline:
            polled = group.poll(300, 0.5)
            assert len({m.partition for m in polled}) == len(polled)  # one run per partition
            for messages in polled:
                records = [messages.record(j) for j in range(len(messages))]
                assert [r.value for r in records] == messages.values
                assert messages.first_offset == records[0].offset and messages.next_offset == records[-1].offset + 1
                by_partition[messages.partition].extend(records)
    finally:
        group.close()
    assert sorted(assigned) == list(range(topics.events_partitions))
    assert sorted(int(r.value) for rs in by_partition.values() for r in rs) == list(range(2000))
    for partition, records in by_partition.items():
        assert all(r.partition == partition and r.topic == topics.events_topic for r in records)
        assert [r.offset for r in records] == list(range(len(records)))  # every offset once, in order
        assert sorted(records, key=lambda r: int(r.value)) == records  # in produce order


def test_messages_since_drops_what_comes_before_an_offset() -> None:
    records = [Record("t", 3, offset, None, b"%d" % offset) for offset in (5, 6, 8, 9)]  # 7: a gap
    messages = Messages.of(records)
    assert messages.partition == 3 and (messages.first_offset, messages.next_offset) == (5, 10)
    assert messages.since(7).values == [b"8", b"9"] and messages.since(8).first_offset == 8
    assert len(messages.since(10)) == 0 and messages.since(0).values == messages.values


def test_consumer_group_commits_and_resumes(topics: Settings) -> None:
    with Sender(target(topics)) as sender:
        sender.send_many(topics.events_topic, [(b"k", b"%d" % i) for i in range(10)])

    c = consumer(target(topics), topics.consumer_group)
    try:
        c.subscribe([topics.events_topic])
        assert [r.value for r in drain(c, 10)] == [b"%d" % i for i in range(10)]
        c.commit()
    finally:
        c.close()

    with Sender(target(topics)) as sender:
        sender.send(topics.events_topic, b"after", b"k")
    c = consumer(target(topics), topics.consumer_group)
    try:
        c.subscribe([topics.events_topic])
        assert [r.value for r in drain(c, 1)] == [b"after"]  # resumes from the committed offset
    finally:
        c.close()


def test_sender_constructor_does_no_network() -> None:
    started = time.monotonic()
    sender = Sender(Target("127.0.0.1:1"))  # nothing listens on port 1
    Sender(Target("no-such-host.invalid:9092"))
    assert time.monotonic() - started < 1.0
    sender.close()  # nothing was sent: closing is a no-op


@pytest.fixture
def private_broker(tmp_path: Path):
    """A Tansu of this test's own, so it can be stopped without disturbing the session broker."""
    server = embedded.start_tansu(embedded.free_port(), tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_flush_raises_service_error_when_delivery_fails(private_broker: embedded.ServerProcess) -> None:
    where = Target(private_broker.address)
    ensure_topics(where, {"t": 1})
    sender = Sender(where, config={"delivery_timeout_ms": 3000, "request_timeout_ms": 1000})
    try:
        sender.send("t", b"before", b"k")
        sender.flush()
        private_broker.stop(timeout=1)  # Tansu waits ~5 s for open connections on SIGTERM
        sender.send("t", b"lost", b"k")
        with pytest.raises(ServiceError, match="not delivered"):
            sender.flush(timeout=20)
    finally:
        sender.abandon()


def test_flush_with_default_config_raises_service_error_when_broker_is_gone(
    private_broker: embedded.ServerProcess,
) -> None:
    """With the default (long) delivery timeout, a flush that times out must still be a ServiceError."""
    where = Target(private_broker.address)
    ensure_topics(where, {"t": 1})
    sender = Sender(where)
    try:
        sender.send("t", b"before", b"k")
        sender.flush()
        private_broker.stop(timeout=1)  # Tansu waits ~5 s for open connections on SIGTERM
        sender.send("t", b"lost", b"k")
        with pytest.raises(ServiceError):
            sender.flush(timeout=3)
    finally:
        sender.abandon()


def test_abandon_drops_what_the_client_still_held_so_it_is_never_delivered(private_broker: embedded.ServerProcess) -> None:
    """A frozen broker (SIGSTOP) holds one request in flight; the next message waits in the client behind
    it. Abandoned, the waiting one must never reach the broker, even once it wakes up, and the abandoned
    sender refuses to report anything delivered."""
    where = Target(private_broker.address)
    ensure_topics(where, {"t": 1})
    sender = Sender(where, retries=0, config={"max_in_flight_requests_per_connection": 1})
    sender.send("t", b"before", b"k")
    sender.flush()
    private_broker.process.send_signal(signal.SIGSTOP)
    try:
        sender.send("t", b"in flight", b"k")
        with pytest.raises(ServiceError, match="did not acknowledge"):
            sender.flush(timeout=1)
        sender.send("t", b"waiting", b"k")
        assert sender.abandon() == 2
    finally:
        private_broker.process.send_signal(signal.SIGCONT)
    with pytest.raises(ServiceError, match="closed after a failed delivery"):
        sender.flush(timeout=1)
    with pytest.raises(ServiceError, match="closed after a failed delivery"):
        sender.send("t", b"after", b"k")
    reader = consumer(where, None)
    reader.assign([TopicPartition("t", 0)])
    reader.seek_to_beginning()
    values = [r.value for r in drain(reader, 3, timeout=10)]  # waits for a third that must not come
    reader.close()
    assert values[0] == b"before" and b"waiting" not in values  # what was in flight may have landed
