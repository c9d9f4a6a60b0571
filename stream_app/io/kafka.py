"""The one module that talks to Kafka client libraries.

Over 400 lines on purpose: both clients sit behind one small interface here, so that a faster
client plugs in as one more class in this file and nowhere else.

kafka-python is the default client. The worker's group consumer can also run
on confluent-kafka (librdkafka: fetching and parsing happen in C threads,
outside the GIL), chosen with `STREAMREC_KAFKA_CLIENT=confluent`. Both sit
behind `GroupConsumer`, so the worker never sees a client library.

Thin on purpose: nothing here touches the network until a method is called,
producers flush on close and retry a full buffer, and serialisation stays in
`stream_app.core.events`.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from stream_app.core.errors import ServiceError

__all__ = [
    "CLIENTS", "GroupConsumer", "KafkaError", "Messages", "Record", "Sender", "TopicPartition",
    "consumer", "delete_group", "ensure_topics", "group_consumer", "group_lag", "log_bounds", "partition_for", "wait_for_broker",
]

CLIENTS = ("kafka-python", "confluent")
SESSION_TIMEOUT_MS = 6000  # of group members: a member gone this long loses its partitions
# How long a rebalance waits for members to rejoin (kafka-python and librdkafka take it from the max poll
# interval). Bounded well below the clients' 300 s default: a member that leaves while a rebalance is under
# way holds the whole group up this long on the embedded broker (README: Failure modes, fleet restart).
REBALANCE_TIMEOUT_MS = 30_000


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
            remaining_ms = max(500, int((deadline - time.monotonic()) * 1000))
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000,
                                     bootstrap_timeout_ms=min(remaining_ms, 5000))
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
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000),
                                 bootstrap_timeout_ms=int(timeout * 1000))
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
        session_timeout_ms=SESSION_TIMEOUT_MS,
        max_poll_interval_ms=REBALANCE_TIMEOUT_MS,
        heartbeat_interval_ms=1000,
        max_poll_records=2000,
        fetch_max_wait_ms=100,
        # kafka-python fetches a partition again only once its last fetch is consumed: bigger fetches,
        # fewer stalls (+8% raw consume here, more for the worker, whose processing starves the IO thread).
        max_partition_fetch_bytes=4 << 20,
        client_id="streamrec",
    )
    config.update(overrides)
    try:
        return KafkaConsumer(**config)
    except KafkaError as exc:
        raise _unreachable(bootstrap, exc) from None


@dataclass(slots=True)
class Record:
    """One consumed message, whatever client read it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


def _as_record(msg: Any) -> Record:
    return Record(msg.topic, msg.partition, msg.offset, msg.key, msg.value)


class Messages:
    """Consecutive messages of one partition, in offset order, whatever client read them.

    `values` is the message payloads; a whole `Record` is made only on demand
    (`record(j)`, e.g. for a dead letter), as making one per message costs
    more than the rest of the consume path.
    """

    __slots__ = ("partition", "values", "_native", "_record")

    def __init__(self, partition: int, values: list[bytes], native: list, record: Callable[[Any], Record]):
        self.partition = partition
        self.values = values
        self._native = native  # the client's message objects, parallel to values
        self._record = record  # native message -> Record

    @classmethod
    def of(cls, records: list) -> Messages:
        """From objects with the attributes of `Record` (a `Record`, kafka-python's `ConsumerRecord`)."""
        return cls(records[0].partition, [r.value for r in records], records, _as_record)

    def __len__(self) -> int:
        return len(self.values)

    def record(self, j: int) -> Record:
        return self._record(self._native[j])

    @property
    def first_offset(self) -> int:
        return self.record(0).offset

    @property
    def next_offset(self) -> int:
        """The offset after the last message."""
        return self.record(len(self.values) - 1).offset + 1

    def since(self, offset: int) -> Messages:
        """The messages at `offset` or later."""
        j = bisect.bisect_left(range(len(self.values)), offset, key=lambda j: self.record(j).offset)
        return Messages(self.partition, self.values[j:], self._native[j:], self._record)


OnAssign = Callable[[list[int]], dict[int, "int | None"]]  # partitions -> where to start (None: beginning)
OnRevoke = Callable[[list[int]], None]


class GroupConsumer(Protocol):
    """A consumer-group member of one topic whose offsets are kept by the caller.

    `on_assign` is called with newly assigned partitions and returns the offset
    to start each from; `commit` stores offsets in Kafka only for lag tools.
    """

    def poll(self, max_records: int, timeout: float) -> list[Messages]: ...  # at most one per partition

    def seek(self, partition: int, offset: int | None) -> None: ...  # None: the beginning

    def pause(self, partitions: Iterable[int]) -> None: ...  # stop fetching them (those still assigned)

    def resume(self, partitions: Iterable[int]) -> None: ...

    def commit(self, offsets: dict[int, int]) -> None: ...

    def close(self) -> None: ...


