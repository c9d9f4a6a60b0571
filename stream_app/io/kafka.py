"""The one module that talks to Kafka client libraries.

Over 400 lines on purpose: both clients sit behind one small interface here, with their connection
options (`Target`), so that a faster client plugs in as one more class in this file and nowhere else.

kafka-python is the default client. The worker's group consumer can also run
on confluent-kafka (librdkafka: fetching and parsing happen in C threads,
outside the GIL), chosen with `STREAMREC_KAFKA_CLIENT=confluent`. Both sit
behind `GroupConsumer`, so the worker never sees a client library.

Where Kafka is and how to connect (bootstrap, security protocol, SASL,
certificates) travels as one `Target`, built once from the settings by
`target(settings)`; its passwords never appear in a message or log.

Thin on purpose: nothing here touches the network until a method is called,
producers flush on close, retry a full buffer and rebuild a client a broker
restart broke, and serialisation stays in `stream_app.core.events`.
"""

from __future__ import annotations

import bisect
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import (
    AuthorizationError,
    InvalidTopicError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
)
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata
from pydantic import SecretStr

from stream_app.core.errors import MessageRefused, ServiceError
from stream_app.core.settings import Settings

__all__ = [
    "CLIENTS", "GroupConsumer", "KafkaError", "Messages", "Record", "Sender", "Target", "TopicPartition",
    "consumer", "delete_group", "ensure_topics", "group_consumer", "group_lag", "log_bounds", "partition_for", "target",
    "wait_for_broker",
]

CLIENTS = ("kafka-python", "confluent")
SESSION_TIMEOUT_MS = 6000  # of group members: a member gone this long loses its partitions
# How long a rebalance waits for members to rejoin (kafka-python and librdkafka take it from the max poll
# interval). Bounded well below the clients' 300 s default: a member that leaves while a rebalance is under
# way holds the whole group up this long on the embedded broker (README: Failure modes, fleet restart).
REBALANCE_TIMEOUT_MS = 30_000
log = logging.getLogger("streamrec.kafka")
_SECRET_OPTIONS = ("sasl_plain_password", "ssl_password")


class _HideSecrets(logging.Filter):
    """kafka-python's admin client logs its whole configuration at DEBUG: show its passwords as ***."""

    def filter(self, record: logging.LogRecord) -> bool:
        def masked(arg: object) -> object:
            return {k: "***" if k in _SECRET_OPTIONS and v else v for k, v in arg.items()} if isinstance(arg, dict) else arg

        if isinstance(record.args, tuple):
            record.args = tuple(masked(arg) for arg in record.args)
        elif isinstance(record.args, dict):  # logging unpacks a lone mapping argument
            record.args = masked(record.args)  # type: ignore[assignment]
        return True


logging.getLogger("kafka.admin.client").addFilter(_HideSecrets())


# Each connection setting's option name in kafka-python and in librdkafka (confluent-kafka).
_OPTION_NAMES = {
    "bootstrap": ("bootstrap_servers", "bootstrap.servers"),
    "security_protocol": ("security_protocol", "security.protocol"),
    "sasl_mechanism": ("sasl_mechanism", "sasl.mechanisms"),
    "sasl_username": ("sasl_plain_username", "sasl.username"),  # kafka-python uses them for SCRAM too
    "sasl_password": ("sasl_plain_password", "sasl.password"),
    "ssl_cafile": ("ssl_cafile", "ssl.ca.location"),
    "ssl_certfile": ("ssl_certfile", "ssl.certificate.location"),
    "ssl_keyfile": ("ssl_keyfile", "ssl.key.location"),
    "ssl_password": ("ssl_password", "ssl.key.password"),
}


