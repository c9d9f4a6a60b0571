"""The metrics monitor: faust windowed tables against a reference, consumer lag, drift alerts, end to end over Tansu.

Over 400 lines: one file per component under test, reference computation included.

The plain-Python window aggregation lives here only, as the reference the faust tables are checked against.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import orjson
import pytest

from stream_app.monitor.state import MonitorState, replay
from stream_app.monitor.windows import ALL, check_windows, contribution, merge, window_row


def record(ts, model="mf", worker="w-1", recall=0.2, auc=0.9, mrr=0.08, events_seen=0, by_event_type=None):
    return {"ts": ts, "worker": worker, "model": model, "k": 20, "window": 10000, "evaluated": 1000,
            "events_seen": events_seen, "batch": 256, "recall": recall, "auc": auc, "mrr": mrr, "ndcg": 0.1,
            "precision": recall / 20, "f1": 0.01, "applied": events_seen, "dead_letters": 0,
            "by_event_type": by_event_type or {}}


def random_records(n=400, seed=1, start=1.7e9):
    rng = random.Random(seed)
    ts, seen = start, {}
    out = []
    for _ in range(n):
        ts += rng.uniform(0.05, 2.5)
        model, worker = rng.choice(["mf", "pop", "gru"]), rng.choice(["w-1", "w-2"])
        seen[(worker, model)] = seen.get((worker, model), 0) + rng.randrange(0, 500)
        types = {t: {"recall": rng.random(), "auc": rng.random(), "evaluated": 10}
                 for t in rng.sample(["click", "favorite", "purchase"], rng.randrange(0, 4))}
        out.append(record(ts, model, worker, rng.random(), rng.random(), rng.random(), seen[(worker, model)], types))
    return out


def reference_windows(records, size, step, model, etype):
    """Brute force: for every window start a multiple of step, the records with start <= ts < start + size."""
    prev: dict = {}
    rows = []
    enriched = []
    for r in records:
        key = (r["worker"], r["model"])
        delta = r["events_seen"] - prev[key] if key in prev else 0
        prev[key] = r["events_seen"]
        if r["model"] != model:
            continue
        if etype == ALL:
            enriched.append((r["ts"], r, delta))
        elif etype in r["by_event_type"]:
            enriched.append((r["ts"], r["by_event_type"][etype], 0))
    if not enriched:
        return rows
    first = math.floor((enriched[0][0] - size) / step) * step
    last = max(t for t, _, _ in enriched)
    start = first
    while start <= last:
        inside = [(v, d) for t, v, d in enriched if start <= t < start + size]
        if inside:
            row = {"start": start, "n": len(inside), "events_per_s": sum(d for _, d in inside) / size}
            for name in ("recall", "auc", "mrr"):
                vals = [v[name] for v, _ in inside if v.get(name) is not None]
                if vals:
                    row[name] = sum(vals) / len(vals)
            rows.append(row)
        start += step
    return rows


def reference_accumulators(records, size, step):
    """Brute force, as faust's window values: (group, key) -> {start: accumulator} for every window of every record."""
    prev: dict = {}
    out: dict = {}
    for r in records:
        key = (r["worker"], r["model"])
        delta = r["events_seen"] - prev[key] if key in prev else 0
        prev[key] = r["events_seen"]
        starts = [s for s in (math.floor(r["ts"] / step) * step - j * step for j in range(int(size / step) + 1))
                  if s <= r["ts"] < s + size]
        items = [(("model", r["model"]), contribution({n: r.get(n) for n in ("recall", "auc", "mrr")}, delta))]
        items += [(("type", (r["model"], t)), contribution({n: v.get(n) for n in ("recall", "auc", "mrr")}))
                  for t, v in r["by_event_type"].items()]
        for k, add in items:
            for s in starts:
                out.setdefault(k, {})[s] = merge(out.get(k, {}).get(s), add)
    return out


def feed_reference_windows(state, records):
    """Give a state without faust the windows the faust app would copy into it (for the UI tests)."""
    updates = []
    for kind in ("tumbling", "hopping"):
        size, step = state.sizes[kind]
        for (group, key), per_start in reference_accumulators(records, size, step).items():
            updates += [(kind, group, key, start, acc) for start, acc in sorted(per_start.items())]
    updates.sort(key=lambda u: u[3])
    state.put_windows(updates)


