"""The monitor's faust app: windowed tables fed by an agent on the metrics topic, lag sampled on a timer.

Tables (each with a changelog topic, so they survive a restart): `windows-<kind>-model` keyed
by model and `windows-<kind>-type` keyed by (model, event type), both relative to the metric
record's `ts`; `windows-<kind>-lag` keyed by "total" and "p<partition>", relative to the lag
sample's `ts` field. Their values are the accumulators of `windows.contribution`/`merge`.
After each update the touched windows are copied into `MonitorState`, which the views read.

Consumer lag: a timer reads `kafka.group_lag` of the workers' group on the events topic and
sends it to an internal topic, whose agent feeds the lag tables and the state.

The app is built per run by `build_app`, in named steps, not at import: its broker, topic
names and window sizes come from settings and command-line flags.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faust
import orjson

from stream_app.io import kafka
from stream_app.monitor.state import Ingested, MonitorState
from stream_app.monitor.windows import GROUPS, KINDS, contribution, merge

log = logging.getLogger("streamrec.monitor")

Tables = dict[tuple[str, str], Any]  # (kind, group) -> windowed table wrapper
Items = list[tuple[str, Any, dict]]  # (group, key, contribution) to merge into the windows


class LagSample(faust.Record, serializer="json", namespace="streamrec.monitor.LagSample"):
    """One reading of a consumer group's lag on a topic."""

    ts: float
    group: str
    topic: str
    partitions: dict  # str(partition) -> lag
    total: int


@dataclass
class Topics:
    metrics: Any  # metric records, read
    alerts: Any  # drift alerts, written
    lag_samples: Any  # LagSample, internal: the timer writes, an agent reads


def app_id(settings) -> str:
    return f"streamrec-monitor-{settings.metrics_topic}"


def create_faust_app(settings) -> faust.App:
    """The faust App: raw bytes on the wire, in-memory tables restored from their changelogs, no web server."""
    data_dir = settings.state_dir / "monitor"
    data_dir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        app_id(settings),
        **kafka.target(settings).faust(),  # broker and broker_credentials
        value_serializer="raw", key_serializer="raw",
        web_enabled=False, datadir=str(data_dir), store="memory://",
        topic_replication_factor=1, topic_partitions=1,
        consumer_auto_offset_reset="earliest",
        # the broker holds a join for about half the session timeout: a short one makes restarts quick
        broker_session_timeout=6.0, broker_heartbeat_interval=1.0,
    )


def create_topics(app: faust.App, settings) -> Topics:
    return Topics(
        metrics=app.topic(settings.metrics_topic, value_serializer="raw", key_serializer="raw"),
        alerts=app.topic(settings.alerts_topic, value_serializer="raw", key_serializer="raw"),
        lag_samples=app.topic(f"{app_id(settings)}-lag-samples", value_type=LagSample, key_serializer="raw",
                              internal=True, partitions=1),
    )


def record_ts(event) -> float:
    """Window time of a metric record: its own `ts` (the faust tables' relative_to handler)."""
    return float(orjson.loads(event.value)["ts"])


def create_tables(app: faust.App, state: MonitorState, expires: float | None = None) -> Tables:
    """A tumbling and a hopping table per group, sized as the state's windows; kept `expires` seconds."""
    tables: Tables = {}
    for kind in KINDS:
        size, step = state.sizes[kind]
        keep = expires or max(size, step * state.keep_windows)
        for group in GROUPS:
            base = app.Table(f"windows-{kind}-{group}", default=dict, partitions=1)  # json keys and values
            wrapped = base.tumbling(size, expires=keep) if kind == "tumbling" else base.hopping(size, step, expires=keep)
            tables[(kind, group)] = (wrapped.relative_to_field(LagSample.ts) if group == "lag"
                                     else wrapped.relative_to(record_ts))
    return tables


def update_windows(tables: Tables, state: MonitorState, items: Items, ts: float) -> None:
    """Merge each (group, key, contribution) into every window of ts, then copy those windows into the state."""
    out = []
    for kind in KINDS:
        for group, key, add in items:
            wrapper = tables[(kind, group)]
            wrapper[key].apply(merge, add)
            for window_range in wrapper.table.window.ranges(ts):
                acc = wrapper.table[(key, window_range)]
                out.append((kind, group, key, window_range[0], acc))
    state.put_windows(out)


