"""Shared items across partition shards (README "Scale-out"), against a real Redis and, for the worker
tests, a real Tansu broker (fixtures in conftest.py)."""

from __future__ import annotations

import random
import signal
import threading
import time

import numpy as np
import pytest

from models.features import Vocab
from stream_app.core.errors import FencedError
from stream_app.core.events import encode, prepare
from stream_app.io import kafka
from stream_app.io.redis import Keys, PartitionStore, SharedVocab, connect
from stream_app.serving.cache import ModelCache
from stream_app.serving.recommender import Recommender
from stream_app.worker.config import WorkerConfig
from stream_app.worker.shard import Shard
from stream_app.worker.worker import Worker
from tests.test_worker import _wait_applied, _worker_process, applied, produce

pytestmark = pytest.mark.integration

MODELS = ("pop", "mf", "sknn")
COUNTED = ("sknn", "count")  # a shared table whose rows are plain sums of event weights


def stream(n: int, seed: int, users: int, items: int, t0: float = 1.7e9):
    """Events whose users come in `users` ids and items in `items`; `ts` one second apart."""
    rng = random.Random(seed)
    for j in range(n):
        yield prepare({"user_id": f"u{rng.randrange(users)}", "item_id": f"i{rng.randrange(items)}",
                       "event_type": rng.choice(["click", "purchase"]), "ts": t0 + j,
                       "context": {"device": rng.choice(["ios", "android"])}})


def shard_of(settings, partition: int, partitions: int = 2) -> Shard:
    store = PartitionStore(connect(settings.redis_url), Keys(settings.key_prefix, settings.events_topic, partition))
    shard = Shard(store, WorkerConfig(models=MODELS, shared_items=True, batch_size=64), partitions=partitions)
    shard.resume()
    return shard


def learn(shard: Shard, events: list, first: int = 0) -> None:
    records = [kafka.Record("events", shard.store.keys.partition, first + j, None, encode(e)) for j, e in enumerate(events)]
    assert shard.process(kafka.Messages.of(records), lambda msg, reason: pytest.fail(reason)) == len(events)


def table(shard: Shard, model: str, name: str) -> np.ndarray:
    return np.asarray(shard.models[model].export_state()[name], np.float64)


def expected_counts(shard: Shard, events: list) -> np.ndarray:
    """Event weights summed per item row (the truth a "sum" count table must hold in every shard)."""
    weight = dict(shard.featurizer.event_weights)
    out = np.zeros(len(shard.featurizer.items))
    for e in events:
        out[shard.featurizer.items.index[e.item_id]] += weight[e.event_type]
    return out


def test_a_shared_vocabulary_gives_each_id_one_row_everywhere(redis_client, services):
    a, b = Vocab(), Vocab()
    a.resolve = SharedVocab(redis_client, services.key_prefix, "t-vocab", "item")
    b.resolve = SharedVocab(redis_client, services.key_prefix, "t-vocab", "item")
    rows_a = a.add_many(["x", "y", None, "x"], np.zeros(4))
    rows_b = b.add_many(["z", "y", "x"], np.zeros(3))
    assert rows_a.tolist() == [0, 1, -1, 0]
    assert rows_b.tolist() == [2, 1, 0]
    assert a.add("z") == 2 and b.index == {"z": 2, "y": 1, "x": 0}


def test_shards_fold_each_others_item_changes_into_equal_replicas(topics):
    first = list(stream(600, seed=1, users=30, items=40))
    second = list(stream(600, seed=2, users=30, items=60, t0=1.7e9 + 5e6))
    s0, s1 = shard_of(topics, 0), shard_of(topics, 1)
    learn(s0, first)
    learn(s1, second)
    s0.commit(), s1.commit()
    assert s0.fold() == 1 and s1.fold() == 1  # each folds the other's one commit
    s0.commit(), s1.commit()
    assert s0.fold() == 0 and s1.fold() == 0  # a shard's fold-only commit publishes nothing
    # one vocabulary: every item has one row in both shards
    assert s0.featurizer.items.index == s1.featurizer.items.index
    # plain sums: exactly the counts of all events, in both replicas
    truth = expected_counts(s0, first + second)
    for s in (s0, s1):
        np.testing.assert_allclose(table(s, *COUNTED)[:, 0], truth)
    # learned embeddings: both replicas hold the same rows (initial rows plus every shard's steps)
    np.testing.assert_allclose(table(s0, "mf", "item"), table(s1, "mf", "item"), atol=1e-5)
    # decayed counts, kept at each shard's own scale: the same shares
    c0, c1 = table(s0, "pop", "count")[:, 0], table(s1, "pop", "count")[:, 0]
    np.testing.assert_allclose(c0 / c0.sum(), c1 / c1.sum(), atol=1e-9)
    # an item only the second shard's users touched is in the first one's catalogue and is scored there
    only_second = sorted({e.item_id for e in second} - {e.item_id for e in first})
    assert only_second
    row = s0.featurizer.items.index[only_second[0]]
    assert s0.evaluator._known[row]