def test_window_values_merge_to_the_reference_means():
    records = random_records(200)
    accs = reference_accumulators(records, 30.0, 10.0)
    for model in ("mf", "pop", "gru"):
        for etype in (ALL, "click"):
            key = ("model", model) if etype == ALL else ("type", (model, etype))
            got = [window_row(start, 30.0, acc) for start, acc in sorted(accs[key].items())]
            want = reference_windows(records, 30.0, 10.0, model, etype)
            assert len(got) == len(want) > 0
            for g, w in zip(got, want):
                assert g["start"] == w["start"] and g["n"] == w["n"]
                for name in ("recall", "auc", "mrr", "events_per_s"):
                    assert (name in g) == (name in w) and (name not in w or g[name] == pytest.approx(w[name]))
    lag = merge(merge(None, contribution({"lag": 5})), contribution({"lag": 9}))
    assert window_row(0, 10, lag)["lag"] == 7 and window_row(0, 10, lag)["lag_max"] == 9


def test_window_settings_and_the_states_copy():
    check_windows(10, (30, 10))
    for bad in ((10, (7, 2)), (10, (10, 20)), (2.5, (30, 10)), (0, (30, 10))):
        with pytest.raises(ValueError):
            check_windows(*bad)
    state = MonitorState(tumbling=1, hopping=(2, 1), keep_windows=5)
    for t in range(20):
        state.put_windows([("tumbling", "model", "mf", float(t), contribution({"recall": 1.0}))])
    assert [w["start"] for w in state.window_rows("tumbling", "model", "mf")] == [15.0, 16.0, 17.0, 18.0, 19.0]
    assert state.events_since(0)[-1]["updates"][0]["row"]["start"] == 19.0


def metric_stream(model="mf", n=300, drop_at=None, seed=7, start=1.7e9, recall=0.25, auc=0.9, worker="w-1"):
    rng = random.Random(seed)
    out = []
    for j in range(n):
        r, a = recall, auc
        if drop_at is not None and j >= drop_at:
            r, a = recall * 0.4, auc  # recall falls by 60%, AUC stays
        out.append(record(start + j, model, worker, r + rng.gauss(0, 0.01), a + rng.gauss(0, 0.005),
                          events_seen=1000 * (j + 1)))
    return out


def test_planted_drop_raises_exactly_the_expected_alert():
    _, alerts = replay(metric_stream(drop_at=150))
    assert len(alerts) == 1, alerts
    (alert,) = alerts
    assert set(alert) == {"ts", "model", "metric", "before", "after", "detector"}
    assert alert["model"] == "mf" and alert["metric"] == "recall" and alert["detector"] == "ADWIN"
    assert 1.7e9 + 150 <= alert["ts"] <= 1.7e9 + 200, "found within 50 records of the drop"
    assert alert["before"] == pytest.approx(0.25, abs=0.03) and alert["after"] == pytest.approx(0.10, abs=0.03)


@pytest.mark.parametrize("seed", range(5))
def test_stable_streams_raise_no_alert(seed):
    records = metric_stream("mf", seed=seed) + metric_stream("pop", seed=seed + 100, recall=0.05, auc=0.7)
    records.sort(key=lambda r: r["ts"])
    _, alerts = replay(records)
    assert alerts == []


def test_a_rise_is_not_an_alert():
    records = [dict(r, recall=0.35 - r["recall"]) for r in metric_stream(drop_at=150)]  # 0.10 -> 0.25
    _, alerts = replay(records)
    assert alerts == []


def test_drops_in_two_models_are_told_apart():
    records = metric_stream("mf", drop_at=100) + metric_stream("pop", seed=3, recall=0.1)
    records.sort(key=lambda r: r["ts"])
    _, alerts = replay(records)
    assert [(a["model"], a["metric"]) for a in alerts] == [("mf", "recall")]


def test_auc_drop_detected_too():
    records = [dict(r, auc=r["auc"] - (0.2 if j >= 120 else 0.0)) for j, r in enumerate(metric_stream())]
    _, alerts = replay(records)
    assert [(a["metric"]) for a in alerts] == ["auc"]
    assert alerts[0]["before"] > alerts[0]["after"] + 0.15


