"""Transport faults against real servers: a Tansu restarted on the same port (it comes back empty), Kafka
security settings in every client, Redis with a password, an ACL user and TLS.

Over 400 lines on purpose: the restartable broker, the certificates and the TLS listener are shared
by the Kafka and Redis cases, so they stay in one file."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from stream_app.core.errors import ServiceError
from stream_app.core.events import encode, prepare
from stream_app.core.settings import Settings
from stream_app.dev import embedded
from stream_app.io.kafka import CLIENTS, Sender, Target, consumer, ensure_topics, group_consumer, wait_for_broker
from stream_app.io.kafka import target as kafka_target
from stream_app.io.redis import applied_total, connect
from stream_app.serving.cache import ModelCache
from stream_app.worker.config import WorkerConfig
from stream_app.worker.worker import Worker

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
        got = poll_until(after)
        # should it fail, the message says whether the group handed the partition out again after the restart
        assert after <= got, f"read {sorted(got)}; partitions assigned, in turn: {assigned}"
    finally:
        group.close()


# --------------------------------------------------------------------------- certificates


def make_certs(directory: Path) -> Path:
    """A CA, and a server and a client certificate for 127.0.0.1 signed by it (openssl); another CA too."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=directory)

    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for ca in ("ca", "other-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
            "-days", "2", "-subj", f"/CN=streamrec test {ca}")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", "san.cnf")
    return directory


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


# --------------------------------------------------------------------------- Redis: password, ACL user, TLS

SECRET = "r3dis-Pa55-never-shown"
ADMIN = "admin-Pa55"


def secured_redis(kind: str, directory: Path, certs: Path) -> tuple[embedded.ServerProcess, str]:
    """A real redis-server secured one way, and the STREAMREC_REDIS_URL a streamrec process uses for it."""
    port = embedded.free_port()
    if kind == "password":
        server = embedded.start_redis(port, directory, extra_args=("--requirepass", SECRET))
        return server, f"redis://:{SECRET}@127.0.0.1:{port}/0"
    if kind == "acl":  # the project's keys only: partitions' `{sr:<topic>:<n>}:...`, the monitor's `sr:monitor:...`
        server = embedded.start_redis(port, directory, extra_args=(
            "--requirepass", ADMIN, "--user", "streamrec", "on", f">{SECRET}", "~{sr:*", "~sr:*", "&sr:*", "+@all",
            "-@dangerous"))
        return server, f"redis://streamrec:{SECRET}@127.0.0.1:{port}/0"
    tls_port = embedded.free_port()
    server = embedded.start_redis(port, directory, extra_args=(
        "--requirepass", SECRET, "--tls-port", str(tls_port), "--tls-cert-file", str(certs / "server.pem"),
        "--tls-key-file", str(certs / "server.key"), "--tls-ca-cert-file", str(certs / "ca.pem"),
        "--tls-auth-clients", "yes"))
    query = f"ssl_ca_certs={certs / 'ca.pem'}&ssl_certfile={certs / 'client.pem'}&ssl_keyfile={certs / 'client.key'}"
    return server, f"rediss://:{SECRET}@127.0.0.1:{tls_port}/0?{query}"


@pytest.mark.parametrize("kind", ["password", "acl", "tls"])
def test_worker_and_api_cache_on_a_secured_redis(topics, tmp_path: Path, certs: Path, kind: str) -> None:
    server, url = secured_redis(kind, tmp_path / "redis", certs)
    try:
        settings = topics.with_(redis_url=url, key_prefix="sr")
        stream = [prepare({"user_id": f"u{j % 7}", "item_id": f"i{j % 11}", "event_type": "click", "ts": 1.7e9 + j})
                  for j in range(300)]
        with Sender(kafka_target(settings)) as sender:
            for e in stream:
                sender.send(settings.events_topic, encode(e), e.user_id.encode())
        worker = Worker(settings, WorkerConfig(models=("pop",)))
        worker.run(max_idle=3)
        client = connect(url)
        assert applied_total(client, "sr", settings.events_topic, range(settings.events_partitions)) == 300
        cache = ModelCache(settings, ("pop",), background=False)
        cache.ping()
        assert sum(view.version for view in cache.views()) > 0
        if kind == "acl":
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.set("not-streamrec", 1)  # outside the key prefix
        wrong = ModelCache(settings.with_(redis_url=url.replace(SECRET, "wrong")), ("pop",), background=False)
        with pytest.raises(ServiceError) as error:
            wrong.ping()
        assert "wrong" not in str(error.value) and SECRET not in str(error.value)
    finally:
        server.stop()


