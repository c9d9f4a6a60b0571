"""Reading the metrics topic: the latest record per worker and model, as a live table."""

from __future__ import annotations

import time

import orjson
from rich.console import Console
from rich.live import Live
from rich.table import Table

from stream_app.io import kafka
from stream_app.core.settings import Settings

COLUMNS = ("recall", "auc", "mrr", "ndcg", "precision", "f1")


def _consumer(settings: Settings, from_beginning: bool):
    consumer = kafka.consumer(settings.kafka_bootstrap, None, auto_offset_reset="earliest")
    partitions = consumer.partitions_for_topic(settings.metrics_topic) or {0}
    tps = [kafka.TopicPartition(settings.metrics_topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    if from_beginning:
        consumer.seek_to_beginning(*tps)
    else:
        consumer.seek_to_end(*tps)
    return consumer


def latest_by_model(records: dict[tuple[str, str], dict]) -> dict[str, dict]:
    """Pool the latest record of each worker into one row per model (weighted by evaluated events)."""
    out: dict[str, dict] = {}
    for (_, model), rec in sorted(records.items()):
        row = out.setdefault(model, {"evaluated": 0, "cold_start": 0, "repeat": 0, "events_seen": 0, "workers": 0,
                                     "batch": rec.get("batch"), "k": rec.get("k")})
        n = rec.get("evaluated", 0)
        for col in ("cold_start", "repeat"):  # counts since each worker started: summed over workers
            row[col] += rec.get(col) or 0
        for col in COLUMNS:
            if rec.get(col) is not None:
                row[col] = row.get(col, 0.0) + rec[col] * n
        row["evaluated"] += n
        row["events_seen"] += rec.get("events_seen", 0)
        row["workers"] += 1
    for row in out.values():
        for col in COLUMNS:
            if col in row and row["evaluated"]:
                row[col] /= row["evaluated"]
    return out


def table(rows: dict[str, dict], title: str = "streamrec metrics") -> Table:
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
                        except orjson.JSONDecodeError:
                            continue
                        latest[(rec.get("worker", "?"), rec.get("model", "?"))] = rec
                live.update(table(latest_by_model(latest), f"streamrec metrics ({settings.metrics_topic})"))
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