def test_state_pools_workers_rates_and_replays_are_skipped():
    state = MonitorState()
    state.ingest(record(100.0, worker="a", recall=0.2, events_seen=1000))
    state.ingest(record(101.0, worker="b", recall=0.4, events_seen=500))
    state.ingest(record(102.0, worker="a", recall=0.2, events_seen=3000))
    state.ingest(record(101.5, worker="a", recall=0.9, events_seen=9000))  # older than a's last: a replay
    snap = state.snapshot()
    assert snap["records"] == 3 and snap["models"] == ["mf"]
    last = snap["series"]["mf"][-1]
    assert last["recall"] == pytest.approx(0.3)  # pooled over workers a and b (equal evaluated)
    assert last["events_per_s"] == pytest.approx(1000.0)  # (3000 - 1000) / 2 s
    assert [e["type"] for e in state.events_since(0)] == ["point"] * 3
    assert state.events_since(2)[0]["seq"] == 3
    json.dumps(snap)  # serialisable as is


def test_terminal_view_renders():
    from rich.console import Console

    from stream_app.monitor.terminal import terminal_renderable

    records = metric_stream(drop_at=150)
    state, _ = replay(records, MonitorState(lag_group="workers", lag_topic="events"))
    feed_reference_windows(state, records)
    state.ingest_lag({"ts": records[-1]["ts"] - 5, "group": "workers", "topic": "events",
                      "partitions": {"0": 1200, "1": 34}, "total": 1234})
    last = state.window_rows("tumbling", "model", "mf")[-1]
    state.put_windows([("tumbling", "lag", "total", last["start"], contribution({"lag": 1234}))])
    console = Console(record=True, width=140)
    console.print(terminal_renderable(state))
    text = console.export_text()
    assert "streamrec monitor" in text and "mf" in text and "recall" in text
    assert "tumbling window" in text and "alerts" in text
    window_line = [line for line in text.splitlines() if " mf " in line and "1234" in line]
    assert window_line, text  # the latest window's row, with the group's lag in that window
    assert "consumer lag (group workers on events)" in text and "0: 1200, 1: 34" in text
    alert_rows = [line for line in text.splitlines() if " mf " in line and "recall" in line]
    assert alert_rows, text  # the one alert row


def test_dashboard_api_and_sse_without_kafka():
    from fastapi.testclient import TestClient

    from stream_app.monitor.dashboard import create_app

    records = metric_stream(drop_at=150)
    state, _ = replay(records)
    feed_reference_windows(state, records)
    state.ingest_lag({"ts": 1.7e9 + 10, "group": "g", "topic": "events", "partitions": {"0": 7}, "total": 7})
    client = TestClient(create_app(state))
    page = client.get("/")
    assert page.status_code == 200 and "EventSource" in page.text
    assert "http" not in page.text.split("<script>")[1].split("SVGNS")[0]
    snap = client.get("/api/state").json()
    assert snap["models"] == ["mf"] and len(snap["series"]["mf"]) == 300 and len(snap["alerts"]) == 1
    assert snap["tumbling"]["by_model"]["mf"]["all"] and snap["hopping"]["size"] == 30.0
    assert len(snap["tumbling"]["by_model"]["mf"]["all"]) == 30  # the last 30 windows
    assert snap["lag"]["series"][-1]["total"] == 7


# --------------------------------------------------------------------------- end to end over real Tansu

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_state(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def start_monitor(settings, port: int, log_path, *args: str):
    env = dict(os.environ)
    env.update({
        "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "STREAMREC_REDIS_URL": settings.redis_url,
        "STREAMREC_METRICS_TOPIC": settings.metrics_topic, "STREAMREC_ALERTS_TOPIC": settings.alerts_topic,
        "STREAMREC_KEY_PREFIX": settings.key_prefix, "STREAMREC_STATE_DIR": str(settings.state_dir),
        "STREAMREC_EVENTS_TOPIC": settings.events_topic, "STREAMREC_DLQ_TOPIC": settings.dlq_topic,
        "STREAMREC_CONSUMER_GROUP": settings.consumer_group,
        "STREAMREC_EVENTS_PARTITIONS": str(settings.events_partitions),
    })
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "stream_app.cli", "monitor", "--port", str(port), *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is None and get_state(port), 30, "the monitor's dashboard")
    except AssertionError:
        proc.kill()
        raise AssertionError(f"monitor did not start: {open(log_path, errors='replace').read()[-3000:]}") from None
    return proc