def test_a_tls_redis_with_a_certificate_from_another_ca_is_refused(tmp_path: Path, certs: Path) -> None:
    server, url = secured_redis("tls", tmp_path / "redis", certs)
    try:
        assert connect(url).ping()
        with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
            connect(url.replace(str(certs / "ca.pem"), str(certs / "other-ca.pem"))).ping()
    finally:
        server.stop()


def test_up_refuses_to_start_a_password_less_redis_for_a_url_with_credentials(services, tmp_path: Path) -> None:
    port = embedded.free_port()
    settings = services.with_(redis_url=f"redis://streamrec:{SECRET}@127.0.0.1:{port}/0", state_dir=tmp_path)
    with pytest.raises(ServiceError, match="carries credentials") as error:
        list(embedded.up(settings))  # the session's broker answers: up reuses it, then comes to Redis
    assert SECRET not in str(error.value) and "streamrec:***@" in str(error.value)
    assert embedded.redis_answers("127.0.0.1", port) is None and not (tmp_path / "redis.pid").exists()


# --------------------------------------------------------------------------- Kafka: security settings

KAFKA_SECRET = "k4fka-Pa55-never-shown"


def secure_settings(services, certs: Path, protocol: str = "SASL_SSL"):
    return services.with_(
        kafka_security_protocol=protocol, kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="streamrec",
        kafka_sasl_password=KAFKA_SECRET, kafka_ssl_cafile=certs / "ca.pem", kafka_ssl_certfile=certs / "client.pem",
        kafka_ssl_keyfile=certs / "client.key",
    )


def test_every_client_gets_the_security_settings(services, certs: Path) -> None:
    """The option names each library expects, accepted by the real client classes (which reject unknown ones)."""
    import confluent_kafka
    import faust
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    where = kafka_target(secure_settings(services, certs))
    assert where.kafka_python() == {
        "bootstrap_servers": services.kafka_bootstrap, "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "streamrec", "sasl_plain_password": KAFKA_SECRET,
        "ssl_cafile": str(certs / "ca.pem"), "ssl_certfile": str(certs / "client.pem"),
        "ssl_keyfile": str(certs / "client.key"),
    }
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(where.kafka_python()) <= set(client.DEFAULT_CONFIG), client
    assert where.confluent() == {
        "bootstrap.servers": services.kafka_bootstrap, "security.protocol": "SASL_SSL",
        "sasl.mechanisms": "SCRAM-SHA-512", "sasl.username": "streamrec", "sasl.password": KAFKA_SECRET,
        "ssl.ca.location": str(certs / "ca.pem"), "ssl.certificate.location": str(certs / "client.pem"),
        "ssl.key.location": str(certs / "client.key"),
    }
    confluent_kafka.Consumer({**where.confluent(), "group.id": "g"}).close()  # loads the certificates, no network
    app = faust.App("transport-test", **where.faust())
    credentials = app.conf.broker_credentials
    assert isinstance(credentials, faust.SASLCredentials) and credentials.ssl_context is not None
    assert (credentials.username, credentials.password, credentials.mechanism.value) == (
        "streamrec", KAFKA_SECRET, "SCRAM-SHA-512")
    assert str(credentials.protocol.value) == "SASL_SSL"
    tls_only = kafka_target(secure_settings(services, certs, "SSL"))
    assert "sasl_plain_password" not in tls_only.kafka_python() and "sasl.password" not in tls_only.confluent()
    assert isinstance(faust.App("transport-test-tls", **tls_only.faust()).conf.broker_credentials, faust.SSLCredentials)
    plain = kafka_target(services)
    assert plain.kafka_python() == {"bootstrap_servers": services.kafka_bootstrap, "security_protocol": "PLAINTEXT"}
    assert faust.App("transport-test-plain", **plain.faust()).conf.broker_credentials is None


