"""Typed, frozen settings, read from STREAMREC_* environment variables and flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where the services are and what the topics are called.

    Every field can be set with an environment variable `STREAMREC_<FIELD>`,
    e.g. `STREAMREC_KAFKA_BOOTSTRAP=127.0.0.1:9092`; CLI flags override them.
    """

    model_config = SettingsConfigDict(env_prefix="STREAMREC_", frozen=True, extra="forbid")

    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_client: Literal["kafka-python", "confluent"] = "kafka-python"  # the worker's consumer library
    # how every Kafka client connects (`stream_app.io.kafka.target` turns these into client options)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None  # shown as ********** in reprs and logs
    kafka_ssl_cafile: Path | None = None  # CA bundle that signed the broker's certificate (default: the system's)
    kafka_ssl_certfile: Path | None = None  # client certificate (PEM), for brokers that require one
    kafka_ssl_keyfile: Path | None = None  # its private key (PEM)
    kafka_ssl_password: SecretStr | None = None  # the private key's password, if it has one
    redis_url: str = "redis://127.0.0.1:6379/0"
    events_topic: str = "events"
    metrics_topic: str = "metrics"
    dlq_topic: str = "events.dlq"
    alerts_topic: str = "alerts"
    events_partitions: int = Field(2, ge=1, le=1024)
    consumer_group: str = "streamrec-workers"
    state_dir: Path = Path(".streamrec")
    key_prefix: str = "sr"
    # the lookup API (`streamrec serve`; its worker processes read them from the environment)
    api_models: str = Field("pop", min_length=1)  # served models, comma-separated registry names
    api_refresh: float = Field(0.25, gt=0)  # seconds between version checks of each shard, and at least between its catch-ups
    api_redis_timeout: float = Field(1.0, gt=0)  # seconds, for every Redis call of the API
    api_ann_threshold: int = Field(50_000, ge=0)  # items per shard from which embedding models use hnswlib
    api_keys_file: str = ""  # JSON file of hashed API keys (`streamrec keys add`); "": <state_dir>/api-keys.json
    api_read_auth: bool = False  # reads need a key with the `read` scope too (writes always need `events:write`)
    api_cors_origins: str = ""  # comma-separated origins browsers may call the API from; "": no CORS headers
    api_max_body: int = Field(1 << 20, ge=1024)  # bytes of a POST /events body, counted while it streams in
    api_rate: float = Field(50.0, ge=0)  # POST /events requests a second per key and process (0: no limit)
    api_burst: int = Field(100, ge=1)  # POST /events requests a key may send at once before api_rate applies
    api_kafka_timeout: float = Field(2.0, gt=0)  # seconds POST /events waits for Kafka before answering 503
    api_kafka_cooldown: float = Field(5.0, ge=0)  # after a Kafka failure, POST /events answers 503 at once this long

    def environ(self) -> dict[str, str]:
        """This process's environment plus these settings as STREAMREC_* variables (for child processes):
        secrets in clear (the child needs them), unset optional fields removed."""
        env = dict(os.environ)
        for name, value in self.model_dump().items():
            key = f"STREAMREC_{name.upper()}"
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        return env

    def with_(self, **changes: object) -> Settings:
        """A copy with the given fields replaced (None values are ignored)."""
        data = self.model_dump()
        data.update({k: v for k, v in changes.items() if v is not None})
        return Settings(**data)


def redact(url: str) -> str:
    """`url` with its password shown as `***` (`redis://user:***@host:6379/0`): every URL that goes into a
    message or a log goes through here, so a secret never leaves the process."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
