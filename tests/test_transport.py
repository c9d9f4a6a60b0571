"""Transport faults against real servers: a Tansu restarted on the same port (it comes back empty), Kafka
security settings in every client, Redis with a password, an ACL user and TLS."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_app.core.errors import ServiceError
from stream_app.dev import embedded
from stream_app.io.kafka import CLIENTS, Sender, Target, consumer, ensure_topics, group_consumer

pytestmark = pytest.mark.integration


class Broker:
    """A Tansu of this test's own that can be stopped and started again on the same port (it comes back empty)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = embedded.free_port()
        self.server: embedded.ServerProcess | None = None
        self.start()
        self.target = Target(f"127.0.0.1:{self.port}")

    def start(self) -> None:
        self.server = embedded.start_tansu(self.port, self.directory)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=1)  # Tansu waits ~5 s for open connections on SIGTERM
            self.server = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    own = Broker(tmp_path)
    try:
        yield own
    finally:
        own.stop()


def read_values(where: Target, topic: str, expected: int, timeout: float = 60.0) -> list[bytes]:
    """Every value of `topic` from its beginning, once `expected` of them arrived (or time ran out)."""
    reader = consumer(where, None)
    reader.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(values) < expected and time.monotonic() < deadline:
            for batch in reader.poll(timeout_ms=500).values():
                values += [r.value for r in batch]
    finally:
        reader.close()
    return values


def test_sender_rebuilds_its_client_after_a_broker_restart(broker: Broker) -> None:
    """The restarted broker does not know the idempotent producer's id: kafka-python's producer fails every
    later delivery (UnknownProducerIdError, then a fatal InitProducerId error) until it is replaced."""
    where = broker.target
    ensure_topics(where, {"t": 1})
    with Sender(where) as sender:
        for i in range(5):
            sender.send("t", b"before-%d" % i, b"k")
        sender.flush()
        broker.restart()
        ensure_topics(where, {"t": 1})
        for i in range(5):
            sender.send("t", b"after-%d" % i, b"k")
        sender.flush(timeout=60)  # the old code raised "5 message(s) were not delivered" here, for good
        assert sender.rebuilt >= 1
        for i in range(5):
            sender.send("t", b"later-%d" % i, b"k")
    assert read_values(where, "t", 10) == [b"after-%d" % i for i in range(5)] + [b"later-%d" % i for i in range(5)]


def test_undelivered_messages_are_kept_for_the_next_flush(broker: Broker) -> None:
    """While the broker is down a flush fails; what it could not deliver is sent by a later flush."""
    where = broker.target
    ensure_topics(where, {"t": 1})
    with Sender(where, config={"delivery_timeout_ms": 3000, "request_timeout_ms": 1000}) as sender:
        sender.send("t", b"first", b"k")
        sender.flush()
        broker.stop()
        sender.send("t", b"kept", b"k")
        with pytest.raises(ServiceError, match="not delivered"):
            sender.flush(timeout=8)
        broker.start()
        ensure_topics(where, {"t": 1})
    assert read_values(where, "t", 1) == [b"kept"]


@pytest.mark.parametrize("client", CLIENTS)
def test_group_consumers_read_again_after_a_broker_restart(broker: Broker, client: str) -> None:
    """Both group consumers reconnect by themselves: after the restart and the topic's re-creation they
    rejoin the group (the new broker has no group) and read the new log from its beginning."""
    where = broker.target
    ensure_topics(where, {"t": 1})
    assigned: list[list[int]] = []

    def on_assign(partitions: list[int]) -> dict[int, int | None]:
        assigned.append(partitions)
        return dict.fromkeys(partitions)  # from the beginning

    group = group_consumer(client, where, "g", "t", on_assign, lambda partitions: None, max_wait_ms=100)
    try:
        with Sender(where) as sender:
            sender.send_many("t", [(b"k", b"before-%d" % i) for i in range(3)])

        def poll_until(expected: set[bytes], timeout: float = 90.0) -> set[bytes]:
            seen: set[bytes] = set()
            deadline = time.monotonic() + timeout
            while not expected <= seen and time.monotonic() < deadline:
                for messages in group.poll(500, 0.5):
                    seen.update(messages.values)
            return seen

        before = {b"before-%d" % i for i in range(3)}
        assert before <= poll_until(before)
        broker.restart()
        ensure_topics(where, {"t": 1})
        with Sender(where) as sender:
            sender.send_many("t", [(b"k", b"after-%d" % i) for i in range(3)])
        after = {b"after-%d" % i for i in range(3)}
        assert after <= poll_until(after)
    finally:
        group.close()