def test_the_sasl_password_is_never_shown_and_reaches_child_processes(services, certs: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    settings = secure_settings(services, certs)
    where = kafka_target(settings)
    for text in (str(where), repr(where), repr(settings), str(settings.model_dump())):
        assert KAFKA_SECRET not in text
    assert "SASL_SSL, SCRAM-SHA-512 as streamrec" in str(where)
    env = settings.environ()  # what `streamrec worker --processes`, `serve` and the demo hand their children
    assert env["STREAMREC_KAFKA_SASL_PASSWORD"] == KAFKA_SECRET and "STREAMREC_KAFKA_SSL_PASSWORD" not in env
    for name, value in env.items():
        if name.startswith("STREAMREC_"):
            monkeypatch.setenv(name, value)
    assert kafka_target(Settings()) == where


def test_a_plaintext_round_trip_with_the_protocol_set(topics) -> None:
    where = kafka_target(topics.with_(kafka_security_protocol="PLAINTEXT"))
    with Sender(where) as sender:
        sender.send(topics.events_topic, b"plain", b"k")
    assert read_values(where, topics.events_topic, 1) == [b"plain"]


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Tansu that requires SASL (`--authentication`). Tansu 0.6 with memory storage cannot be given users
    (its `tansu user create` must authenticate first), so every login here is a wrong one."""
    server = embedded.start_tansu(embedded.free_port(), tmp_path_factory.mktemp("sasl"), extra_args=("--authentication",))
    try:
        yield server.address
    finally:
        server.stop()


def test_wrong_credentials_are_a_clear_error_from_every_client(sasl_broker: str) -> None:
    where = Target(sasl_broker, "SASL_PLAINTEXT", "SCRAM-SHA-512", "streamrec", SecretStr(KAFKA_SECRET))
    attempts = {
        "wait_for_broker": lambda: wait_for_broker(where, timeout=3),
        "ensure_topics": lambda: ensure_topics(where, {"t": 1}, timeout=3),
        "Sender": lambda: Sender(where, config={"bootstrap_timeout_ms": 3000}).send("t", b"x"),
        "consumer": lambda: consumer(where, "g", bootstrap_timeout_ms=3000),
        "confluent group": lambda: _poll_confluent(where),
    }
    for name, attempt in attempts.items():
        with pytest.raises(ServiceError) as error:
            attempt()
        message = str(error.value)
        assert f"Kafka at {sasl_broker} (SASL_PLAINTEXT, SCRAM-SHA-512 as streamrec)" in message, name
        assert "STREAMREC_KAFKA_SASL_" in message and KAFKA_SECRET not in message, name
    with pytest.raises(ServiceError, match=f"Kafka at {sasl_broker} is not reachable"):
        wait_for_broker(Target(sasl_broker), timeout=3)  # PLAINTEXT where the broker wants SASL


def _poll_confluent(where: Target) -> None:
    group = group_consumer("confluent", where, "g", "t", lambda partitions: dict.fromkeys(partitions),
                           lambda partitions: None)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            group.poll(10, 0.5)
    finally:
        group.close()


class TLSProxy:
    """A TLS listener (client certificate required) in front of a plain broker, as a TLS-terminating load
    balancer would be: Tansu 0.6 cannot serve TLS itself (its `--cert` and `--key` flags exclude each other)."""

    def __init__(self, upstream: int, certs: Path):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.pem"))
        context.load_cert_chain(certs / "server.pem", certs / "server.key")
        context.verify_mode = ssl.CERT_REQUIRED
        self.upstream, self.port = upstream, embedded.free_port()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        start = asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=context)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(1 << 16):
                    sink.write(data)
                    await sink.drain()
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def tls_broker(tmp_path: Path, certs: Path) -> Iterator[int]:
    """The port of a TLS listener whose broker advertises it (so clients come back through TLS)."""
    port = embedded.free_port()
    proxy = TLSProxy(port, certs)
    server = embedded.start_tansu(port, tmp_path, advertise=f"127.0.0.1:{proxy.port}")
    try:
        yield proxy.port
    finally:
        server.stop()
        proxy.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_round_trip_over_tls_with_a_client_certificate(tls_broker: int, certs: Path, client: str) -> None:
    where = Target(f"127.0.0.1:{tls_broker}", "SSL", ssl_cafile=str(certs / "ca.pem"),
                   ssl_certfile=str(certs / "client.pem"), ssl_keyfile=str(certs / "client.key"))
    ensure_topics(where, {"t": 1})
    with Sender(where) as sender:
        sender.send_many("t", [(b"k", b"tls-%d" % i) for i in range(3)])
    group = group_consumer(client, where, "g", "t", lambda partitions: dict.fromkeys(partitions), lambda p: None)
    seen: list[bytes] = []
    try:
        deadline = time.monotonic() + 60
        while len(seen) < 3 and time.monotonic() < deadline:
            for messages in group.poll(100, 0.5):
                seen += messages.values
    finally:
        group.close()
    assert seen == [b"tls-%d" % i for i in range(3)]
    for wrong in (replace(where, ssl_cafile=str(certs / "other-ca.pem")),  # the broker's certificate is not trusted
                  replace(where, ssl_certfile=None, ssl_keyfile=None)):  # no client certificate
        with pytest.raises(ServiceError, match=f"Kafka at 127.0.0.1:{tls_broker} \\(SSL\\) is not reachable"):
            wait_for_broker(wrong, timeout=3)
