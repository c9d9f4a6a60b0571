"""The terminal views: the metrics topic as a live table per model, and the monitor's state in rich."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from stream_app.core.settings import Settings
from stream_app.io import kafka
from stream_app.monitor.pooling import latest_by_model
from stream_app.monitor.windows import VALUES

if TYPE_CHECKING:
    from stream_app.monitor.state import MonitorState

log = logging.getLogger("streamrec.monitor")


def _consumer(settings: Settings, from_beginning: bool):
    consumer = kafka.consumer(kafka.target(settings), None, auto_offset_reset="earliest")
    partitions = consumer.partitions_for_topic(settings.metrics_topic) or {0}
    tps = [kafka.TopicPartition(settings.metrics_topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    if from_beginning:
        consumer.seek_to_beginning(*tps)
    else:
        consumer.seek_to_end(*tps)
    return consumer


def table(rows: dict[str, dict], title: str = "streamrec metrics") -> Table:
    """One row per model (as pooled by `latest_by_model`)."""
    t = Table(title=title)
    shown = ("recall", "auc", "mrr", "ndcg")
    for col in ("model", "batch", *shown, "evaluated", "cold start", "repeat", "events seen"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for model, r in rows.items():
        t.add_row(model, str(r["batch"]), *(f"{r[c]:.4f}" if c in r else "-" for c in shown),
                  f"{r['evaluated']:,}", f"{r['cold_start']:,}", f"{r['repeat']:,}", f"{r['events_seen']:,}")
    return t


def read_records(settings: Settings, timeout: float = 5.0, from_beginning: bool = True) -> dict[tuple[str, str], dict]:
    """The latest record per (worker, model) found on the topic within `timeout` seconds of quiet."""
    consumer = _consumer(settings, from_beginning)
    latest: dict[tuple[str, str], dict] = {}
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for messages in consumer.poll(timeout_ms=200).values():
                for msg in messages:
                    rec = orjson.loads(msg.value)
                    latest[(rec.get("worker", "?"), rec.get("model", "?"))] = rec
                deadline = time.monotonic() + min(timeout, 1.0)
    finally:
        consumer.close()
    return latest


def follow(settings: Settings, from_beginning: bool = False, exit_after: float | None = None) -> None:
    """Show a live-refreshing table of the metrics topic until Ctrl-C (or `exit_after` seconds)."""
    consumer = _consumer(settings, from_beginning)
    latest: dict[tuple[str, str], dict] = {}
    start = time.monotonic()
    try:
        with Live(table({}), console=Console(), refresh_per_second=4) as live:
            while exit_after is None or time.monotonic() - start < exit_after:
                for messages in consumer.poll(timeout_ms=250).values():
                    for msg in messages:
                        try:
                            rec = orjson.loads(msg.value)
                        except orjson.JSONDecodeError as exc:
                            log.warning("skipping a metric record that is not JSON (offset %s): %s", msg.offset, exc)
                            continue
                        latest[(rec.get("worker", "?"), rec.get("model", "?"))] = rec
                live.update(table(latest_by_model(latest), f"streamrec metrics ({settings.metrics_topic})"))
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


def terminal_renderable(state: MonitorState) -> Group:
    """The monitor's state in rich tables: latest per model, latest tumbling window, consumer lag, alerts."""
    rows = state.rows()
    size = state.sizes["tumbling"][0]
    with state.lock:
        latest_window = {}
        for model in rows:
            per_key = state.windows["tumbling"].get(("model", model), {})
            latest_window[model] = per_key[max(per_key)] if per_key else None
        lag_rows = state.windows["tumbling"].get(("lag", "total"), {})
        lag_window = {start: row for start, row in lag_rows.items()}
        lag = state.lag[-1] if state.lag else None
        alerts = list(state.alerts)[-8:]
    main = table(rows, f"streamrec monitor ({state.topic}, {state.records} records)")
    win = Table(title=f"last {size:g}s tumbling window (faust table)")
    for col in ("model", "window", "records", "recall", "auc", "mrr", "events/s", "lag"):
        win.add_column(col, justify="left" if col == "model" else "right")
    for model, w in latest_window.items():
        if w:
            lw = lag_window.get(w["start"])
            win.add_row(model, time.strftime("%H:%M:%S", time.localtime(w["start"])), str(w["n"]),
                        *(f"{w[c]:.4f}" if c in w else "-" for c in VALUES), f"{w['events_per_s']:.1f}",
                        f"{lw['lag']:.0f}" if lw else "-")
    lag_table = Table(title=f"consumer lag (group {state.lag_group or '-'} on {state.lag_topic or '-'})",
                      min_width=72)
    for col in ("time", "total", "per partition"):
        lag_table.add_column(col, justify="right" if col == "total" else "left")
    if lag:
        parts = ", ".join(f"{p}: {n}" for p, n in sorted(lag["partitions"].items(), key=lambda kv: int(kv[0])))
        lag_table.add_row(time.strftime("%H:%M:%S", time.localtime(lag["ts"])), str(lag["total"]), parts or "-")
    al = Table(title="alerts (drops found by ADWIN)")
    for col in ("time", "model", "metric", "before", "after"):
        al.add_column(col)
    for a in alerts:
        al.add_row(time.strftime("%H:%M:%S", time.localtime(a["ts"])), a["model"], a["metric"],
                   f"{a['before']:.4f}", f"{a['after']:.4f}")
    return Group(main, win, lag_table, al)
