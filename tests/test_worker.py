"""The stream worker against a real Tansu broker and a real Redis (fixtures in conftest.py)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import orjson
import pytest

from models.features import RawEvent
from stream_app.core.errors import FencedError
from stream_app.core.events import encode, prepare
from stream_app.io import kafka
from stream_app.io.redis import Changes, Keys, PartitionStore, applied_total, connect
from stream_app.worker.config import WorkerConfig
from stream_app.worker.shard import Shard
from stream_app.worker.worker import Worker

pytestmark = pytest.mark.integration


def events(n: int, seed: int = 0, users: int = 200, items: int = 100):
    rng = random.Random(seed)
    for j in range(n):
        yield prepare({
            "user_id": f"u{rng.randrange(users)}", "item_id": f"i{rng.randrange(items)}",
            "event_type": rng.choice(["click", "click", "favorite", "purchase"]), "ts": 1.7e9 + j,
            "context": {"device": rng.choice(["ios", "android"])},
        })


def produce(settings, raw_events) -> int:
    n = 0
    with kafka.Sender(kafka.target(settings)) as sender:
        for e in raw_events:
            if e is None or isinstance(e, bytes):  # None: a tombstone
                sender.send(settings.events_topic, e, key=b"poison")
            else:
                sender.send(settings.events_topic, encode(e), key=e.user_id.encode())
            n += 1
    return n


def read_topic(settings, topic: str, timeout: float = 5.0) -> list[dict]:
    consumer = kafka.consumer(kafka.target(settings), None)
    parts = consumer.partitions_for_topic(topic) or {0}
    consumer.assign([kafka.TopicPartition(topic, p) for p in parts])
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        for msgs in consumer.poll(timeout_ms=300).values():
            out.extend(orjson.loads(m.value) for m in msgs)
    consumer.close()
    return out


def applied(settings) -> int:
    client = connect(settings.redis_url)
    return applied_total(client, settings.key_prefix, settings.events_topic, range(settings.events_partitions))


@pytest.mark.parametrize("client", kafka.CLIENTS)
def test_every_event_applied_once_and_metrics_published(topics, client):
    topics = topics.with_(kafka_client=client)
    n = produce(topics, events(3000))
    worker = Worker(topics, WorkerConfig(models=("pop",), sample_rate=0.5, metrics_interval=0.5))
    worker.run(max_idle=4)
    assert applied(topics) == n == worker.applied
    records = read_topic(topics, topics.metrics_topic)
    pop = [r for r in records if r["model"] == "pop"]
    assert pop, "no metric record for pop"
    last = pop[-1]
    assert 0.0 <= last["recall"] <= 1.0 and 0.0 <= last["auc"] <= 1.0
    assert last["evaluated"] > 0 and last["batch"] == 256 and last["k"] == 20
    assert last["repeat"] > 0  # users here re-view items: those events are counted, not ranked
    assert set(last["by_event_type"]) <= {"click", "favorite", "purchase"}


@pytest.mark.parametrize("client", kafka.CLIENTS)
def test_poison_messages_go_to_dead_letters_and_valid_ones_behind_them_are_learned(topics, client):
    topics = topics.with_(kafka_client=client)
    poison = [None,
        b"{not json", b'{"user_id": "u", "item_id": "i", "event_type": "click", "ts": "yesterday"}',
        b'{"user_id": "u", "item_id": "i", "event_type": "click", "ts": NaN}',
        b'{"user_id": "u", "item_id": "i", "event_type": "teleport", "ts": 1}', b"\xff\xfe\x00",
        b'{"user_id": "u", "item_id": "i", "event_type": "click", "ts": 1, "context": {"x": "' + b"a" * 70000 + b'"}}',
    ]
    stream = list(events(200))
    mixed = stream[:50] + poison + stream[50:]
    produce(topics, mixed)
    Worker(topics, WorkerConfig(models=("pop",))).run(max_idle=4)
    assert applied(topics) == len(stream)
    dead = read_topic(topics, topics.dlq_topic)
    assert len(dead) == len(poison)
    reasons = " | ".join(d["reason"] for d in dead)
    for fragment in ("JSON", "ts must be a finite number", "event_type must be one of", "at most 65536 bytes", "tombstone"):
        assert fragment in reasons
    assert {d["topic"] for d in dead} == {topics.events_topic}
    assert all({"reason", "topic", "partition", "offset", "raw"} <= set(d) for d in dead)


def test_same_event_id_is_learned_once(topics):
    e = next(events(1))
    produce(topics, [e, e, e])
    Worker(topics, WorkerConfig(models=("pop",))).run(max_idle=3)
    produce(topics, [e])  # a retry after the worker restarted: the window is kept in Redis
    Worker(topics, WorkerConfig(models=("pop",))).run(max_idle=3)
    assert applied(topics) == 1


def committed_then_resumed(settings, model: str, records: list, step: int) -> tuple[Shard, Shard]:
    """A shard of partition 0 running `model` that learns `records` `step` at a time, committing after
    each, and a second shard resumed from Redis after the last commit (as after a kill -9)."""
    client = connect(settings.redis_url)
    keys = Keys(settings.key_prefix, settings.events_topic, 0)
    config = WorkerConfig(models=(model,), batch_size=16)
    live = Shard(PartitionStore(client, keys), config)
    live.resume()
    for start in range(0, len(records), step):
        live.process(kafka.Messages.of(records[start : start + step]), lambda msg, reason: pytest.fail(reason))
        live.commit()
    restarted = Shard(PartitionStore(client, keys), config)
    assert restarted.resume() == len(records)
    return live, restarted


def _worker_process(settings, log_path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stream_app.cli", "worker", "--batch-size", "100", *extra],
        env=settings.environ(), stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
    )


def _wait_applied(settings, target: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = applied(settings)
        if got >= target:
            return got
        time.sleep(0.05)
    return applied(settings)


@pytest.mark.parametrize("client", kafka.CLIENTS)
def test_kill_9_mid_stream_then_restart_applies_every_event_exactly_once(topics, tmp_path, client):
    topics = topics.with_(kafka_client=client)
    n = produce(topics, events(60000, seed=1))  # the kill at a tenth leaves seconds of learning, on any machine
    proc = _worker_process(topics, tmp_path / "w1.log")
    try:
        assert _wait_applied(topics, n // 10, 60) >= n // 10
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert applied(topics) < n, "the worker finished before it was killed; the test proved nothing"
    proc = _worker_process(topics, tmp_path / "w2.log", "--max-idle", "4")
    try:
        assert proc.wait(timeout=120) == 0, (tmp_path / "w2.log").read_text()[-2000:]
    finally:
        proc.kill()
    assert applied(topics) == n


@pytest.mark.parametrize("client", kafka.CLIENTS)
def test_two_workers_split_partitions_and_apply_every_event_once(topics, tmp_path, client):
    topics = topics.with_(kafka_client=client)
    n = produce(topics, events(20000, seed=2, users=1000))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_worker_process(topics, log, "--max-idle", "6") for log in logs]
    try:
        for p in procs:
            assert p.wait(timeout=180) == 0
    finally:
        for p in procs:
            p.kill()
    assert applied(topics) == n
    assigned = [[line for line in log.read_text().splitlines() if "assigned [" in line and "assigned []" not in line]
                for log in logs]
    assert all(assigned), f"a worker never got a partition: {assigned}"


def test_an_idle_worker_with_max_idle_stays_while_another_member_holds_a_lagging_partition(topics):
    """`--max-idle` ends a worker once the topic is drained, not merely its own partitions: a member that
    holds part of the topic without learning it keeps the worker, which takes its partitions over."""
    n = produce(topics, events(2000, seed=4, users=300))
    rival = kafka.group_consumer(topics.kafka_client, kafka.target(topics), topics.consumer_group, topics.events_topic,
                                 lambda parts: dict.fromkeys(parts), lambda parts: None, 10, 100)
    held, done = set(), threading.Event()

    def hold() -> None:  # polls, so that it stays a healthy member, and learns nothing
        while not done.is_set():
            held.update(m.partition for m in rival.poll(10, 0.1))
        rival.close()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    deadline = time.monotonic() + 30
    while not held and time.monotonic() < deadline:
        time.sleep(0.1)
    assert held, "the rival member never got a partition"
    worker = Worker(topics, WorkerConfig(max_wait_ms=50))
    runner = threading.Thread(target=worker.run, kwargs={"max_idle": 1}, daemon=True)
    runner.start()
    deadline = time.monotonic() + 30
    while worker.started_at is None and time.monotonic() < deadline:  # the group rebalances over both members
        time.sleep(0.1)
    time.sleep(6)  # idle far longer than max_idle, its own partitions drained
    lagging = applied(topics) < n
    assert runner.is_alive() or not lagging, "the worker left partitions with events to learn"
    done.set()  # the rival leaves: its partitions go to the worker
    runner.join(timeout=120)
    assert not runner.is_alive()
    assert applied(topics) == n


def _owners(log_path) -> set[str]:
    """Worker ids that the log shows assigned at least one partition."""
    return {line.split(" assigned ")[0].split()[-1] for line in log_path.read_text().splitlines()
            if " assigned [" in line and "assigned []" not in line}


def test_processes_option_runs_group_members_that_split_the_partitions(topics, tmp_path):
    """Both members hold partitions, and both learn: most events come once the group has split them
    (the first member to join could otherwise learn a small topic alone before the second is in)."""
    first = produce(topics, events(2000, seed=3, users=1000))
    log = tmp_path / "p.log"
    proc = _worker_process(topics, log, "--processes", "2", "--max-idle", "15")
    try:
        deadline = time.monotonic() + 60
        while len(_owners(log)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"the members did not split the partitions: {_owners(log)}\n{log.read_text()[-2000:]}"
            time.sleep(0.2)
        n = first + produce(topics, events(20000, seed=4, users=1000))
        assert proc.wait(timeout=180) == 0, log.read_text()[-2000:]
    finally:
        proc.kill()
    assert applied(topics) == n
    records = read_topic(topics, topics.metrics_topic)
    assert len({r["worker"] for r in records}) == 2


def test_dedup_window_is_trimmed_by_whole_commits_and_survives_a_reload(topics):
    client = connect(topics.redis_url)
    keys = Keys(topics.key_prefix, topics.events_topic, 0)
    store = PartitionStore(client, keys, dedup_window=10)
    store.claim()
    for c in range(6):  # commits of 4 ids: the window of 10 needs the last 3 of them
        store.commit(Changes(c + 1, 4, {}, {}, {}, [f"e{c}-{j}" for j in range(4)], {}, []))
    assert client.llen(keys.dedup) == 3
    again = PartitionStore(client, keys, dedup_window=10)
    again.claim()
    assert again.load({}).dedup == [f"e{c}-{j}" for c in (3, 4, 5) for j in range(4)]


def test_a_fenced_worker_cannot_commit(topics):
    client = connect(topics.redis_url)
    keys = Keys(topics.key_prefix, topics.events_topic, 0)
    old, new = PartitionStore(client, keys), PartitionStore(client, keys)
    old.claim()
    change = Changes(5, 5, {}, {}, {}, {}, {}, [])
    old.commit(change)
    new.claim()
    with pytest.raises(FencedError):
        old.commit(change)
    assert new.commit(Changes(9, 4, {}, {}, {}, {}, {}, [])) > 0
    assert int(client.get(keys.offset)) == 9 and int(client.get(keys.applied)) == 9


def test_learning_reaches_redis_only_at_commit_and_several_polls_commit_as_one(topics):
    client = connect(topics.redis_url)
    keys = Keys(topics.key_prefix, topics.events_topic, 0)
    shard = Shard(PartitionStore(client, keys), WorkerConfig(models=("pop",)))
    shard.resume()
    records = [kafka.Record(topics.events_topic, 0, j, None, encode(e)) for j, e in enumerate(events(300))]
    for start in (0, 100, 200):  # three polls
        assert shard.process(kafka.Messages.of(records[start : start + 100]), lambda msg, reason: pytest.fail(reason)) == 100
    assert client.get(keys.applied) is None and client.get(keys.offset) is None
    assert shard.commit() == 300 and shard.commit() == 0
    assert int(client.get(keys.applied)) == 300 and int(client.get(keys.offset)) == 300
    assert int(client.get(keys.version)) == 1
    assert client.hlen(keys.table("pop", "count")) == len(shard.featurizer.items)


def test_commits_wait_while_busy_but_not_past_the_interval_and_go_at_once_when_idle(topics):
    worker = Worker(topics, WorkerConfig(models=("pop",), commit_interval_ms=100, commit_share=0.1))
    worker.assign([0])
    shard = worker.shards[0]
    records = [kafka.Record(topics.events_topic, 0, j, None, encode(e)) for j, e in enumerate(events(40))]
    shard.process(kafka.Messages.of(records[:20]), lambda msg, reason: pytest.fail(reason))
    shard.commit_seconds = 0.002  # a cheap commit may go after 20 ms ...
    worker._commit_due(idle=False)
    assert shard.pending.events == 20, "committed at once while busy"
    shard.pending.since -= 0.03
    worker._commit_due(idle=False)
    assert shard.pending.events == 0 and worker.applied == 20
    shard.process(kafka.Messages.of(records[20:30]), lambda msg, reason: pytest.fail(reason))
    shard.commit_seconds = 1.0  # ... a costly one waits, but never past the interval
    shard.pending.since -= 0.05
    worker._commit_due(idle=False)
    assert shard.pending.events == 10
    shard.pending.since -= 0.06
    worker._commit_due(idle=False)
    assert worker.applied == 30
    shard.process(kafka.Messages.of(records[30:]), lambda msg, reason: pytest.fail(reason))
    worker._commit_due(idle=True)  # nothing more came: commit now
    assert worker.applied == 40 == int(connect(topics.redis_url).get(shard.store.keys.applied))
    worker.sender.close()


def test_idle_sessions_users_and_items_expire_in_memory_and_in_redis(topics):
    """A long stream of short-lived users keeps the vocabularies bounded, and Redis forgets the expired rows."""
    client = connect(topics.redis_url)
    keys = Keys(topics.key_prefix, topics.events_topic, 0)
    shard = Shard(PartitionStore(client, keys), WorkerConfig(models=("pop",), session_gap=600, idle_expiry=3600))
    shard.resume()
    offset, live = 0, []
    for hour in range(48):  # each hour: 20 new users and 20 new items, 5 events each
        batch = []
        for j in range(100):
            e = prepare({"user_id": f"u{hour}-{j % 20}", "item_id": f"i{hour}-{j % 20}", "event_type": "click",
                         "ts": 1.7e9 + hour * 3600 + j})
            batch.append(kafka.Record(topics.events_topic, 0, offset, None, encode(e)))
            offset += 1
        shard.process(kafka.Messages.of(batch), lambda msg, reason: pytest.fail(reason))
        shard.commit()
        f = shard.featurizer
        live.append((f.users.live(), f.items.live(), f.sessions.live(), len(f.users), len(f.items)))
    users_live, items_live, sessions_live, user_rows, item_rows = live[-1]
    assert users_live <= 40 and items_live <= 40 and sessions_live <= 40, live[-1]
    assert user_rows <= 60 and item_rows <= 60, "freed rows must be reused"
    assert client.hlen(keys.vocab("user")) == users_live and client.hlen(keys.vocab("item")) == items_live
    assert client.hlen(keys.history) <= users_live
    assert client.hlen(keys.table("pop", "count")) <= item_rows
    assert int(client.get(keys.applied)) == 4800


def test_gru_sessions_dropped_by_its_lru_come_back_from_redis(topics):
    """A GRU holding 2 sessions in memory learns 6 interleaved sessions exactly as one holding all of them."""
    from models.features import Featurizer
    from models.gru import GRU4Rec

    stream = [prepare({"user_id": f"u{j % 6}", "item_id": f"i{(j * 7 + j // 6) % 23}", "event_type": "click",
                       "session_id": f"s{j % 6}", "ts": 1.7e9 + j}) for j in range(240)]
    records = [kafka.Record(topics.events_topic, 0, j, None, encode(e)) for j, e in enumerate(stream)]
    client = connect(topics.redis_url)
    shard = Shard(PartitionStore(client, Keys(topics.key_prefix, topics.events_topic, 0)),
                  WorkerConfig(models=("gru",), batch_size=4, sample_rate=0.0))
    shard.models["gru"] = GRU4Rec(max_sessions=2, seed=0)
    shard.resume()
    unbounded, forgetful = GRU4Rec(seed=0), GRU4Rec(max_sessions=2, seed=0)
    featurizer = Featurizer()
    for start in range(0, len(records), 4):
        shard.process(kafka.Messages.of(records[start : start + 4]), lambda msg, reason: pytest.fail(reason))
        shard.commit()
        batch = featurizer.batch(stream[start : start + 4])
        for model in (unbounded, forgetful):
            model.learn(batch)
            model.drain_changes()  # as a commit does: only then may the LRU drop a session
    bounded = shard.models["gru"]
    sessions = bounded._sessions
    assert len(sessions._lru) <= 3 and sessions._evicted, "the LRU never dropped a session: the test proves nothing"
    def gap(model) -> float:  # largest weight difference to the unbounded model
        return max(float(np.abs(model.export_state()[t] - unbounded.export_state()[t]).max()) for t in ("weights", "item_emb"))

    # Float rounding alone (a few 1e-6 over the stream) against what lost states cost (about 1).
    assert gap(bounded) < 1e-4, "a session restored from Redis did not continue where it stopped"
    assert gap(forgetful) > 0.1, "forgetting sessions changed nothing: the stream cannot tell"


def test_polls_shrink_so_that_slow_learning_answers_the_group_in_time(topics):
    """A poll never holds more events than the worker learns in a quarter of the max poll interval:
    else a worker learning slowly (all models at batch 1) is dropped by its group mid-poll."""
    from stream_app.worker import worker as module

    worker = Worker(topics, WorkerConfig(models=("pop",), commit_max=8192))
    assert worker.poll_size() == module.FIRST_POLL  # speed not known yet
    record = kafka.Record(topic=topics.events_topic, partition=0, offset=0, key=None, value=b"{}")
    polled = [kafka.Messages.of([record] * 1000)]
    budget = module.POLL_SHARE * kafka.REBALANCE_TIMEOUT_MS / 1000
    worker._timed(polled, time.monotonic() - 4.0)  # 4 ms per event
    slow = worker.poll_size()
    assert slow < 8192 and slow * 0.004 <= budget * 1.01 and (slow + 1) * 0.004 > budget * 0.99
    for _ in range(30):
        worker._timed(polled, time.monotonic() - 0.01)  # 10 µs per event
    assert worker.poll_size() == 8192


def test_sknn_keeps_ended_sessions_as_neighbours_across_expiry_and_restart(topics):
    """Sessions whose rows the worker expired (idle past the session gap, stream time) still vote in
    sknn, and do so again after a restart from Redis."""
    records = []
    for j in range(40):  # session j: a then x, or b then y; an hour apart, so each has expired when the next starts
        for k, item in enumerate("ax" if j % 2 else "by"):
            e = prepare({"user_id": f"u{j}", "item_id": f"i{item}", "event_type": "click", "ts": 1.7e9 + 3600 * j + k,
                         "session_id": f"s{j}"})
            records.append(kafka.Record(topics.events_topic, 0, len(records), None, encode(e)))
    live, restarted = committed_then_resumed(topics, "sknn", records, 20)
    for shard in (live, restarted):
        f = shard.featurizer
        assert f.sessions.get("s0") < 0  # expired
        probe = RawEvent("probe", "ia", "click", 1.7e9 + 3600 * 41, "probe")
        scores = shard.models["sknn"].score(f.batch([probe, probe]), np.array([1]))[0]  # after a, in a new session
        x, y = f.items.get("ix"), f.items.get("iy")  # as popular as each other: only neighbours tell them apart
        assert scores[x] > 2 * scores[y]
        assert int((shard.models["sknn"].export_state()["items"][:, 0] > 0).sum()) >= 39
