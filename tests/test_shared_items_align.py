"""Stream-time alignment of shared items (README "Scale-out"): a poll learned across partitions in stream-time
order, and partitions too far ahead of the slowest one held, against a real Tansu and Redis (conftest.py)."""

from __future__ import annotations

import threading

import pytest

from stream_app.core.events import decode, encode, prepare
from stream_app.io import kafka
from stream_app.io.redis import connect, exchange_stream_times
from stream_app.worker import worker as worker_module
from stream_app.worker.config import WorkerConfig
from stream_app.worker.shard import Shard
from stream_app.worker.worker import Worker, stream_order
from tests.test_worker import applied

T0 = 1.6e9


def event(user: str, ts: float):
    return prepare({"user_id": user, "item_id": f"i{int(ts) % 7}", "event_type": "click", "ts": ts})


def messages(partition: int, values: list[bytes]) -> kafka.Messages:
    return kafka.Messages.of([kafka.Record("events", partition, j, None, v) for j, v in enumerate(values)])


def test_a_poll_is_learned_in_runs_across_partitions_in_stream_time_order():
    a = messages(0, [encode(event("a", t)) for t in (10, 11, 12, 13, 50, 51)])
    b = messages(1, [encode(event("b", t)) for t in (20, 21, 22, 23, 24)])
    bad = messages(2, [b"not an event", encode(event("c", 99))])
    runs = [(run.partition, run.first_offset, len(times)) for run, times in stream_order([a, b, bad], 2)]
    assert runs == [(2, 0, 2), (0, 0, 2), (0, 2, 2), (1, 0, 2), (1, 2, 2), (1, 4, 1), (0, 4, 2)]
    # with a slack, a run ends before a message more than the slack later than another partition's next one
    c = messages(1, [encode(event("c", t)) for t in (11.5, 20, 21)])
    runs = [(run.partition, run.first_offset, len(run)) for run, _ in stream_order([a, c], 10, slack=1)]
    assert runs == [(0, 0, 3), (1, 0, 1), (0, 3, 1), (1, 1, 2), (0, 4, 2)]


def produce_to(settings, partition: int, events: list) -> None:
    with kafka.Sender(kafka.target(settings)) as sender:
        for e in events:
            sender.send(settings.events_topic, encode(e), key=e.user_id.encode(), partition=partition)


def run_worker(settings, n: int, monkeypatch, slack: float = 100.0) -> tuple[list[tuple[int, list[float]]], list[int]]:
    """One worker with shared items over the topic until it committed `n` events; returns what its shards
    learned, in order (partition, event times), and the partitions it held, in order."""
    learned: list[tuple[int, list[float]]] = []
    held: list[int] = []
    process, hold = Shard.process, Worker._hold

    def spy_process(shard, msgs, dead_letter):
        learned.append((shard.store.keys.partition, [decode(v).ts for v in msgs.values]))
        return process(shard, msgs, dead_letter)

    def spy_hold(worker, partition, next_ts):
        held.append(partition)
        hold(worker, partition, next_ts)

    monkeypatch.setattr(Shard, "process", spy_process)
    monkeypatch.setattr(Worker, "_hold", spy_hold)
    worker = Worker(settings, WorkerConfig(models=("pop",), shared_items=True, align_slack=slack, batch_size=16))
    thread = threading.Thread(target=worker.run, kwargs={"stop_after": n}, daemon=True)
    thread.start()
    thread.join(120)
    if thread.is_alive():
        worker.stop()
        thread.join(30)
        pytest.fail(f"the worker did not learn all {n} events: learned {sum(len(t) for _, t in learned)}, "
                    f"held {held}, now holding {sorted(worker.held)}")
    assert applied(settings) == n
    return learned, held


@pytest.mark.parametrize("client", kafka.CLIENTS)
def test_a_partition_far_ahead_in_stream_time_waits_for_the_slowest(topics, monkeypatch, client):
    """A backlog whose partition 1 is 10^6 s ahead of partition 0: partition 1 learns one event (its stream time
    is unknown until then, so it counts as the slowest), is held, and goes on only once partition 0 has nothing
    left to learn."""
    topics = topics.with_(kafka_client=client)
    behind = [event(f"u{j % 9}", T0 + j) for j in range(600)]
    ahead = [event(f"v{j % 9}", T0 + 1e6 + j) for j in range(600)]
    produce_to(topics, 1, ahead)  # first in the log, so the first fetches bring it
    produce_to(topics, 0, behind)
    learned, held = run_worker(topics, len(behind) + len(ahead), monkeypatch)
    assert 1 in held and 0 not in held[held.index(1):]
    last_behind = max(j for j, (p, _) in enumerate(learned) if p == 0)
    early = [ts for p, times in learned[:last_behind] if p == 1 for ts in times]
    assert len(early) <= 1, f"partition 1 learned {len(early)} events before partition 0 was done"
    assert sorted(ts for p, times in learned if p == 0 for ts in times) == [e.ts for e in behind]


@pytest.mark.parametrize("lag, stale", [(0, 1e9), (5, 0.5)], ids=["no lag", "no owner"])
def test_a_partition_without_events_to_learn_or_without_an_owner_holds_nobody_back(topics, monkeypatch, lag, stale):
    """A third partition far behind, as another worker left it in Redis: with no lag it never counts; with
    lag but a stream time that stands still (no owner) it stops counting after `ALIGN_STALE` s. Either way the
    worker learns everything (it would wait for ever otherwise: `ALIGN_STALE` is 10^9 s for "no lag")."""
    monkeypatch.setattr(worker_module, "ALIGN_STALE", stale)
    exchange_stream_times(connect(topics.redis_url), topics.key_prefix, topics.events_topic, {7: (T0 - 1e6, lag)})
    events = {p: [event(f"u{p}-{j % 9}", T0 + 2 * j + p) for j in range(300)] for p in (0, 1)}
    for p, evs in events.items():
        produce_to(topics, p, evs)
    learned, _ = run_worker(topics, 600, monkeypatch)
    for p, evs in events.items():
        assert sorted(ts for q, times in learned if q == p for ts in times) == [e.ts for e in evs]
