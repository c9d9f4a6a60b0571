"""The Python producer API: validated events to the events topic, keyed by user.

    with EventProducer(settings) as producer:          # or EventProducer("127.0.0.1:9092", "events")
        producer.send({"user_id": "u1", "item_id": "i9", "event_type": "click",
                       "context": {"device": "ios"}})
        producer.send_many(events)
    # leaving the block flushes; a failed delivery raises ServiceError there

* Every event is validated before anything is sent: a bad dict raises
  `InvalidEvent` naming the field and rule, and nothing of it reaches Kafka.
  `event_id` (a uuid) and `ts` (now) are filled when absent (`schema.prepare`);
  an `Event` without `event_id` gets one too.
* The message key is the UTF-8 `user_id`, so one user's events stay in one
  partition, in the order they were sent.
* Sends are asynchronous. Delivery failures are collected and raised as
  `ServiceError` by the next `flush()` or by `close()` (leaving the `with`
  block); an unreachable broker raises `ServiceError` at the first send.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from stream_app.core.errors import InvalidEvent
from stream_app.core.events import Event, encode, prepare
from stream_app.core.settings import Settings
from stream_app.io.kafka import Sender, Target, target

__all__ = ["EventProducer", "to_event"]


def to_event(event: Event | dict[str, Any]) -> Event:
    """A complete, valid event from an `Event` or a dict (ids and time filled); raises `InvalidEvent`."""
    if isinstance(event, Event):
        if event.event_id is None:
            return event.replace(event_id=uuid.uuid4().hex)
        return event
    return prepare(event)


def _at(index: int, exc: InvalidEvent) -> InvalidEvent:
    field = f"events[{index}]" + (f".{exc.field}" if exc.field else "")
    return InvalidEvent(field, exc.rule)


class EventProducer:
    """Sends events to one topic; a context manager that flushes and closes on exit.

    `where` is a `Settings` (its Kafka connection and, unless `topic` is given,
    its `events_topic`), a `kafka.Target`, or a bootstrap string of a plain
    broker (`topic` then defaults to "events").
    `config` passes extra kafka-python producer settings (e.g.
    `{"linger_ms": 20}`); `retries`: how often a send blocked by a full buffer
    or missing metadata is tried again (None: the Sender's default; 0 fails
    fast, as the HTTP API wants); `sender` replaces the Kafka sender (tests).
    """

    def __init__(
        self,
        where: Settings | Target | str,
        topic: str | None = None,
        *,
        config: dict[str, Any] | None = None,
        retries: int | None = None,
        sender: Any | None = None,
    ) -> None:
        if isinstance(where, Settings):
            self.target, default_topic = target(where), where.events_topic
        else:
            self.target = Target(where) if isinstance(where, str) else where
            default_topic = Settings.model_fields["events_topic"].default
        self.topic = topic or default_topic
        tries: dict[str, Any] = {} if retries is None else {"retries": retries}
        self._sender = sender if sender is not None else Sender(self.target, config=dict(config or {}), **tries)
        self.sent = 0

    def send(self, event: Event | dict[str, Any]) -> Event:
        """Validate, complete and send one event; returns the event as sent."""
        ev = to_event(event)
        raw = encode(ev)  # raises InvalidEvent when over the message size limit
        self._sender.send(self.topic, raw, ev.user_id.encode("utf-8"))
        self.sent += 1
        return ev

    def send_many(self, events: Iterable[Event | dict[str, Any]]) -> int:
        """Send events in order; returns how many were sent.

        A list or tuple is validated whole before the first send, so an
        invalid event sends nothing. Any other iterable is streamed: an invalid
        event raises when reached, after the events before it were queued
        (and will be delivered). The error names the index: `events[3].user_id ...`.
        """
        if isinstance(events, Sequence):
            ready: list[tuple[bytes, bytes]] = []
            for i, event in enumerate(events):
                try:
                    ev = to_event(event)
                    ready.append((ev.user_id.encode("utf-8"), encode(ev)))
                except InvalidEvent as exc:
                    raise _at(i, exc) from None
            for key, raw in ready:
                self._sender.send(self.topic, raw, key)
                self.sent += 1
            return len(ready)
        n = 0
        for i, event in enumerate(events):
            try:
                ev = to_event(event)
                raw = encode(ev)
            except InvalidEvent as exc:
                raise _at(i, exc) from None
            self._sender.send(self.topic, raw, ev.user_id.encode("utf-8"))
            self.sent += 1
            n += 1
        return n

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every event sent so far is delivered; raises `ServiceError` on failed deliveries."""
        self._sender.flush(timeout)

    def close(self) -> None:
        """Flush and close; raises `ServiceError` if a delivery failed."""
        self._sender.close()

    def abandon(self) -> int:
        """Close at once, dropping the events not known to be delivered (their senders were told they
        failed); returns how many."""
        return self._sender.abandon()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