def metric_items(got: Ingested) -> Items:
    """What one ingested metric record adds to the windows: per model, and per (model, event type)."""
    items = [("model", got.model, contribution(got.values, got.events))]
    items += [("type", (got.model, etype), contribution(vals)) for etype, vals in got.by_event_type.items()]
    return items


def lag_items(sample: LagSample) -> Items:
    """What one lag sample adds to the windows: the total, and per partition."""
    items = [("lag", "total", contribution({"lag": sample.total}))]
    items += [("lag", f"p{p}", contribution({"lag": n})) for p, n in sample.partitions.items()]
    return items


def parse_record(value: bytes) -> dict | None:
    """The metric record in a message, or None (logged) when it is not a JSON object."""
    try:
        rec = orjson.loads(value)
    except (orjson.JSONDecodeError, TypeError) as exc:
        log.warning("skipping a metric record that is not JSON: %s", exc)
        return None
    if not isinstance(rec, dict):
        log.warning("skipping a metric record that is not a JSON object: %.200r", rec)
        return None
    return rec


def add_metrics_agent(app: faust.App, topics: Topics, tables: Tables, state: MonitorState,
                      on_alert: Callable[[dict], None] | None) -> None:
    """Metric records into the state and the windows; each drift alert to the alerts topic (and `on_alert`)."""

    @app.agent(topics.metrics)
    async def consume(stream):
        async for value in stream:
            rec = parse_record(value)
            if rec is None:
                continue
            try:
                got = state.ingest_record(rec)
            except (TypeError, ValueError) as exc:
                log.warning("skipping a malformed metric record: %s", exc)
                continue
            if got is None:  # already in the history (a replay) or without model/ts (logged)
                continue
            update_windows(tables, state, metric_items(got), got.ts)
            for alert in got.alerts:
                log.warning("drift alert: %s", alert)
                await topics.alerts.send(key=alert["model"].encode(), value=orjson.dumps(alert))
                if on_alert:
                    on_alert(alert)


def add_lag_agent(app: faust.App, topics: Topics, tables: Tables, state: MonitorState) -> None:
    """Lag samples into the state and the lag windows (replayed samples are skipped)."""

    @app.agent(topics.lag_samples)
    async def consume_lag(stream):
        async for sample in stream:
            if not state.ingest_lag(sample.asdict()):
                continue
            update_windows(tables, state, lag_items(sample), sample.ts)


def add_lag_timer(app: faust.App, topics: Topics, where: kafka.Target, group: str, topic: str, interval: float) -> None:
    """Every `interval` seconds, the lag of consumer `group` on `topic` as a LagSample on the internal topic."""

    @app.timer(interval)
    async def sample_lag():
        loop = asyncio.get_running_loop()
        try:
            lags = await loop.run_in_executor(None, kafka.group_lag, where, group, topic)
        except Exception as exc:  # the broker may be busy or restarting: the next tick tries again
            log.warning("could not read the consumer lag of %s: %s", group, exc)
            return
        await topics.lag_samples.send(value=LagSample(ts=time.time(), group=group, topic=topic,
                                                      partitions={str(p): n for p, n in lags.items()},
                                                      total=sum(lags.values())))


def copy_windows_on_recover(tables: Tables, state: MonitorState) -> None:
    """Once a table is recovered from its changelog, every window of it into the state (a restart shows them at once)."""

    def copy_out(kind: str, group: str, wrapper):
        async def on_recover() -> None:
            out = [(kind, group, tuple(key) if isinstance(key, list) else key, window_range[0], acc)
                   for (key, window_range), acc in list(wrapper.table.items())]
            out.sort(key=lambda u: u[3])
            state.put_windows(out)

        return on_recover

    for (kind, group), wrapper in tables.items():
        wrapper.table.on_recover(copy_out(kind, group, wrapper))


def build_app(settings, state: MonitorState, on_alert: Callable[[dict], None] | None = None,
              lag_interval: float = 2.0, lag_group: str | None = None, lag_topic: str | None = None,
              expires: float | None = None) -> faust.App:
    """The monitor's faust app, wired to `state`: tables, agents on metrics and lag samples, the lag timer."""
    app = create_faust_app(settings)
    topics = create_topics(app, settings)
    tables = create_tables(app, state, expires)
    add_metrics_agent(app, topics, tables, state, on_alert)
    add_lag_agent(app, topics, tables, state)
    add_lag_timer(app, topics, kafka.target(settings), lag_group or settings.consumer_group,
                  lag_topic or settings.events_topic, lag_interval)
    copy_windows_on_recover(tables, state)
    app.monitor_tables = tables  # for tests and debugging
    return app
