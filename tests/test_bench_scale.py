"""The scale benchmark on a small MovieLens slice, against the real broker and Redis; and the worker's
`--window` flag and step timings it relies on."""

from __future__ import annotations

import subprocess
import sys

from bench import scale
from bench.streams import movielens
from producers.producer import EventProducer
from stream_app.monitor.terminal import read_records

EVENTS = 3000


def test_the_scale_benchmark_reports_sane_figures_for_each_grid_point(services, tmp_path):
    result = scale.main(["--limit", str(EVENTS), "--partitions", "1,2", "--workers", "1,2", "--models", "mf,pop",
                         "--rounds", "3", "--out", str(tmp_path)], servers=services)
    assert set(result["runs"]) == {"local items", "shared items"}
    for rows in result["runs"].values():
        assert [(r["partitions"], r["workers"]) for r in rows] == [(1, 1), (2, 2)]
        for row in rows:
            assert row["applied"] == row["events"] == EVENTS
            assert row["reporting_workers"] == row["partitions"]  # both processes held a partition
            assert row["events_per_s"] > 0 and row["commit_us_per_event"] > 0 and row["redis_commands_per_event"] > 0
            assert row["freshness_samples"] == 3 * row["partitions"] and 0 < row["commits"] <= EVENTS
            p50, p99 = row["freshness_p50_p99_ms"]
            assert 0 < p50 <= p99
            assert set(row["models"]) == {"mf", "pop"}
            for m in row["models"].values():
                assert 0 <= m["recall"] <= 1 and 0.5 < m["auc"] <= 1  # better than chance on MovieLens
                assert m["ranked"] == m["ranked_total"] > 0  # the metric window held every ranked event
                assert m["ranked"] + m["cold_start"] + m["repeat"] == EVENTS  # every event evaluated
    local, shared = result["runs"]["local items"], result["runs"]["shared items"]
    # Users split over two shards: with local items each shard knows fewer items, so more events are cold
    # in their shard; with shared items an item one shard has seen is in every shard's catalogue.
    assert local[1]["models"]["mf"]["cold_start"] > local[0]["models"]["mf"]["cold_start"]
    assert shared[1]["models"]["mf"]["cold_start"] < local[1]["models"]["mf"]["cold_start"]
    page = (tmp_path / "scale.md").read_text()
    assert all(f"\n| {tree} | {p} | {p} | {model} | " in page
               for tree in ("local items", "shared items") for p in (1, 2) for model in ("mf", "pop"))
    assert (tmp_path / "scale.json").exists()


def test_the_worker_command_takes_its_metric_window_from_the_flag(topics, tmp_path):
    with EventProducer(topics) as producer:
        producer.send_many(movielens(limit=1500))
    log = tmp_path / "worker.log"
    proc = subprocess.run(
        [sys.executable, "-m", "stream_app.cli", "worker", "--window", "200", "--sample-rate", "1", "--max-idle", "4"],
        env=topics.environ(), stdout=log.open("wb"), stderr=subprocess.STDOUT, timeout=180)
    assert proc.returncode == 0, log.read_text()[-2000:]
    (record,) = read_records(topics).values()
    assert record["evaluated"] <= 2 * 200 < record["evaluated_total"]  # one window per partition
    assert record["applied"] == 1500 and record["seconds"]["commit"] > 0 and record["seconds"]["learn"] > 0


def test_the_exchange_benchmark_ranks_every_event_with_shared_items(tmp_path):
    from bench import exchange

    result = exchange.main(["--limit", "2000", "--partitions", "2", "--every", "100", "--out", str(tmp_path)])
    one, local, shared = result["runs"]
    assert (one["partitions"], local["partitions"], shared["partitions"]) == (1, 2, 2)
    assert (local["items"], shared["items"]) == ("local", "shared")
    for run in result["runs"]:
        for m in run["models"].values():
            assert 0 < m["recall"] <= 1 and 0.5 < m["auc"] <= 1
    # one catalogue: an item one shard has seen is rankable in the other
    assert shared["models"]["mf"]["ranked"] > local["models"]["mf"]["ranked"]
    assert (tmp_path / "exchange.md").read_text().count("\n| shared | 2 | 100 |") == 1


def test_the_scale_benchmark_paces_the_synthetic_stream_and_passes_worker_options(services, tmp_path):
    n = 1500
    result = scale.main(["--stream", "synthetic", "--limit", str(n), "--partitions", "1", "--workers", "1",
                         "--items", "shared", "--models", "pop", "--rate", "500", "--worker-args", "--commit-max 512",
                         "--rounds", "2", "--out", str(tmp_path)], servers=services)
    (row,) = result["runs"]["shared items"]
    assert row["applied"] == row["events"] == n
    assert row["events_per_s"] < 500 * 1.1  # paced: the replay takes at least n / rate seconds
    assert row["models"]["pop"]["repeat"] > 0  # the synthetic stream's re-views, not MovieLens
    page = (tmp_path / "scale.md").read_text()
    assert "The synthetic stream" in page and "produced at 500 events/s" in page and "--commit-max 512" in page
