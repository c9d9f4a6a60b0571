"""`streamrec demo`, the main job, end to end against the test's real Tansu and Redis."""

from __future__ import annotations

import orjson

from stream_app.dev.demo import run_demo
from stream_app.io import kafka
from stream_app.io.redis import connect


def test_demo_learns_reports_its_own_metrics_and_cleans_up(topics):
    # A record of some other worker already on the metrics topic must not reach the demo's table.
    stranger = {"worker": "elsewhere-1", "model": "pop", "recall": 1.0, "auc": 1.0, "mrr": 1.0, "ndcg": 1.0,
                "evaluated": 10**6, "events_seen": 10**7, "batch": 1, "k": 20}
    with kafka.Sender(kafka.target(topics)) as sender:
        sender.send(topics.metrics_topic, orjson.dumps(stranger), key=b"pop")

    rows = run_demo(topics, n_events=3000, models="pop,mf", seed=1)

    assert set(rows) == {"pop", "mf"}
    for name, row in rows.items():
        assert row["workers"] == 1, f"{name}: records of other workers were pooled in"
        assert 0 < row["evaluated"] < 3000 and row["events_seen"] == 3000
        assert row["repeat"] > 0, "the synthetic stream re-views items: the table counts those events"
        assert 0.0 < row["recall"] < 1.0 and 0.5 < row["auc"] < 1.0
    assert rows["mf"]["batch"] == 256
    leftover = list(connect(topics.redis_url).scan_iter(match=f"{{{topics.key_prefix}-demo-*", count=1000))
    assert leftover == [], "the demo must remove its Redis keys"


def test_demo_refuses_addresses_it_cannot_manage_with_a_clear_message(tmp_path):
    """A Redis Cluster URL: the demo does not start servers it cannot manage, and says what to do."""
    from typer.testing import CliRunner

    from stream_app.cli import app

    url = "redis+cluster://user:hunter2@127.0.0.1:1,127.0.0.1:2"
    result = CliRunner().invoke(app, ["demo"], env={"STREAMREC_REDIS_URL": url, "STREAMREC_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 2
    assert "manages plain redis://HOST:PORT/DB URLs only" in result.output and "hunter2" not in result.output
