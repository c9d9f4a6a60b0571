"""The fault suite: workers under a Redis kill and restart, a broker that restarts without its log, and
a clean fleet restart, each against real servers, each ending with exact counts (README "Failure modes").

The tests that kill a server start their own (Redis with an append-only file, or Tansu) on free ports;
the shared ones from conftest.py never go down.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from stream_app.core.events import encode
from stream_app.core.settings import Settings
from stream_app.dev import embedded
from stream_app.io import kafka
from stream_app.io.redis import Keys, connect
from stream_app.worker.config import WorkerConfig
from stream_app.worker.worker import Worker
from tests.test_hostile import dead_letter_records, stored, valid
from tests.test_hostile import produce as produce_raw
from tests.test_worker import applied, events, produce, read_topic

pytestmark = pytest.mark.integration


def _worker(settings: Settings, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stream_app.cli", "worker", "--batch-size", "100", *extra],
        env=settings.environ(), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
    )


def _wait(condition, timeout: float, what: str, every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def _applied_or_none(settings: Settings) -> int | None:
    try:
        return applied(settings)
    except Exception:  # noqa: BLE001 - Redis is down: no figure yet
        return None


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_redis_killed_and_restarted_under_load_loses_nothing_and_applies_nothing_twice(topics, tmp_path):
    """kill -9 of an append-only redis-server while a worker learns: the worker stays up, says which Redis
    is unreachable, pauses, and when Redis is back on the same port resumes from what Redis kept."""
    port, data = embedded.free_port(), tmp_path / "redis"
    aof = ("--appendonly", "yes")
    server = embedded.start_redis(port, data, extra_args=aof)
    settings = topics.with_(redis_url=f"redis://127.0.0.1:{port}/0")
    first = produce(settings, events(20000, seed=11, users=500))
    log = tmp_path / "worker.log"
    worker = _worker(settings, log, "--max-idle", "8")
    try:
        _wait(lambda: (applied(settings) or 0) >= first // 5, 90, "the worker to apply a fifth of the events")
        server.process.kill()  # kill -9, mid-stream
        server.process.wait()
        assert (_applied_or_none(settings) is None), "Redis should be down"
        more = produce(settings, events(10000, seed=12, users=500))  # events keep coming while Redis is down
        time.sleep(4)
        assert worker.poll() is None, f"the worker died with Redis:\n{log.read_text()[-3000:]}"
        server = embedded.start_redis(port, data, extra_args=aof)  # the same data directory: its AOF comes back
        assert worker.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        _stop(worker)
        server.stop()
        server = embedded.start_redis(port, data, extra_args=aof)
    try:
        text = log.read_text()
        assert f"Redis at redis://127.0.0.1:{port}/0 is not reachable" in text
        assert "answer again" in text, "the worker never said it resumed"
        assert applied(settings) == first + more  # every event once: nothing lost, nothing applied twice
    finally:
        server.stop()


def test_broker_that_lost_its_log_is_an_offset_gap_stopped_by_default_and_resumed_by_policy(tmp_path, redis_client):
    """The embedded broker keeps nothing across a restart: the offsets stored in Redis are then past the
    log's end. By default the partition stops, loudly (log, alert); `--on-offset-gap earliest` learns the
    new log from its start, keeping the model, and marks the state as carried over."""
    kafka_port = embedded.free_port()
    broker = embedded.start_tansu(kafka_port, tmp_path / "tansu1")
    redis_url = redis_client.connection_pool.connection_kwargs
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{kafka_port}",
                        redis_url=f"redis://{redis_url['host']}:{redis_url['port']}/0", events_partitions=1,
                        events_topic="ev", consumer_group="g-gap", key_prefix="gap")
    topics = embedded.topic_partitions(settings)
    kafka.ensure_topics(kafka.target(settings), topics)
    before = produce(settings, events(3000, seed=21))
    log = tmp_path / "worker.log"
    worker = _worker(settings, log)
    try:
        _wait(lambda: applied(settings) == before, 90, "the first events to be applied")
        broker.stop()  # memory storage: its log is gone
        broker = embedded.start_tansu(kafka_port, tmp_path / "tansu2")
        kafka.ensure_topics(kafka.target(settings), topics)
        # Offsets 0..999 again, below the stored 3000; all to partition 0: the running worker's consumer may
        # have made the topic anew with the broker's default partition count before ensure_topics did.
        after = len(new := [encode(e) for e in events(1000, seed=22)])
        produce_raw(settings, new)
        _wait(lambda: "STOPPED" in log.read_text(), 120, "the worker to stop the partition at the gap")
        time.sleep(3)
        assert applied(settings) == before, "events of the new log were learned (or skipped) past a gap"
        assert worker.poll() is None, log.read_text()[-3000:]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()[-3000:]
        alerts = [a for a in read_topic(settings, settings.alerts_topic) if a.get("kind") == "offset_gap"]
        assert alerts and alerts[0]["stored_offset"] == before and alerts[0]["log_end"] <= after < before
        assert alerts[0]["policy"] == "stop"

        # A fresh group (offsets live in Redis, not in the group): Tansu may hand a group whose members all
        # left cleanly no partitions for minutes, and an idle member that never got one exits.
        resumed = _worker(settings.with_(consumer_group="g-gap-resumed"), tmp_path / "resumed.log",
                          "--on-offset-gap", "earliest", "--max-idle", "5")
        assert resumed.wait(timeout=120) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
        assert applied(settings) == before + after
        gaps = [orjson.loads(g) for g in connect(settings.redis_url).lrange(Keys("gap", "ev", 0).gaps, 0, -1)]
        assert [(g["policy"], g["resumed_at"]) for g in gaps] == [("earliest", 0)]
    finally:
        _stop(worker)
        broker.stop()


def test_clean_fleet_restart_after_20_s_gets_partitions_back_and_applies_every_event_once(topics, tmp_path):
    """All workers SIGTERMed together, restarted 20 s later: the group hands the partitions out again
    within the bounded rebalance timeout, and every event is applied once."""
    first = produce(topics, events(6000, seed=31, users=800))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    fleet = [_worker(topics, log) for log in logs]
    try:
        _wait(lambda: applied(topics) == first, 120, "the first fleet to apply the events")
        for proc in fleet:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=60) for proc in fleet] == [0, 0]
        time.sleep(20)
        more = produce(topics, events(4000, seed=32, users=800))
        started = time.monotonic()
        fleet = [_worker(topics, log) for log in logs]
        _wait(lambda: applied(topics) == first + more, 150, "the restarted fleet to apply the new events")
        took = time.monotonic() - started
    finally:
        _stop(*fleet)
    assert applied(topics) == first + more
    # The rebalance timeout (kafka.REBALANCE_TIMEOUT_MS) bounds the wait; the clients' default is 300 s.
    assert took < kafka.REBALANCE_TIMEOUT_MS / 1000 + 60, f"partitions came back after {took:.0f} s"


def _poison(now: float) -> list[bytes | None]:
    """One message of every kind of bad input the worker has met; each names an item `poison-*` if it
    could ever be learned."""
    def event(**fields) -> dict:
        return {"user_id": "mallory", "item_id": "poison-x", "event_type": "click", "ts": now, **fields}

    def raw(**fields) -> bytes:
        return orjson.dumps(event(**fields))

    return [
        None,  # a tombstone
        b"{not json",
        b"[1, 2, 3]",
        raw(ts="yesterday"),
        b'{"user_id": "mallory", "item_id": "poison-nan", "event_type": "click", "ts": NaN}',
        b'{"user_id": "mallory", "item_id": "poison-inf", "event_type": "click", "ts": 1, "value": 1e999}',
        raw(event_type="teleport", item_id="poison-type"),
        b"\xff\xfe\x00",
        raw(item_id="poison-big-context", context={"x": "a" * 70_000}),
        b'{"user_id": "mallory", "user_id": "alice", "item_id": "poison-dup", "event_type": "click", "ts": 1}',
        b'{"user_id": "a", "item_id": "poison-dupctx", "event_type": "click", "ts": 1, "context": {"d": 1, "d": 2}}',
        b'{"user_id": "\\ud800", "item_id": "poison-surrogate", "event_type": "click", "ts": 1}',
        raw(item_id="poison-ms", ts=now * 1000),
        raw(item_id="poison-1e300", ts=1e300),
        raw(item_id="poison-future", ts=now + 7200),
        raw(item_id="poison-missing", user_id=None),
        orjson.dumps({k: v for k, v in event(item_id="poison-noitem").items() if k != "item_id"}),
        raw(item_id="poison-unknown", colour="red"),
        raw(item_id="poison-empty", user_id=""),
        raw(item_id="poison-long", user_id="u" * 257),
        raw(item_id="poison-nested", context={"a": {"b": 1}}),
        raw(item_id="poison-keys", context={f"k{j}": j for j in range(33)}),
        bytes(range(256)) * 3600,  # 900 KB, not UTF-8
        b"x" * (5 << 20),  # 5 MB
    ]


@pytest.mark.parametrize("client", kafka.CLIENTS)
def test_poison_of_every_kind_is_dead_lettered_with_its_hash_and_nothing_of_it_is_learned(topics, client):
    topics = topics.with_(kafka_client=client)
    now = time.time()
    poison = _poison(now)
    good = valid(40, 0, now - 100) + valid(40, 100, now - 10, item="j")
    produce_raw(topics, good[:40] + poison + good[40:], max_request_size=6 << 20)
    Worker(topics, WorkerConfig(models=("pop",), metrics_interval=3600.0)).run(max_idle=5)
    applied, items, _ = stored(topics, "pop")
    assert applied == len(good)
    assert not [i for i in items if i.startswith("poison")]
    dead = [orjson.loads(r) for r in dead_letter_records(topics, len(poison))]
    assert len(dead) == len(poison)
    assert sorted(d["raw_sha256"] for d in dead) == sorted(hashlib.sha256(p or b"").hexdigest() for p in poison)
    assert all(d["reason"] and len(orjson.dumps(d)) < 512 * 1024 for d in dead)