@dataclass(frozen=True)
class Target:
    """Where Kafka is and how to connect to it: what every function here takes instead of a bare bootstrap.

    Built once from `Settings` by `target(settings)`; `Target("127.0.0.1:9092")` is a plain broker.
    The client option names of each library live here and nowhere else (`kafka_python`, `confluent`,
    `faust`). The SASL and key passwords stay `SecretStr`s: `str(target)` and every error name the
    broker, the protocol and the user, never a password.
    """

    bootstrap: str
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
    sasl_mechanism: str = "PLAIN"  # PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol.endswith("SSL")

    def __str__(self) -> str:
        if self.security_protocol == "PLAINTEXT":
            return self.bootstrap
        how = [self.security_protocol]
        if self.sasl:
            how.append(f"{self.sasl_mechanism} as {self.sasl_username or '(no user)'}")
        return f"{self.bootstrap} ({', '.join(how)})"

    def _options(self, library: int) -> dict[str, Any]:
        values: dict[str, Any] = {"bootstrap": self.bootstrap, "security_protocol": self.security_protocol}
        if self.sasl:
            values.update(sasl_mechanism=self.sasl_mechanism, sasl_username=self.sasl_username,
                          sasl_password=_reveal(self.sasl_password))
        if self.tls:
            values.update(ssl_cafile=self.ssl_cafile, ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
                          ssl_password=_reveal(self.ssl_password))
        return {_OPTION_NAMES[name][library]: value for name, value in values.items() if value is not None}

    def kafka_python(self) -> dict[str, Any]:
        """Connection options for kafka-python's producer, consumer and admin client."""
        return self._options(0)

    def confluent(self) -> dict[str, Any]:
        """Connection options for confluent-kafka (librdkafka names)."""
        return self._options(1)

    def faust(self) -> dict[str, Any]:
        """`broker` and `broker_credentials` for a `faust.App` (aiokafka underneath)."""
        import faust

        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.ssl_cafile)
            if self.ssl_certfile:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, _reveal(self.ssl_password))
        credentials: Any = None
        if self.sasl:
            credentials = faust.SASLCredentials(username=self.sasl_username, password=_reveal(self.sasl_password),
                                                mechanism=self.sasl_mechanism, ssl_context=context)
        elif context is not None:
            credentials = faust.SSLCredentials(context)
        return {"broker": ";".join(f"kafka://{b.strip()}" for b in self.bootstrap.split(",")),
                "broker_credentials": credentials}


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


def target(settings: Settings) -> Target:
    """The `Target` the settings describe (STREAMREC_KAFKA_*)."""
    def path(value: object) -> str | None:
        return None if value is None else str(value)

    return Target(
        settings.kafka_bootstrap, settings.kafka_security_protocol, settings.kafka_sasl_mechanism,
        settings.kafka_sasl_username, settings.kafka_sasl_password, path(settings.kafka_ssl_cafile),
        path(settings.kafka_ssl_certfile), path(settings.kafka_ssl_keyfile), settings.kafka_ssl_password,
    )


def _unreachable(where: Target, exc: Exception) -> ServiceError:
    hint = ("start one with `streamrec up` or point STREAMREC_KAFKA_BOOTSTRAP at a running broker"
            if where.security_protocol == "PLAINTEXT" else
            "check that the broker is up and that STREAMREC_KAFKA_SECURITY_PROTOCOL, the SASL user and password "
            "(STREAMREC_KAFKA_SASL_*) and the certificates (STREAMREC_KAFKA_SSL_*) match its listener")
    text = str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
    return ServiceError(f"Kafka at {where} is not reachable ({text}); {hint}")


