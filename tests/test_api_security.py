"""POST /events against hostile or broken surroundings (issue 15, rows 8, 10 and 11): API keys and
scopes, content type, CORS, body size, rate limit, event-id namespaces, a dead Kafka, readiness.

Real Tansu and Redis from conftest.py; each test starts its own app, keys made as an operator does
(`streamrec keys add`, here through the same KeyStore).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import psutil
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from stream_app.cli import app as cli
from stream_app.core.events import decode
from stream_app.core.settings import Settings
from stream_app.dev import embedded
from stream_app.io import kafka
from stream_app.serving.api import create_app
from stream_app.serving.keys import KeyStore, keys_file
from tests.live_api import live

EVENT = {"user_id": "u1", "item_id": "i1", "event_type": "click"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def produced(settings: Settings, want: int, timeout: float = 30.0) -> list:
    """The events on the topic, read until `want` are there."""
    reader = kafka.consumer(kafka.target(settings), None)
    try:
        parts = [kafka.TopicPartition(settings.events_topic, p) for p in range(settings.events_partitions)]
        reader.assign(parts)
        reader.seek_to_beginning(*parts)
        events: list = []
        deadline = time.monotonic() + timeout
        while len(events) < want and time.monotonic() < deadline:
            for records in reader.poll(timeout_ms=500).values():
                events += [decode(r.value) for r in records]
        return events
    finally:
        reader.close()


def test_keys_command_prints_the_key_once_and_stores_only_its_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(cli, ["keys", "add", "shop", "--scope", "events:write"])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[-1]
    stored = (tmp_path / "api-keys.json").read_text()
    assert key.startswith("sr_") and len(key) > 40 and key not in stored
    assert (tmp_path / "api-keys.json").stat().st_mode & 0o077 == 0  # the owner's only
    found = KeyStore(tmp_path / "api-keys.json").find(key)
    assert found is not None and found.name == "shop" and found.scopes == {"events:write"}
    assert CliRunner().invoke(cli, ["keys", "add", "shop"]).exit_code == 2  # names are unique
    assert "shop\tevents:write" in CliRunner().invoke(cli, ["keys", "list"]).stdout
    assert CliRunner().invoke(cli, ["keys", "remove", "shop"]).exit_code == 0
    assert KeyStore(tmp_path / "api-keys.json").find(key) is None


def test_writes_need_a_key_with_the_events_write_scope(topics):
    with TestClient(create_app(topics)) as client:
        none_yet = client.post("/events", json=EVENT)
        assert none_yet.status_code == 401 and "streamrec keys add" in none_yet.json()["error"], none_yet.text
        store = KeyStore(keys_file(topics))
        writer, reader = store.add("writer", ["events:write"]), store.add("reader", ["read"])
        time.sleep(1.1)  # the API re-reads the keys file at most once a second
        anonymous = client.post("/events", json=EVENT)
        assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"] == "Bearer"
        assert client.post("/events", json=EVENT, headers=bearer(writer + "x")).status_code == 401
        assert client.post("/events", json=EVENT, headers={"Authorization": writer}).status_code == 401
        wrong_scope = client.post("/events", json=EVENT, headers=bearer(reader))
        assert wrong_scope.status_code == 403 and "events:write" in wrong_scope.json()["error"]
        ok = client.post("/events", json=EVENT, headers=bearer(writer))
        assert ok.status_code == 202, ok.text
        assert client.get("/recommendations", params={"user_id": "u1"}).status_code == 200  # reads stay open
    assert [e.user_id for e in produced(topics, 1)] == ["u1"]  # only the authenticated post got through


def test_reads_need_the_read_scope_when_configured(topics):
    store = KeyStore(keys_file(topics))
    reader, writer = store.add("reader", ["read"]), store.add("writer", ["events:write"])
    with TestClient(create_app(topics.with_(api_read_auth=True))) as client:
        assert client.get("/recommendations", params={"user_id": "u1"}).status_code == 401
        assert client.get("/items/i1/similar", headers=bearer(writer)).status_code == 403
        assert client.get("/recommendations", params={"user_id": "u1"}, headers=bearer(reader)).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_a_cross_site_text_plain_post_is_refused_and_cors_is_off_by_default(topics):
    key = KeyStore(keys_file(topics)).add("writer", ["events:write"])
    site = {"Origin": "https://evil.example"}
    with TestClient(create_app(topics)) as client:
        form = client.post("/events", content=orjson.dumps(EVENT), headers={"Content-Type": "text/plain", **site})
        assert form.status_code == 401  # a browser form carries no key
        plain = client.post("/events", content=orjson.dumps(EVENT),
                            headers={"Content-Type": "text/plain", **site, **bearer(key)})
        assert plain.status_code == 415 and "application/json" in plain.json()["error"]
        preflight = client.options("/events", headers={**site, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers
        got = client.get("/recommendations", params={"user_id": "u1"}, headers=site)
        assert got.status_code == 200 and "access-control-allow-origin" not in got.headers
    allowed = topics.with_(api_cors_origins="https://shop.example")
    with TestClient(create_app(allowed)) as client:
        got = client.get("/recommendations", params={"user_id": "u1"}, headers={"Origin": "https://shop.example"})
        assert got.headers["access-control-allow-origin"] == "https://shop.example"
        other = client.get("/recommendations", params={"user_id": "u1"}, headers=site)
        assert "access-control-allow-origin" not in other.headers
    assert produced(topics, 1, timeout=3) == []


def test_each_key_is_rate_limited_with_retry_after(topics):
    store = KeyStore(keys_file(topics))
    fast, other = store.add("fast", ["events:write"]), store.add("other", ["events:write"])
    with TestClient(create_app(topics.with_(api_rate=0.01, api_burst=2))) as client:
        answers = [client.post("/events", json=EVENT, headers=bearer(fast)) for _ in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 429], [a.text for a in answers]
        assert int(answers[2].headers["Retry-After"]) >= 1
        assert client.post("/events", json=EVENT, headers=bearer(other)).status_code == 202  # its own bucket


def test_client_event_ids_are_namespaced_by_key_so_writers_cannot_collide(topics):
    store = KeyStore(keys_file(topics))
    alice, mallory = store.add("alice", ["events:write"]), store.add("mallory", ["events:write"])
    with TestClient(create_app(topics)) as client:
        first = client.post("/events", json={**EVENT, "event_id": "order-1"}, headers=bearer(mallory))
        second = client.post("/events", json={**EVENT, "event_id": "order-1"}, headers=bearer(alice))
        generated = client.post("/events", json=EVENT, headers=bearer(alice))
        too_long = client.post("/events", json={**EVENT, "event_id": "x" * 250}, headers=bearer(alice))
    assert first.json()["event_ids"] == ["mallory:order-1"] and second.json()["event_ids"] == ["alice:order-1"]
    assert ":" not in generated.json()["event_ids"][0]  # the API's own ids are unique already
    assert too_long.status_code == 422 and too_long.json()["field"] == "event_id"
    ids = sorted(e.event_id for e in produced(topics, 3))
    assert ids == sorted(["mallory:order-1", "alice:order-1", generated.json()["event_ids"][0]])


def test_a_200_mb_body_is_refused_while_it_streams_in(topics, tmp_path):
    """The server process (a real `streamrec serve`) does not grow by the body: it stops reading at the limit."""
    key = KeyStore(keys_file(topics)).add("writer", ["events:write"])
    port = embedded.free_port("127.0.0.1")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "stream_app.cli", "serve", "--port", str(port), "--models", "pop"],
                            env=topics.environ(), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        server = psutil.Process(proc.pid)
        baseline, peak, done = server.memory_info().rss, [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], server.memory_info().rss)
                time.sleep(0.01)

        def body() -> Iterator[bytes]:
            yield b'[{"user_id": "u1", "item_id": "i1", "event_type": "click", "context": {"pad": "'
            chunk = b"x" * (1 << 20)
            for _ in range(200):
                yield chunk

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            answer = httpx.post(f"{base}/events", content=body(), timeout=120,
                                headers={"Content-Type": "application/json", **bearer(key)})
        finally:
            done.set()
            sampler.join(5)
        assert answer.status_code == 413 and "exceeds 1048576 bytes" in answer.json()["error"], answer.text
        grew = (peak[0] - baseline) / 1e6
        assert grew < 50, f"the server grew by {grew:.0f} MB while refusing a 200 MB body"
        declared = httpx.post(f"{base}/events", content=b" " * (2 << 20),  # with a Content-Length
                              headers={"Content-Type": "application/json", **bearer(key)})
        assert declared.status_code == 413 and "the body is 2097152 bytes" in declared.json()["error"]
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_kafka_down_gives_503_within_the_timeout_and_healthz_stays_fast(services, tmp_path):
    """40 posts in flight against a dead Kafka: each gets a 503 with Retry-After within the timeout
    (not 30 s), /healthz answers while they wait, and /readyz names Kafka."""
    dead = f"127.0.0.1:{embedded.free_port('127.0.0.1')}"
    settings = services.with_(kafka_bootstrap=dead, state_dir=tmp_path, api_kafka_timeout=3.0)
    key = KeyStore(keys_file(settings)).add("writer", ["events:write"])
    with live(settings) as base:
        def post(_: int) -> tuple[httpx.Response, float, float]:
            started = time.monotonic()
            answer = httpx.post(f"{base}/events", json=EVENT, headers=bearer(key), timeout=120)
            return answer, time.monotonic() - started, time.monotonic()

        with ThreadPoolExecutor(40) as pool:
            posts = [pool.submit(post, j) for j in range(40)]
            time.sleep(0.5)  # they are in flight now
            health = httpx.get(f"{base}/healthz", timeout=120)
            health_at = time.monotonic()
            results = [p.result() for p in posts]
        assert health.status_code == 200
        assert health_at < min(done for _, _, done in results), "/healthz waited behind the posts"
        for answer, took, _ in results:
            assert answer.status_code == 503 and int(answer.headers["Retry-After"]) >= 1, answer.text
            assert took < 15, f"a POST took {took:.1f} s against a dead Kafka (timeout 3 s)"
        ready = httpx.get(f"{base}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["kafka"] != "ok" and "kafka" in ready.json()["error"]


def test_readyz_is_503_while_redis_is_down_and_names_it_without_the_password(services, tmp_path):
    port = embedded.free_port("127.0.0.1")
    settings = services.with_(redis_url=f"redis://app:s3cret-pw@127.0.0.1:{port}/0", api_refresh=0.05,
                              api_redis_timeout=0.3, state_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 10
        while (ready := client.get("/readyz")).json().get("redis") == "ok":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ready.status_code == 503 and ready.headers["Retry-After"] == "1"
        body = ready.json()
        assert body["redis"].startswith("unreachable") and "s3cret-pw" not in ready.text and "app:***@" in ready.text
        assert body["kafka"] == "ok" and body["state"].startswith("loading")
        assert client.get("/healthz").status_code == 200


def test_a_broker_that_dies_under_a_running_api_gives_503_within_the_timeout(services, tmp_path):
    """The producer already knows the broker (metadata cached), then the broker is killed: the next
    POST waits at most about the timeout for its delivery and answers 503, not 30 s later; once a
    broker is back, posts succeed again (a fresh producer, no stale errors)."""
    port = embedded.free_port("127.0.0.1")
    broker = embedded.start_tansu(port, tmp_path)
    try:
        settings = services.with_(kafka_bootstrap=f"127.0.0.1:{port}", state_dir=tmp_path, api_kafka_timeout=2.0,
                                  api_kafka_cooldown=1.0, events_topic="events-dies", events_partitions=1)
        kafka.ensure_topics(kafka.target(settings), {settings.events_topic: 1})
        key = KeyStore(keys_file(settings)).add("writer", ["events:write"])
        with TestClient(create_app(settings)) as client:
            assert client.post("/events", json=EVENT, headers=bearer(key)).status_code == 202
            broker.stop()
            started = time.monotonic()
            down = client.post("/events", json=EVENT, headers=bearer(key))
            took = time.monotonic() - started
            assert down.status_code == 503 and "Retry-After" in down.headers, down.text
            assert took < 15, f"POST /events took {took:.1f} s with the broker gone (timeout 2 s)"
            again = client.post("/events", json=EVENT, headers=bearer(key))  # the breaker: no second wait
            assert again.status_code == 503 and "moments ago" in again.json()["error"]
            broker = embedded.start_tansu(port, tmp_path / "again")  # memory storage: the topic is made anew
            kafka.ensure_topics(kafka.target(settings), {settings.events_topic: 1})
            deadline = time.monotonic() + 60
            while (back := client.post("/events", json=EVENT, headers=bearer(key))).status_code != 202:
                assert back.status_code == 503 and time.monotonic() < deadline, back.text
                time.sleep(0.5)
        assert [e.user_id for e in produced(settings, 1)] == ["u1"]
    finally:
        broker.stop()