def stop_monitor(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def committed(settings) -> dict[int, int]:
    from stream_app.io import kafka

    reader = kafka.consumer(kafka.target(settings), settings.consumer_group)
    try:
        return {p: reader.committed(kafka.TopicPartition(settings.events_topic, p)) or 0
                for p in range(settings.events_partitions)}
    finally:
        reader.close()


def test_group_lag_over_real_tansu(topics):
    from stream_app.io import kafka
    from stream_app.worker.config import WorkerConfig
    from stream_app.worker.worker import Worker
    from tests.test_worker import events, produce

    assert kafka.group_lag(kafka.target(topics), topics.consumer_group, topics.events_topic) == {0: 0, 1: 0}
    assert kafka.group_lag(kafka.target(topics), topics.consumer_group, "no-such-topic") == {}
    n = produce(topics, events(500))
    per_partition = {p: 0 for p in range(topics.events_partitions)}
    for e in events(500):
        per_partition[kafka.partition_for(e.user_id.encode(), topics.events_partitions)] += 1
    lag = kafka.group_lag(kafka.target(topics), topics.consumer_group, topics.events_topic)
    assert sum(lag.values()) == n == 500 and lag == per_partition  # no worker yet: everything is lag
    Worker(topics, WorkerConfig(models=("pop",))).run(max_idle=3)
    assert kafka.group_lag(kafka.target(topics), topics.consumer_group, topics.events_topic) == {0: 0, 1: 0}
    assert committed(topics) == per_partition  # caught up for real, not clamped at zero


def test_faust_windowed_tables_and_lag_over_real_tansu(topics, tmp_path):
    """The faust app's tumbling and hopping tables hold what the reference computes; lag N, then 0."""
    from stream_app.io import kafka
    from stream_app.worker.config import WorkerConfig
    from stream_app.worker.worker import Worker
    from tests.test_worker import events, produce

    produce(topics, events(300))  # no worker yet: lag 300
    port = free_port()
    proc = start_monitor(topics, port, tmp_path / "monitor.log", "--tumbling", "10", "--hopping", "30,10",
                         "--lag-interval", "1")
    try:
        records = random_records(400, start=time.time() - 700)
        with kafka.Sender(kafka.target(topics)) as sender:
            for r in records:
                sender.send(topics.metrics_topic, orjson.dumps(r), key=r["model"].encode())
        snap = wait_for(lambda: (s := get_state(port)) and s["records"] == 400 and s, 60, "the 400 records")
        compared = 0
        for kind, (size, step) in (("tumbling", (10.0, 10.0)), ("hopping", (30.0, 10.0))):
            assert (snap[kind]["size"], snap[kind]["step"]) == (size, step)
            for model in ("mf", "pop", "gru"):
                for etype in (ALL, "click", "favorite", "purchase"):
                    got = snap[kind]["by_model"][model][etype]
                    want = reference_windows(records, size, step, model, etype)[-30:]
                    assert len(got) == len(want) == 30, (kind, model, etype)
                    for g, w in zip(got, want):
                        assert g["start"] == pytest.approx(w["start"]) and g["n"] == w["n"]
                        assert g["end"] == pytest.approx(w["start"] + size)
                        for name in ("recall", "auc", "mrr", "events_per_s"):
                            assert (name in g) == (name in w), (kind, model, etype, name)
                            if name in w:
                                assert g[name] == pytest.approx(w[name])
                        compared += 1
        assert compared == 2 * 3 * 4 * 30

        # consumer lag: sampled every second, windowed in the lag tables
        snap = wait_for(lambda: (s := get_state(port)) and s["lag"]["series"] and s, 30, "a lag sample")
        sample = snap["lag"]["series"][-1]
        assert sample["total"] == 300 and sample["group"] == topics.consumer_group
        assert sum(sample["partitions"].values()) == 300
        lag_rows = wait_for(lambda: get_state(port)["tumbling"]["lag"].get("total"), 10, "lag windows")
        assert lag_rows[-1]["lag"] == 300 and lag_rows[-1]["lag_max"] == 300
        assert get_state(port)["hopping"]["lag"]["p0"][-1]["lag"] == sample["partitions"]["0"]

        Worker(topics, WorkerConfig(models=("pop",), metrics_interval=60)).run(max_idle=3)
        snap = wait_for(lambda: (s := get_state(port)) and s["lag"]["series"][-1]["total"] == 0 and s, 30,
                        "lag 0 once a worker has caught up")
        assert snap["tumbling"]["lag"]["total"][-1]["lag"] < 300
    finally:
        stop_monitor(proc)


def test_worker_to_monitor_to_alert_over_real_tansu(topics, tmp_path):
    from stream_app.io import kafka
    from stream_app.worker.config import WorkerConfig
    from stream_app.worker.worker import Worker
    from tests.test_worker import events, produce, read_topic

    port = free_port()
    proc = start_monitor(topics, port, tmp_path / "monitor.log")
    try:
        # real records from a real worker
        produce(topics, events(2000))
        Worker(topics, WorkerConfig(models=("pop",), sample_rate=0.5, metrics_interval=0.3)).run(max_idle=3)
        snap = wait_for(lambda: (s := get_state(port)) and "pop" in s["series"] and s, 30, "the worker's records")
        assert snap["series"]["pop"][-1]["recall"] is not None

        # synthetic records with a planted drop in "planted", a stable "steady" beside it
        now = time.time()
        recs = metric_stream("planted", n=200, drop_at=100, start=now - 400, worker="synthetic") + \
            metric_stream("steady", n=200, start=now - 400, worker="synthetic", seed=11)
        recs.sort(key=lambda r: r["ts"])
        with kafka.Sender(kafka.target(topics)) as sender:
            for r in recs:
                sender.send(topics.metrics_topic, orjson.dumps(r), key=r["model"].encode())
        snap = wait_for(lambda: (s := get_state(port)) and len(s["series"].get("steady", [])) == 200 and s, 30,
                        "the synthetic records")
        assert [(a["model"], a["metric"]) for a in snap["alerts"]] == [("planted", "recall")]
        alerts = read_topic(topics, topics.alerts_topic, timeout=3)
        assert [(a["model"], a["metric"], a["detector"]) for a in alerts] == [("planted", "recall", "ADWIN")]
        assert alerts[0]["before"] > alerts[0]["after"]
        assert set(alerts[0]) == {"ts", "model", "metric", "before", "after", "detector"}
    finally:
        stop_monitor(proc)

    # the history survives a restart (Redis), and the replayed topic adds no duplicates nor alerts
    from stream_app.io import kafka

    windows_before = snap["tumbling"]["by_model"]["steady"]["all"]
    lag_before = len(snap["lag"]["series"])
    assert windows_before and lag_before
    proc = start_monitor(topics, port, tmp_path / "monitor.log")
    try:
        snap = get_state(port)
        assert len(snap["series"]["steady"]) == 200 and len(snap["alerts"]) == 1
        assert len(snap["lag"]["series"]) >= lag_before  # the lag history is back from Redis
        # the windows are back from the faust tables' changelogs once the app has recovered them
        snap = wait_for(lambda: (s := get_state(port)) and s["tumbling"]["by_model"].get("steady") and s, 30,
                        "the recovered windows")
        assert snap["tumbling"]["by_model"]["steady"]["all"][-len(windows_before):] == windows_before
        # one new record after the restart: consumed once the group has joined and whatever is
        # replayed from the topic has been skipped
        with kafka.Sender(kafka.target(topics)) as sender:
            sender.send(topics.metrics_topic, orjson.dumps(metric_stream("steady", n=1, start=time.time(),
                                                                         worker="synthetic")[0]))
        snap = wait_for(lambda: (s := get_state(port)) and len(s["series"]["steady"]) == 201 and s, 30,
                        "a record sent after the restart")
        assert len(snap["alerts"]) == 1 and len(snap["series"]["planted"]) == 200
    finally:
        stop_monitor(proc)
    assert len(read_topic(topics, topics.alerts_topic, timeout=2)) == 1