def wait_for_broker(where: Target, timeout: float = 30.0) -> None:
    """Block until the broker answers metadata requests, or raise `ServiceError`."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            remaining_ms = max(500, int((deadline - time.monotonic()) * 1000))
            admin = KafkaAdminClient(**where.kafka_python(), request_timeout_ms=5000,
                                     bootstrap_timeout_ms=min(remaining_ms, 5000))
            admin.list_topics()
            admin.close()
            return
        except (KafkaError, OSError) as exc:
            last = exc
            time.sleep(0.3)
    raise _unreachable(where, last or TimeoutError("no answer"))


def ensure_topics(where: Target, partitions: dict[str, int], timeout: float = 30.0) -> None:
    """Create the topics that do not exist yet (name -> partition count)."""
    try:
        admin = KafkaAdminClient(**where.kafka_python(), request_timeout_ms=int(timeout * 1000),
                                 bootstrap_timeout_ms=int(timeout * 1000))
    except KafkaError as exc:
        raise _unreachable(where, exc) from None
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
                raise ServiceError(f"topics {sorted(partitions)} did not appear on {where} within {timeout}s")
            time.sleep(0.2)
    finally:
        admin.close()


def consumer(where: Target, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    """A consumer of raw bytes with auto-commit off; subscribe or assign it yourself."""
    config: dict[str, Any] = dict(
        where.kafka_python(),
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
        # Topics are made by `ensure_topics` with their partition counts, never by a consumer's metadata
        # request (a broker that restarted empty would otherwise recreate them with its default count).
        allow_auto_create_topics=False,
    )
    config.update(overrides)
    try:
        return KafkaConsumer(**config)
    except KafkaError as exc:
        raise _unreachable(where, exc) from None


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

    def __getitem__(self, part: slice) -> Messages:
        """Some of the messages (`messages[start:end]`), in order."""
        return Messages(self.partition, self.values[part], self._native[part], self._record)

    def since(self, offset: int) -> Messages:
        """The messages at `offset` or later."""
        return self[bisect.bisect_left(range(len(self.values)), offset, key=lambda j: self.record(j).offset) :]


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

    def ends(self, partitions: Iterable[int]) -> dict[int, int]: ...  # log end offsets its fetches saw (known ones)

    def commit(self, offsets: dict[int, int]) -> None: ...

    def close(self) -> None: ...


class _KafkaPythonGroup:
    def __init__(self, where: Target, group: str, topic: str, on_assign: OnAssign, on_revoke: OnRevoke,
                 max_records: int, max_wait_ms: int):
        self.topic = topic
        self._consumer = consumer(where, group, max_poll_records=max_records, fetch_max_wait_ms=max_wait_ms)
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
        tps = self._assigned(partitions)
        self._consumer.resume(*tps)
        # kafka-python 3.0 parks the parsed records a partition had fetched when it was paused, and gives them
        # back only while no other records are in line (`_next_partition_records is None`), which after the
        # first poll is never the case; while they are parked it never fetches the partition again. Drop
        # them: the partition is fetched again from its position (they were not returned, so it did not move).
        parked = self._consumer._fetcher._paused_partition_records
        for tp in tps:
            if (records := parked.pop(tp, None)) is not None:
                records.drain()

    def ends(self, partitions: Iterable[int]) -> dict[int, int]:
        highs = {tp.partition: self._consumer.highwater(tp) for tp in self._assigned(partitions)}
        return {p: high for p, high in highs.items() if high is not None}

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
    def __init__(self, where: Target, group: str, topic: str, on_assign: OnAssign, on_revoke: OnRevoke,
                 max_records: int, max_wait_ms: int):
        import confluent_kafka as ck

        self._ck = ck
        self.topic = topic
        self._where = where
        self._refused: list[Any] = []  # authentication or TLS errors: a wrong setting, not a passing outage

        def on_error(error) -> None:  # librdkafka reports connection errors here, not on messages
            if error.code() in (ck.KafkaError._AUTHENTICATION, ck.KafkaError._SSL) or error.fatal():
                self._refused.append(error)

        self._consumer = ck.Consumer({
            **where.confluent(), "group.id": group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "session.timeout.ms": SESSION_TIMEOUT_MS,
            "max.poll.interval.ms": REBALANCE_TIMEOUT_MS, "heartbeat.interval.ms": 1000,
            "fetch.wait.max.ms": max_wait_ms, "client.id": "streamrec", "error_cb": on_error,
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
            if self._refused:
                raise _unreachable(self._where, self._ck.KafkaException(self._refused[0]))
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

    def ends(self, partitions: Iterable[int]) -> dict[int, int]:
        out = {}
        for tp in self._assigned(partitions):
            marks = self._consumer.get_watermark_offsets(tp, cached=True)  # the high one: from the last fetch
            if marks is not None and marks[1] >= 0:
                out[tp.partition] = marks[1]
        return out

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


def group_consumer(client: str, where: Target, group: str, topic: str, on_assign: OnAssign, on_revoke: OnRevoke,
                   max_records: int = 500, max_wait_ms: int = 100) -> GroupConsumer:
    """Join `group` on `topic` with the named client library (see `CLIENTS`)."""
    if client == "confluent":
        return _ConfluentGroup(where, group, topic, on_assign, on_revoke, max_records, max_wait_ms)
    return _KafkaPythonGroup(where, group, topic, on_assign, on_revoke, max_records, max_wait_ms)


_RECONNECT_TIMEOUT = 5.0  # seconds a fresh producer gets to connect; unreachable then, the caller hears it at once
# Deliveries the broker refuses for the message itself: a fresh client would fail the same way.
_MESSAGE_FAULTS = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidTopicError, AuthorizationError)


class _Sent(NamedTuple):
    """A message handed to the client, kept until the broker acknowledges it."""

    future: FutureRecordMetadata
    topic: str
    value: bytes
    key: bytes | None
    partition: int | None


@dataclass
class Sender:
    """Produces raw bytes; connects on first send, flushes on close, rebuilds a broken client.

    A full send buffer is retried (after a flush) up to `retries` times. Every message is kept until
    the broker acknowledges it. `flush()` waits for them; when deliveries failed it closes the client,
    builds a fresh one and sends the failed messages again, up to `retries` rounds. A broker that
    restarted (Tansu keeps nothing) leaves kafka-python's idempotent producer broken for good
    (`UnknownProducerIdError`, then a fatal InitProducerId error), so a fresh client is the only way
    on. What still fails is raised as `ServiceError` and kept: the next `flush()` sends it again, so
    nothing unacknowledged is dropped (a resent message may arrive twice: at-least-once). A message
    the broker refuses for itself (too large, bad topic, not authorised) is raised and dropped.
    """

    target: Target
    retries: int = 5
    config: dict[str, Any] = field(default_factory=dict)
    _producer: KafkaProducer | None = None
    _sent: list[_Sent] = field(default_factory=list)  # not known to be acknowledged yet
    _check_at: int = 10_000  # prune acknowledged messages from `_sent` when it grows past this
    sent: int = 0
    rebuilt: int = 0  # fresh clients built after failed deliveries
    _abandoned: bool = False  # by `abandon()`: every later send or flush fails

    def _client(self, connect_timeout: float | None = None) -> KafkaProducer:
        self._refuse_if_abandoned()
        if self._producer is None:
            config: dict[str, Any] = dict(self.target.kafka_python(), acks="all", linger_ms=5, retries=5)
            if connect_timeout is not None:  # kafka-python's producer connects in its constructor
                config["bootstrap_timeout_ms"] = max(500, int(connect_timeout * 1000))
            config.update(self.config)
            try:
                self._producer = KafkaProducer(**config)
            except KafkaError as exc:
                raise _unreachable(self.target, exc) from None
        return self._producer

    def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        self._sent.append(_Sent(self._put(topic, value, key, partition), topic, value, key, partition))
        self.sent += 1
        if len(self._sent) >= self._check_at:
            self._sent = [m for m in self._sent if not m.future.succeeded()]
            self._check_at = max(10_000, 2 * len(self._sent))

    def _put(self, topic: str, value: bytes, key: bytes | None, partition: int | None) -> FutureRecordMetadata:
        """Hand one message to the client; a full buffer is flushed and tried again."""
        producer = self._client()
        for _ in range(self.retries):
            try:
                return producer.send(topic, value=value, key=key, partition=partition)
            except KafkaTimeoutError:
                producer.flush(timeout=10)
        try:
            return producer.send(topic, value=value, key=key, partition=partition)
        except KafkaTimeoutError:
            raise ServiceError(
                f"Kafka send buffer stayed full after {self.retries} flushes; is {self.target} up?"
            ) from None

    def send_many(self, topic: str, messages: Iterable[tuple[bytes | None, bytes]]) -> None:
        for key, value in messages:
            self.send(topic, value, key)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every message sent so far is acknowledged, resending failed ones with a fresh
        client; raise `ServiceError` when that does not succeed within `retries` rounds or `timeout`."""
        deadline = time.monotonic() + timeout
        for round_ in range(self.retries + 1):
            producer = self._producer
            if producer is not None:
                try:
                    producer.flush(timeout=max(0.0, deadline - time.monotonic()))
                except KafkaTimeoutError:
                    raise ServiceError(
                        f"Kafka at {self.target} did not acknowledge {len(self._sent)} sent message(s) within "
                        f"{timeout:.0f} s; check that the broker is up (they are sent again by the next flush)"
                    ) from None
            failed = [m for m in self._sent if not m.future.succeeded()]
            self._sent = []
            if not failed:
                return
            refused = [m for m in failed if isinstance(m.future.exception, _MESSAGE_FAULTS)]
            self._sent = [m for m in failed if not isinstance(m.future.exception, _MESSAGE_FAULTS)]
            if refused:
                raise MessageRefused(f"{len(refused)} message(s) were refused by Kafka at {self.target} and dropped: "
                                     f"{refused[0].future.exception!r}")
            self._refuse_if_abandoned()
            error = failed[0].future.exception
            if round_ == self.retries or time.monotonic() >= deadline:
                raise ServiceError(
                    f"{len(failed)} message(s) were not delivered to Kafka at {self.target} after {self.retries} "
                    f"fresh clients: {error!r} (kept: the next flush sends them again)"
                )
            log.warning("Kafka at %s: %d message(s) not delivered (%r); resending them with a fresh client",
                        self.target, len(failed), error)
            self._discard()
            time.sleep(min(0.2 * 2**round_, 2.0, max(0.0, deadline - time.monotonic())))
            try:
                self._client(connect_timeout=min(deadline - time.monotonic(), _RECONNECT_TIMEOUT))
            except ServiceError as exc:
                raise ServiceError(f"{len(failed)} message(s) were not delivered ({error!r}) and a fresh client "
                                   f"failed: {exc} (kept: the next flush sends them again)") from None
            self.rebuilt += 1
            self._sent = [m._replace(future=self._put(m.topic, m.value, m.key, m.partition)) for m in failed]

    def _discard(self) -> None:
        """Close the client, dropping what it still holds (the caller keeps those messages)."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            _force_close(producer)

    def abandon(self) -> int:
        """Close the client at once and drop every message not known to be delivered, so none of them
        arrives later (their senders were told they failed and will send them again); returns how many.
        A send or flush racing with it, or coming after, raises `ServiceError`: nothing it dropped is
        reported delivered."""
        self._abandoned = True
        self._discard()
        return sum(not m.future.succeeded() for m in self._sent)

    def _refuse_if_abandoned(self) -> None:
        if self._abandoned:
            raise ServiceError(f"this Kafka producer for {self.target} was closed after a failed delivery and dropped "
                               "what it held; send again with a new one")

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


def _force_close(producer: KafkaProducer, timeout: float = 2.0) -> None:
    """Close `producer` without delivering what it holds. kafka-python's `close(timeout)` flushes first and
    raises when that times out, leaving its I/O thread running: a broker that comes back would still get
    the messages. Its sender's `force_close` fails them instead; then `close` finds nothing to wait for."""
    sender = producer._sender
    if sender is not None:
        sender.force_close()
        sender.join(timeout)
    try:
        producer.close(timeout=0)
    except KafkaError:  # the I/O thread did not stop in time: it stops at its next wake-up, sending nothing
        log.warning("Kafka producer thread still running %.0f s after a forced close", timeout)


