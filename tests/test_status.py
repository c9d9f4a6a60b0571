"""`streamrec status` against a real Tansu broker and a real Redis: owners, offsets, lag, commit age, problems."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

from stream_app.cli import app
from stream_app.core.errors import FencedError
from stream_app.dev.embedded import free_port
from stream_app.io.redis import Changes, Keys, PartitionStore, connect
from stream_app.worker.config import WorkerConfig
from stream_app.worker.status import (
    NO_LOG,
    OFFSET_GAP,
    STALLED,
    TRUNCATED,
    PartitionStatus,
    _lag_and_problem,
    partition_status,
    pending,
)
from stream_app.worker.worker import Worker
from tests.test_worker import events, produce


def cli(settings, *args: str):
    env = {k: v for k, v in settings.environ().items() if k.startswith("STREAMREC_")}
    return CliRunner().invoke(app, ["status", *args], env=env)


def test_claim_records_the_worker_and_commits_their_time_but_a_fenced_commit_does_not(topics):
    client = connect(topics.redis_url)
    keys = Keys(topics.key_prefix, topics.events_topic, 0)
    old, new = PartitionStore(client, keys, worker_id="old-1"), PartitionStore(client, keys, worker_id="new-2")
    old.claim()
    assert client.get(keys.worker) == b"old-1" and client.get(keys.committed_at) is None
    old.commit(Changes(3, 3, {}, {}, {}, [], {}, []))
    committed = float(client.get(keys.committed_at))
    sec, usec = client.time()
    assert 0 <= sec + usec / 1e6 - committed < 60  # Redis server time
    assert new.claim() == 2 and client.get(keys.worker) == b"new-2" and int(client.get(keys.owner)) == 2
    with pytest.raises(FencedError):
        old.commit(Changes(9, 6, {}, {}, {}, [], {}, []))
    assert float(client.get(keys.committed_at)) == committed and int(client.get(keys.offset)) == 3


def test_status_shows_owner_offsets_lag_and_commit_age(topics):
    n = produce(topics, events(600, seed=4))
    assert all(r.worker is None and r.lag == r.log_end for r in partition_status(topics)), "unclaimed before a worker"
    Worker(topics, WorkerConfig(models=("pop",), worker_id="w-status")).run(max_idle=3)

    rows = partition_status(topics)
    assert [r.partition for r in rows] == list(range(topics.events_partitions))
    assert sum(r.offset for r in rows) == sum(r.applied for r in rows) == n
    for r in rows:
        assert r.worker == "w-status" and r.token is not None and r.token >= 1 and r.problem is None
        assert r.log_start == 0 and r.offset == r.log_end and r.lag == 0
        assert r.commit_age is not None and 0 <= r.commit_age < 300

    result = cli(topics, "--json")
    assert result.exit_code == 0, result.output
    out = orjson.loads(result.stdout)
    assert out["topic"] == topics.events_topic
    assert [(p["worker"], p["offset"], p["lag"]) for p in out["partitions"]] == [("w-status", r.offset, 0) for r in rows]
    assert out["workers"] == [{"worker": "w-status", "partitions": [0, 1], "commit_age": out["workers"][0]["commit_age"]}]
    table = cli(topics)
    assert table.exit_code == 0 and "w-status" in table.stdout and "offset gap" not in table.stdout

    m = produce(topics, events(250, seed=5))  # no worker runs now
    rows = partition_status(topics)
    assert sum(r.lag for r in rows) == m and all(r.lag == r.log_end - r.offset for r in rows)
    assert all(r.problem is None for r in rows)
    stalled = cli(topics, "--json", "--stale-after", "0")
    assert stalled.exit_code == 1
    assert {p["problem"] for p in orjson.loads(stalled.stdout)["partitions"] if p["lag"]} == {STALLED}


def test_a_stored_offset_past_the_log_end_shows_as_an_offset_gap(topics):
    produce(topics, events(100, seed=6))
    Worker(topics, WorkerConfig(models=("pop",), worker_id="w-gap")).run(max_idle=3)
    client = connect(topics.redis_url)
    end = partition_status(topics)[1].log_end
    client.set(Keys(topics.key_prefix, topics.events_topic, 1).offset, end + 500)  # as if the broker lost its log

    rows = partition_status(topics)
    assert [r.problem for r in rows] == [None, OFFSET_GAP]
    assert rows[1].offset == end + 500 and rows[1].log_end == end
    result = cli(topics)
    assert result.exit_code == 1 and OFFSET_GAP in result.stdout
    assert [p["problem"] for p in orjson.loads(cli(topics, "--json").stdout)["partitions"]] == [None, OFFSET_GAP]


def test_unreachable_redis_or_kafka_is_a_clear_error_without_the_password(topics):
    down = free_port("127.0.0.1")
    result = cli(topics, "--redis-url", f"redis://admin:s3cret-pw@127.0.0.1:{down}/0")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Redis at redis://admin:***@127.0.0.1" in result.output and "s3cret-pw" not in result.output
    result = cli(topics, "--bootstrap", f"127.0.0.1:{down}")
    assert result.exit_code == 2 and f"Kafka at 127.0.0.1:{down} is not reachable" in result.output


@pytest.mark.parametrize("offset, bounds, quiet, expected", [
    (None, (0, 40), None, (40, None)),  # unclaimed: all of the log waits
    (40, (0, 40), 1e6, (0, None)),  # caught up: a quiet owner is fine
    (30, (0, 40), 61.0, (10, STALLED)),  # events wait and the owner has been quiet too long
    (30, (0, 40), 5.0, (10, None)),
    (41, (0, 40), 1.0, (0, OFFSET_GAP)),
    (10, (20, 40), 1.0, (20, TRUNCATED)),  # retention deleted events 10-19 before they were learned
    (10, None, 1.0, (None, NO_LOG)),
])
def test_lag_and_problem(offset, bounds, quiet, expected):
    assert _lag_and_problem(offset, bounds, quiet, stale_after=60.0) == expected


@pytest.mark.parametrize("offset, bounds, policy, expected", [
    (30, (0, 40), "stop", True),  # events to learn
    (40, (0, 40), "stop", False),  # caught up
    (41, (0, 40), "stop", False),  # an offset gap waits for an operator
    (41, (0, 40), "earliest", True),  # ... or for a worker whose policy resolves it
    (41, (0, 40), "latest", True),
    (10, (20, 40), "stop", True),  # truncated: learned from the log's start
    (10, None, "earliest", False),  # no log: nothing a worker can do
])
def test_pending_says_whether_a_worker_with_a_policy_has_work_on_a_partition(offset, bounds, policy, expected):
    lag, problem = _lag_and_problem(offset, bounds, 1.0, stale_after=60.0)
    row = PartitionStatus(partition=0, worker="w", token=1, offset=offset, log_start=bounds and bounds[0],
                          log_end=bounds and bounds[1], lag=lag, applied=0, version=0, claim_age=1.0,
                          commit_age=1.0, problem=problem)
    assert pending(row, policy) is expected