def test_a_restarted_shard_neither_loses_nor_repeats_folded_changes(topics):
    events = list(stream(400, seed=3, users=20, items=30))
    s0, s1 = shard_of(topics, 0), shard_of(topics, 1)
    learn(s0, events[:200])
    s0.commit()
    assert s1.fold() == 1  # folded, not committed: lost with the process
    s1 = shard_of(topics, 1)  # a restart: the committed state and cursors
    assert s1.fold() == 1
    s1.commit()
    s1 = shard_of(topics, 1)
    assert s1.fold() == 0
    learn(s0, events[200:], first=200)
    s0.commit()
    assert s1.fold() == 1
    np.testing.assert_allclose(table(s1, *COUNTED)[:, 0], expected_counts(s1, events))


def test_a_fenced_zombie_publishes_no_item_changes(topics):
    events = list(stream(200, seed=7, users=20, items=30))
    zombie = shard_of(topics, 0)
    owner = shard_of(topics, 0)  # claims the partition: the first shard is fenced from now on
    learn(zombie, events)
    with pytest.raises(FencedError):
        zombie.commit()
    assert zombie.store.client.llen(zombie.store.keys.item_log) == 0
    learn(owner, events)
    owner.commit()
    other = shard_of(topics, 1)
    assert other.fold() == 1
    np.testing.assert_allclose(table(other, *COUNTED)[:, 0], expected_counts(other, events))


def test_the_item_log_is_trimmed_once_every_partition_folded_it(topics, monkeypatch):
    monkeypatch.setattr("stream_app.worker.items.TRIM_EVERY", 1)
    events = list(stream(310, seed=4, users=20, items=30))
    s0, s1 = shard_of(topics, 0), shard_of(topics, 1)
    client = s0.store.client
    for j in range(3):
        learn(s0, events[100 * j : 100 * (j + 1)], first=100 * j)
        s0.commit()
    assert client.llen(s0.store.keys.item_log) == 3
    assert s1.fold() == 3
    s1.commit()
    learn(s0, events[300:], first=300)  # the next commit of partition 0 trims what partition 1 has committed
    s0.commit()
    assert client.llen(s0.store.keys.item_log) == 1 and int(client.get(s0.store.keys.item_log_base)) == 3
    assert s1.fold() == 1


@pytest.mark.parametrize("client", kafka.CLIENTS[:1])
def test_kill_9_with_shared_items_applies_every_item_change_once(topics, tmp_path, client):
    """Two workers over the topic's partitions, one killed mid-stream and restarted: every partition's
    replica of a count table, as committed plus the log entries it has not folded in yet, holds the counts
    of all events: no change lost, none applied twice."""
    topics = topics.with_(kafka_client=client)
    events = list(stream(24000, seed=5, users=500, items=300))  # the kill at a tenth leaves seconds of learning
    n = produce(topics, events)
    args = ("--models", ",".join(MODELS), "--shared-items")
    stable = _worker_process(topics, tmp_path / "stable.log", *args, "--max-idle", "8")
    victim = _worker_process(topics, tmp_path / "victim.log", *args)
    try:
        assert _wait_applied(topics, n // 10, 90) >= n // 10
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert applied(topics) < n, "the stream was learned before the kill; the test proved nothing"
        victim = _worker_process(topics, tmp_path / "victim2.log", *args, "--max-idle", "8")
        assert stable.wait(timeout=240) == 0, (tmp_path / "stable.log").read_text()[-2000:]
        assert victim.wait(timeout=240) == 0, (tmp_path / "victim2.log").read_text()[-2000:]
    finally:
        stable.kill()
        victim.kill()
    assert applied(topics) == n
    for p in range(topics.events_partitions):
        shard = shard_of(topics, p, topics.events_partitions)  # as committed ...
        shard.fold()  # ... plus what the others committed after its last fold
        np.testing.assert_allclose(table(shard, *COUNTED)[:, 0], expected_counts(shard, events),
                                   err_msg=f"partition {p}")


def test_an_item_first_seen_in_one_partition_is_recommended_in_every_other_within_a_second(topics):
    n = topics.events_partitions
    warm = list(stream(400, seed=6, users=40, items=20, t0=time.time() - 1000))
    produce(topics, warm)
    worker = Worker(topics, WorkerConfig(models=("pop",), shared_items=True, fold_interval_ms=100, max_wait_ms=50))
    thread = threading.Thread(target=worker.run, kwargs={"max_idle": 5}, daemon=True)
    thread.start()
    try:
        assert _wait_applied(topics, len(warm), 60) == len(warm)
        askers = {kafka.partition_for(e.user_id.encode(), n): e.user_id for e in warm}
        assert sorted(askers) == list(range(n))
        buyers = [u for u in (f"buyer{j}" for j in range(200)) if kafka.partition_for(u.encode(), n) == 0][:5]
        recommender = Recommender(ModelCache(topics, ("pop",), background=False, refresh_interval=0.02))
        fresh = [prepare({"user_id": b, "item_id": "brand-new", "event_type": "purchase"}) for b in buyers for _ in range(20)]
        produce(topics, fresh)
        sent, waiting = time.monotonic(), set(range(1, n))
        while waiting:
            for p in sorted(waiting):
                answer = recommender.for_user(askers[p], k=3, model="pop", context={}, include_seen=True)
                if "brand-new" in [i["item_id"] for i in answer["items"]]:
                    waiting.discard(p)
            assert time.monotonic() - sent < 1.0, f"partitions {sorted(waiting)} do not recommend the new item after 1 s"
            time.sleep(0.01)
    finally:
        worker.stop()
        thread.join(30)