def log_bounds(where: Target, topic: str, timeout: float = 5.0) -> dict[int, tuple[int, int]]:
    """The log's start and end offset of every partition of `topic` ({} for an unknown topic).

    End offsets come from ListOffsets, checked against the high watermark of one fetch at
    `end - 1`: Tansu answers ListOffsets(latest) with the *base offset of the last record batch*
    + 1 (10 records in one batch -> end offset 1), while its fetch responses carry the true high
    watermark. On Kafka both agree.
    """
    reader = consumer(where, None, max_poll_records=1, fetch_max_bytes=1 << 20)
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
        raise _unreachable(where, exc) from None
    finally:
        reader.close()
    return {tp.partition: (starts[tp], ends[tp]) for tp in tps}


def group_lag(where: Target, group: str, topic: str, timeout: float = 5.0) -> dict[int, int]:
    """Consumer-group lag of `group` on `topic`, per partition: end offset minus committed offset.

    Committed offsets come from KafkaAdminClient (OffsetFetch), the log's bounds from `log_bounds`.
    A partition the group has not committed yet counts from its beginning offset (all of it is
    lag). An unknown topic gives {}.
    """
    try:
        admin = KafkaAdminClient(**where.kafka_python(), request_timeout_ms=10_000)
    except KafkaError as exc:
        raise _unreachable(where, exc) from None
    try:
        # kafka-python 3 renamed list_consumer_group_offsets(group) to list_group_offsets({group: None})
        listed = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    committed = {tp.partition: om.offset for tp, om in listed.items()
                 if tp.topic == topic and om.offset is not None and om.offset >= 0}
    return {p: max(0, end - committed.get(p, start)) for p, (start, end) in log_bounds(where, topic, timeout).items()}


def partition_for(key: bytes, n: int) -> int:
    """The partition kafka-python's default partitioner gives `key` among `n` partitions (murmur2)."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % n


def delete_group(where: Target, group: str) -> str:
    """Ask the coordinator to delete consumer group `group`; returns its answer ("OK" or the error's name).
    Apache Kafka refuses while the group has members (NON_EMPTY_GROUP)."""
    try:
        admin = KafkaAdminClient(**where.kafka_python(), request_timeout_ms=10_000)
    except KafkaError as exc:
        raise _unreachable(where, exc) from None
    try:
        answer = admin.delete_groups([group]).get(group)
    except KafkaError as exc:
        return type(exc).__name__
    finally:
        admin.close()
    return answer if isinstance(answer, str) else type(answer).__name__