class _KafkaPythonGroup:
    def __init__(self, bootstrap: str, group: str, topic: str, on_assign: OnAssign, on_revoke: OnRevoke,
                 max_records: int, max_wait_ms: int):
        self.topic = topic
        self._consumer = consumer(bootstrap, group, max_poll_records=max_records, fetch_max_wait_ms=max_wait_ms)
        outer = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                on_revoke(sorted(tp.partition for tp in revoked))

            def on_partitions_assigned(self, assigned):
                for partition, offset in on_assign(sorted(tp.partition for tp in assigned)).items():
                    outer.seek(partition, offset)

        self._consumer.subscribe([topic], listener=Listener())

    def seek(self, partition: int, offset: int | None) -> None:
        tp = TopicPartition(self.topic, partition)
        if offset is None:
            self._consumer.seek_to_beginning(tp)
        else:
            self._consumer.seek(tp, offset)

    def _assigned(self, partitions: Iterable[int]) -> list[TopicPartition]:
        assigned = self._consumer.assignment()
        return [tp for tp in (TopicPartition(self.topic, p) for p in partitions) if tp in assigned]

    def pause(self, partitions: Iterable[int]) -> None:
        self._consumer.pause(*self._assigned(partitions))

    def resume(self, partitions: Iterable[int]) -> None:
        self._consumer.resume(*self._assigned(partitions))

    def poll(self, max_records: int, timeout: float) -> list[Messages]:
        polled = self._consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        return [Messages.of(records) for records in polled.values() if records]

    def commit(self, offsets: dict[int, int]) -> None:
        if not offsets:
            return
        try:
            self._consumer.commit_async(
                {TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}
            )
        except KafkaError:  # RebalanceInProgressError, CommitFailedError, ...: the next batch commits again
            pass

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def _confluent_record(msg: Any) -> Record:
    return Record(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value())


class _ConfluentGroup:
    def __init__(self, bootstrap: str, group: str, topic: str, on_assign: OnAssign, on_revoke: OnRevoke,
                 max_records: int, max_wait_ms: int):
        import confluent_kafka as ck

        self._ck = ck
        self.topic = topic
        self._consumer = ck.Consumer({
            "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "session.timeout.ms": SESSION_TIMEOUT_MS,
            "max.poll.interval.ms": REBALANCE_TIMEOUT_MS, "heartbeat.interval.ms": 1000,
            "fetch.wait.max.ms": max_wait_ms, "client.id": "streamrec",
        })

        def assign(cons, partitions):
            starts = on_assign(sorted(tp.partition for tp in partitions))
            for tp in partitions:
                start = starts.get(tp.partition)
                tp.offset = ck.OFFSET_BEGINNING if start is None else start
            cons.assign(partitions)

        def revoke(cons, partitions):
            on_revoke(sorted(tp.partition for tp in partitions))
            cons.unassign()

        self._consumer.subscribe([topic], on_assign=assign, on_revoke=revoke, on_lost=revoke)

    def poll(self, max_records: int, timeout: float) -> list[Messages]:
        # What is queued now, without waiting for `max_records` (consume() with a timeout would wait
        # for all of them); only when nothing is queued, wait up to `timeout` for the first message.
        messages = self._consumer.consume(num_messages=max_records, timeout=0)
        if not messages:
            first = self._consumer.poll(timeout)
            if first is None:
                return []
            messages = [first, *self._consumer.consume(num_messages=max_records - 1, timeout=0)]
        failed = [m for m in messages if m.error() is not None]
        if failed:
            for msg in failed:
                error = msg.error()
                if error is not None and error.code() != self._ck.KafkaError._PARTITION_EOF:
                    raise ServiceError(f"Kafka consumer error: {error}")
            messages = [m for m in messages if m.error() is None]
        # Messages come in runs of one partition (one fetch each): split at the run ends, then join runs.
        partitions: list[int] = [m.partition() for m in messages]  # type: ignore[misc]  # set for consumed messages
        values = [m.value() for m in messages]
        column = np.array(partitions)
        ends = (np.flatnonzero(column[1:] != column[:-1]) + 1).tolist() + [len(messages)]
        runs: dict[int, tuple[list, list]] = {}  # partition -> its values, its messages
        start = 0
        for end in ends:
            run_values, run_messages = runs.setdefault(partitions[start], ([], []))
            run_values += values[start:end]
            run_messages += messages[start:end]
            start = end
        return [Messages(p, v, m, _confluent_record) for p, (v, m) in runs.items()]

    def seek(self, partition: int, offset: int | None) -> None:
        start = self._ck.OFFSET_BEGINNING if offset is None else offset
        self._consumer.seek(self._ck.TopicPartition(self.topic, partition, start))

    def _assigned(self, partitions: Iterable[int]) -> list:
        wanted = set(partitions)
        return [tp for tp in self._consumer.assignment() if tp.topic == self.topic and tp.partition in wanted]

    def pause(self, partitions: Iterable[int]) -> None:
        if tps := self._assigned(partitions):
            self._consumer.pause(tps)

    def resume(self, partitions: Iterable[int]) -> None:
        if tps := self._assigned(partitions):
            self._consumer.resume(tps)

    def commit(self, offsets: dict[int, int]) -> None:
        if not offsets:
            return
        tps = [self._ck.TopicPartition(self.topic, p, o) for p, o in offsets.items()]
        try:
            self._consumer.commit(offsets=tps, asynchronous=True)
        except self._ck.KafkaException:  # a rebalance in progress: the next batch commits again
            pass

    def close(self) -> None:
        self._consumer.close()


