"""Shared fixtures: a REAL Tansu broker and a REAL redis-server, started once per test run.

Both run on free ports in a temporary directory (never the system Redis on
6379) and stop at the end of the session; they start only when a test asks
for one of the fixtures below, so pure unit tests pay nothing.

- `embedded_servers`: the `stream_app.dev.embedded.EmbeddedServers` handle.
- `services`: `Settings` pointing at them (default topic names; nothing created).
- `topics`: `Settings` with unique topic names, consumer group and Redis key
  prefix for this test, topics already created.
- `redis_client`: a `redis.Redis` on the test Redis, its DB flushed before and after.

Tests that use any of them are marked `integration` automatically.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from stream_app.core.settings import Settings
from stream_app.dev import embedded
from stream_app.io.kafka import ensure_topics, target

INTEGRATION_FIXTURES = {"embedded_servers", "services", "topics", "redis_client"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def embedded_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[embedded.EmbeddedServers]:
    with embedded.EmbeddedServers(tmp_path_factory.mktemp("servers")) as servers:
        yield servers


@pytest.fixture(scope="session")
def services(embedded_servers: embedded.EmbeddedServers) -> Settings:
    return embedded_servers.settings()


@pytest.fixture
def topics(embedded_servers: embedded.EmbeddedServers, tmp_path) -> Settings:
    tag = uuid.uuid4().hex[:12]
    settings = embedded_servers.settings(
        events_topic=f"events-{tag}",
        metrics_topic=f"metrics-{tag}",
        dlq_topic=f"events.dlq-{tag}",
        alerts_topic=f"alerts-{tag}",
        consumer_group=f"group-{tag}",
        key_prefix=f"sr-{tag}",
        state_dir=tmp_path / "state",
    )
    ensure_topics(target(settings), embedded.topic_partitions(settings))
    return settings


@pytest.fixture
def redis_client(embedded_servers: embedded.EmbeddedServers):
    import redis

    client = redis.Redis.from_url(embedded_servers.redis_url)
    client.flushdb()  # our own server on a free port, never the system Redis
    try:
        yield client
    finally:
        client.flushdb()
        client.close()
