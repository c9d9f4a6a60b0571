"""The one module that talks to the Kafka client library (kafka-python).

Thin on purpose: nothing here touches the network until a method is called,
producers flush on close and retry a full buffer, and serialisation stays in
`producers.schema`. A faster client can replace this module's internals
without touching callers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from stream_app.errors import ServiceError

__all__ = [
    "ConsumerRebalanceListener", "KafkaError", "Sender", "TopicPartition",
    "commit_quietly", "consumer", "ensure_topics", "wait_for_broker",
]


def _unreachable(bootstrap: str, exc: Exception) -> ServiceError:
    return ServiceError(
        f"Kafka at {bootstrap} is not reachable ({exc}); start one with `streamrec up` "
        "or point STREAMREC_KAFKA_BOOTSTRAP at a running broker"
    )


def wait_for_broker(bootstrap: str, timeout: float = 30.0) -> None:
    """Block until the broker answers metadata requests, or raise `ServiceError`."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
            admin.list_topics()
            admin.close()
            return
        except (KafkaError, OSError) as exc:
            last = exc
            time.sleep(0.3)
    raise _unreachable(bootstrap, last or TimeoutError("no answer"))


def ensure_topics(bootstrap: str, partitions: dict[str, int], timeout: float = 30.0) -> None:
    """Create the topics that do not exist yet (name -> partition count)."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    except KafkaError as exc:
        raise _unreachable(bootstrap, exc) from None
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, n, 1) for name, n in partitions.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + timeout
        while not set(partitions) <= set(admin.list_topics()):
            if time.monotonic() > deadline:
                raise ServiceError(f"topics {sorted(partitions)} did not appear on {bootstrap} within {timeout}s")
            time.sleep(0.2)
    finally:
        admin.close()


def consumer(bootstrap: str, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    """A consumer of raw bytes with auto-commit off; subscribe or assign it yourself."""
    config: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_poll_records=2000,
        fetch_max_wait_ms=100,
        client_id="streamrec",
    )
    config.update(overrides)
    try:
        return KafkaConsumer(**config)
    except KafkaError as exc:
        raise _unreachable(bootstrap, exc) from None


def commit_quietly(consumer: KafkaConsumer, topic: str, offsets: dict[int, int]) -> None:
    """Commit next offsets (partition -> offset) asynchronously; a rebalance in progress skips it.

    Callers that keep their offsets elsewhere use this for lag monitoring only.
    """
    if not offsets:
        return
    try:
        consumer.commit_async({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
    except KafkaError:  # RebalanceInProgressError, CommitFailedError, ...: the next batch commits again
        pass


@dataclass
class Sender:
    """Produces raw bytes; connects on first send, flushes on close, surfaces delivery errors.

    A full send buffer is retried (after a flush) up to `retries` times; a
    failed delivery is kept and raised by the next `flush()` or `close()`.
    """

    bootstrap: str
    retries: int = 5
    config: dict[str, Any] = field(default_factory=dict)
    _producer: KafkaProducer | None = None
    _errors: list[BaseException] = field(default_factory=list)
    sent: int = 0

    def _client(self) -> KafkaProducer:
        if self._producer is None:
            config: dict[str, Any] = dict(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5, retries=5)
            config.update(self.config)
            try:
                self._producer = KafkaProducer(**config)
            except KafkaError as exc:
                raise _unreachable(self.bootstrap, exc) from None
        return self._producer

    def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        producer = self._client()
        for attempt in range(self.retries + 1):
            try:
                future = producer.send(topic, value=value, key=key, partition=partition)
                break
            except KafkaTimeoutError:
                if attempt == self.retries:
                    raise ServiceError(
                        f"Kafka send buffer stayed full after {self.retries} flushes; is {self.bootstrap} up?"
                    ) from None
                producer.flush(timeout=10)
        future.add_errback(self._errors.append)
        self.sent += 1

    def send_many(self, topic: str, messages: Iterable[tuple[bytes | None, bytes]]) -> None:
        for key, value in messages:
            self.send(topic, value, key)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for every send; raise `ServiceError` if any delivery failed."""
        if self._producer is not None:
            try:
                self._producer.flush(timeout=timeout)
            except KafkaTimeoutError:
                raise ServiceError(
                    f"Kafka at {self.bootstrap} did not acknowledge the sent messages within {timeout:.0f} s; "
                    "check that the broker is up"
                ) from None
        if self._errors:
            errors, self._errors = self._errors, []
            raise ServiceError(f"{len(errors)} message(s) were not delivered to Kafka: {errors[0]!r}")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._producer is not None:
                self._producer.close(timeout=10)
                self._producer = None

    def __enter__(self) -> "Sender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def partition_for(key: bytes, n: int) -> int:
    """The partition kafka-python's default partitioner gives `key` among `n` partitions (murmur2)."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % n
