"""A password in the Redis URL or the Kafka settings never reaches an answer, an error or a log: every path that
names the URL redacts it, and Kafka passwords stay SecretStr."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from stream_app.core.errors import ConfigError, ServiceError
from stream_app.core.settings import Settings, redact
from stream_app.dev import embedded
from stream_app.io import kafka
from stream_app.io.redis import unreachable
from stream_app.monitor.service import make_state
from stream_app.serving.api import create_app

SECRET = "s3cret-Pa55"


@pytest.mark.parametrize(("url", "shown"), [
    (f"redis://streamrec:{SECRET}@127.0.0.1:6379/0", "redis://streamrec:***@127.0.0.1:6379/0"),
    (f"rediss://:{SECRET}@cache.internal:6380/2", "rediss://:***@cache.internal:6380/2"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://user@127.0.0.1:6379/0", "redis://user@127.0.0.1:6379/0"),
])
def test_redact_hides_the_password_only(url, shown):
    assert redact(url) == shown


def nowhere() -> str:
    """A Redis URL with a password, at a port where nothing listens."""
    return f"redis://streamrec:{SECRET}@127.0.0.1:{embedded.free_port('127.0.0.1')}/0"


def test_the_api_answers_503_without_the_password():
    settings = Settings(redis_url=nowhere(), api_models="pop", api_refresh=0.05, api_redis_timeout=0.3)
    with TestClient(create_app(settings)) as client:
        for path, params in (("/recommendations", {"user_id": "u1"}), ("/items/i1/similar", {}), ("/healthz", {})):
            answer = client.get(path, params=params)
            assert SECRET not in answer.text, path
        down = client.get("/recommendations", params={"user_id": "u1"})
        assert down.status_code == 503 and "streamrec:***@" in down.json()["error"]


def test_errors_and_logs_name_the_url_without_the_password(caplog):
    message = str(unreachable(nowhere(), ConnectionError("refused")))
    assert SECRET not in message and "***" in message
    with pytest.raises(ConfigError) as error:
        embedded.redis_address(f"rediss://streamrec:{SECRET}@cache.internal:6380/0")
    assert SECRET not in str(error.value) and "***" in str(error.value)
    with caplog.at_level(logging.WARNING):
        make_state(Settings(redis_url=nowhere()))
    assert "unavailable" in caplog.text and SECRET not in caplog.text


def test_kafka_errors_and_client_logs_never_show_the_sasl_password(caplog):
    """kafka-python's admin client logs its whole configuration at DEBUG; the SASL password is masked there too."""
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{embedded.free_port('127.0.0.1')}",
                        kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="streamrec",
                        kafka_sasl_password=SECRET)
    where = kafka.target(settings)
    with caplog.at_level(logging.DEBUG), pytest.raises(ServiceError) as error:
        kafka.wait_for_broker(where, timeout=1)
    assert "Starting KafkaAdminClient" in caplog.text  # the line that carried it
    assert SECRET not in caplog.text and SECRET not in str(error.value)
    assert "as streamrec" in str(error.value)
    assert SECRET not in repr(settings) and SECRET not in str(where) and SECRET not in repr(where)