def group_consumer(client: str, bootstrap: str, group: str, topic: str, on_assign: OnAssign, on_revoke: OnRevoke,
                   max_records: int = 500, max_wait_ms: int = 100) -> GroupConsumer:
    """Join `group` on `topic` with the named client library (see `CLIENTS`)."""
    if client == "confluent":
        return _ConfluentGroup(bootstrap, group, topic, on_assign, on_revoke, max_records, max_wait_ms)
    return _KafkaPythonGroup(bootstrap, group, topic, on_assign, on_revoke, max_records, max_wait_ms)


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
                producer, self._producer = self._producer, None
                try:
                    producer.close(timeout=10)
                except KafkaError:  # the broker is gone; flush() has already said what was lost
                    pass

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log_bounds(bootstrap: str, topic: str, timeout: float = 5.0) -> dict[int, tuple[int, int]]:
    """The log's start and end offset of every partition of `topic` ({} for an unknown topic).

    End offsets come from ListOffsets, checked against the high watermark of one fetch at
    `end - 1`: Tansu answers ListOffsets(latest) with the *base offset of the last record batch*
    + 1 (10 records in one batch -> end offset 1), while its fetch responses carry the true high
    watermark. On Kafka both agree.
    """
    reader = consumer(bootstrap, None, max_poll_records=1, fetch_max_bytes=1 << 20)
    try:
        partitions = reader.partitions_for_topic(topic)
        if not partitions:
            return {}
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        ends = dict(reader.end_offsets(tps))
        starts = reader.beginning_offsets(tps)
        check = [tp for tp in tps if ends[tp] > starts[tp]]
        if check:
            reader.assign(check)
            for tp in check:
                reader.seek(tp, ends[tp] - 1)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(reader.highwater(tp) is None for tp in check):
                reader.poll(timeout_ms=200)
            for tp in check:
                high = reader.highwater(tp)
                if high is not None:
                    ends[tp] = max(ends[tp], high)
    except KafkaError as exc:
        raise _unreachable(bootstrap, exc) from None
    finally:
        reader.close()
    return {tp.partition: (starts[tp], ends[tp]) for tp in tps}


def group_lag(bootstrap: str, group: str, topic: str, timeout: float = 5.0) -> dict[int, int]:
    """Consumer-group lag of `group` on `topic`, per partition: end offset minus committed offset.

    Committed offsets come from KafkaAdminClient (OffsetFetch), the log's bounds from `log_bounds`.
    A partition the group has not committed yet counts from its beginning offset (all of it is
    lag). An unknown topic gives {}.
    """
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    except KafkaError as exc:
        raise _unreachable(bootstrap, exc) from None
    try:
        # kafka-python 3 renamed list_consumer_group_offsets(group) to list_group_offsets({group: None})
        listed = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    committed = {tp.partition: om.offset for tp, om in listed.items()
                 if tp.topic == topic and om.offset is not None and om.offset >= 0}
    return {p: max(0, end - committed.get(p, start)) for p, (start, end) in log_bounds(bootstrap, topic, timeout).items()}


def partition_for(key: bytes, n: int) -> int:
    """The partition kafka-python's default partitioner gives `key` among `n` partitions (murmur2)."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % n


def delete_group(bootstrap: str, group: str) -> str:
    """Ask the coordinator to delete consumer group `group`; returns its answer ("OK" or the error's name).
    Apache Kafka refuses while the group has members (NON_EMPTY_GROUP)."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    except KafkaError as exc:
        raise _unreachable(bootstrap, exc) from None
    try:
        answer = admin.delete_groups([group]).get(group)
    except KafkaError as exc:
        return type(exc).__name__
    finally:
        admin.close()
    return answer if isinstance(answer, str) else type(answer).__name__
