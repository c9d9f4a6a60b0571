"""One exception base for streamrec; every message says what to do next."""

from __future__ import annotations


class StreamrecError(Exception):
    """Base of every error streamrec raises on purpose."""


class InvalidEvent(StreamrecError):
    """An event broke the schema; `field` and `rule` say which part and why."""

    def __init__(self, field: str, rule: str):
        self.field = field
        self.rule = rule
        super().__init__(f"{field} {rule}" if field else rule)


class ConfigError(StreamrecError):
    """A setting or flag has a value streamrec cannot use."""


class ServiceError(StreamrecError):
    """An external service (Kafka broker, Redis) is unreachable or misbehaving."""


class MessageRefused(ServiceError):
    """Kafka refused messages for what they are (too large for the topic, an invalid topic, not authorised):
    sending them again would fail alike, so they were dropped; the message says how many and why."""


class FencedError(StreamrecError):
    """This worker no longer owns a partition; another worker took it over."""


class InputFileError(StreamrecError):
    """An input file cannot be read in the requested format."""
