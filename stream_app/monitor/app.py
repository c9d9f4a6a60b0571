"""The metrics monitor: windowed aggregates, drift alerts, bounded history, served live.

Layout (the Kafka part is thin on purpose; everything else is testable without a broker):

- Windowed aggregates are faust windowed tables (`build_app`): tumbling and hopping
  tables keyed per model and per (model, event type), relative to each metric
  record's `ts`, whose values are the accumulators of `contribution`/`merge`
  (count, sums and counts of recall/AUC/MRR, events); a pair keyed per partition
  (and "total") holds the consumer lag samples, relative to the sample's `ts` field.
  After each update the agent copies the touched windows into `MonitorState`
  (`put_window`), which is what the dashboard and the terminal view read.
- Consumer lag: a faust timer samples `kafka.group_lag` of the workers' consumer
  group on the events topic every `lag_interval` seconds and sends it to an
  internal topic, whose agent feeds the lag tables and the state.
- `DriftWatcher`: one `river.drift.ADWIN` per (model, metric) on recall and AUC; a
  detected *drop* becomes an alert `{"ts","model","metric","before","after","detector"}`.
- `MonitorState`: ingests metric records (DESIGN.md section 5), pools workers per model
  (`metrics_view.latest_by_model`), keeps a bounded per-model history, the lag history,
  the windows copied from the faust tables, the alerts, and a sequence of change events
  for the dashboard's SSE stream.
- `RedisHistory`: the bounded history in Redis (one capped list per model, one for lag
  samples, one for alerts), reloaded when the monitor restarts so charts and detectors
  resume; the windowed tables come back from their faust changelog topics.
- `run`: the faust app in the main thread; the dashboard (uvicorn, a thread) or a rich
  terminal view shows the state.

events/s comes from `events_seen` deltas per (worker, model).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import orjson

from stream_app.monitor.terminal import latest_by_model

log = logging.getLogger("streamrec.monitor")

VALUES = ("recall", "auc", "mrr")
DRIFT_METRICS = ("recall", "auc")
ALL = "all"  # event-type key of the whole-model aggregates


# --------------------------------------------------------------------------- window values

def contribution(values: dict[str, float | None], events: int = 0) -> dict:
    """One record's share of a window accumulator (the value merged into a faust table window)."""
    present = {k: float(v) for k, v in values.items() if v is not None}
    return {"n": 1, "events": int(events), "sum": present, "cnt": {k: 1 for k in present},
            "max": dict(present)}


def merge(acc: dict | None, add: dict) -> dict:
    """acc + add, as a new dict (JSON-serialisable: it goes to the table's changelog)."""
    acc = acc or {}
    out = {"n": acc.get("n", 0) + add["n"], "events": acc.get("events", 0) + add["events"],
           "sum": dict(acc.get("sum", {})), "cnt": dict(acc.get("cnt", {})), "max": dict(acc.get("max", {}))}
    for k, v in add["sum"].items():
        out["sum"][k] = out["sum"].get(k, 0.0) + v
        out["cnt"][k] = out["cnt"].get(k, 0) + add["cnt"][k]
        out["max"][k] = max(out["max"].get(k, v), add["max"][k])
    return out


def window_row(start: float, size: float, acc: dict) -> dict:
    """What the dashboard shows of one window: start, end, n, events/s, means (and lag_max)."""
    row: dict[str, Any] = {"start": float(start), "end": float(start) + size, "n": acc.get("n", 0),
                           "events_per_s": acc.get("events", 0) / size}
    for name, total in acc.get("sum", {}).items():
        row[name] = total / acc["cnt"][name]
    if "lag" in acc.get("max", {}):
        row["lag_max"] = acc["max"]["lag"]
    return row


def check_windows(tumbling: float, hopping: tuple[float, float]) -> None:
    """faust windows step in whole seconds, and hopping ones only tile when size is a multiple of step."""
    size, step = hopping
    for v in (tumbling, size, step):
        if v <= 0 or float(v) != int(v):
            raise ValueError(f"window sizes and steps are whole seconds > 0, not {v}")
    if step > size or size % step:
        raise ValueError(f"hopping window size {size:g} must be a multiple of its step {step:g}")


# --------------------------------------------------------------------------- drift

class DriftWatcher:
    """ADWIN per (model, metric); alerts on drops only, then restarts that detector.

    `before` is the mean of the values ADWIN dropped, `after` the mean of those it kept.
    A change counts as a drop when after < before by at least `min_drop` (relative).

    ADWIN's bound assumes values in [0, 1]; a recall of 0.05 moving to 0.02 is then too
    small a step for it to see in good time, so each detector sees the series divided
    by the mean of its first `reference` values (a relative scale, the same for all models).
    """

    def __init__(self, delta: float = 0.002, min_drop: float = 0.1, clock: int = 1, grace_period: int = 10,
                 reference: int = 10):
        self.delta, self.min_drop, self.clock, self.grace_period = delta, min_drop, clock, grace_period
        self.reference = reference
        self._detectors: dict[tuple[str, str], Any] = {}
        self._values: dict[tuple[str, str], deque] = {}
        self._ref: dict[tuple[str, str], list[float]] = {}

    def _detector(self, key: tuple[str, str]):
        from river.drift import ADWIN

        det = self._detectors.get(key)
        if det is None:
            det = self._detectors[key] = ADWIN(delta=self.delta, clock=self.clock, grace_period=self.grace_period)
            self._values[key] = deque(maxlen=100_000)
            self._ref[key] = []
        return det

    def _feed(self, key: tuple[str, str], value: float) -> None:
        ref = self._ref[key]
        if len(ref) < self.reference:
            ref.append(value)
        scale = sum(ref) / len(ref)
        self._detectors[key].update(value / scale if scale > 1e-12 else value)
        self._values[key].append(value)

    def update(self, model: str, metric: str, value: float, ts: float) -> dict | None:
        key = (model, metric)
        det = self._detector(key)
        values = self._values[key]
        before_width = det.width
        self._feed(key, value)
        if not det.drift_detected:
            return None
        # where the change happened: the split of ADWIN's window (before the cut) that
        # maximises the standardised mean difference; before/after are the means either side
        window = list(values)[-(int(before_width) + 1):]
        if len(window) < 2:
            return None
        split = _change_point(window)
        old, new = window[:split], window[split:]
        before, after = sum(old) / len(old), sum(new) / len(new)
        # restart on the new regime only: one change, one alert
        del self._detectors[key]
        self._detector(key)
        for v in new:
            self._feed(key, v)
        if after < before * (1.0 - self.min_drop) and before - after > 1e-9:
            return {"ts": ts, "model": model, "metric": metric, "before": before, "after": after, "detector": "ADWIN"}
        return None


def _change_point(values: list[float]) -> int:
    """The index splitting `values` into two runs with the most different means (CUSUM estimate)."""
    n = len(values)
    if n < 2:
        raise ValueError("need two values at least")
    total = sum(values)
    best, best_i, left = -1.0, 1, 0.0
    for i in range(1, n):
        left += values[i - 1]
        m1, m2 = left / i, (total - left) / (n - i)
        score = abs(m1 - m2) * math.sqrt(i * (n - i) / n)
        if score > best:
            best, best_i = score, i
    return best_i


# --------------------------------------------------------------------------- history in Redis

class RedisHistory:
    """Bounded history in Redis: a capped list per model and one for alerts, keyed by topic."""

    def __init__(self, url: str, prefix: str, topic: str, cap: int = 2000):
        import redis

        self.client = redis.Redis.from_url(url)
        self.client.ping()
        self.base = f"{prefix}:monitor:{topic}"
        self.cap = cap

    def push_point(self, model: str, point: dict) -> None:
        key = f"{self.base}:history:{model}"
        pipe = self.client.pipeline()
        pipe.sadd(f"{self.base}:models", model)
        pipe.rpush(key, orjson.dumps(point))
        pipe.ltrim(key, -self.cap, -1)
        pipe.execute()

    def push_alert(self, alert: dict) -> None:
        key = f"{self.base}:alerts"
        pipe = self.client.pipeline()
        pipe.rpush(key, orjson.dumps(alert))
        pipe.ltrim(key, -self.cap, -1)
        pipe.execute()

    def push_lag(self, sample: dict) -> None:
        key = f"{self.base}:lag"
        pipe = self.client.pipeline()
        pipe.rpush(key, orjson.dumps(sample))
        pipe.ltrim(key, -self.cap, -1)
        pipe.execute()

    def load(self) -> tuple[dict[str, list[dict]], list[dict], list[dict]]:
        """(points per model, alerts, lag samples), oldest first."""
        models = sorted(m.decode() for m in self.client.smembers(f"{self.base}:models"))
        points = {m: [orjson.loads(x) for x in self.client.lrange(f"{self.base}:history:{m}", 0, -1)] for m in models}
        alerts = [orjson.loads(x) for x in self.client.lrange(f"{self.base}:alerts", 0, -1)]
        lag = [orjson.loads(x) for x in self.client.lrange(f"{self.base}:lag", 0, -1)]
        return points, alerts, lag


# --------------------------------------------------------------------------- state

KINDS = ("tumbling", "hopping")
GROUPS = ("model", "type", "lag")  # window keys: model | (model, event type) | "total" / "p<partition>"


@dataclass
class Ingested:
    """What `MonitorState.ingest_record` took from one metric record (None when it skipped it)."""

    model: str
    ts: float
    events: int  # events_seen delta since this (worker, model)'s previous record
    values: dict[str, float | None]
    by_event_type: dict[str, dict[str, float | None]]
    alerts: list[dict]


class MonitorState:
    """Everything the dashboard and the terminal view show; thread-safe; no Kafka.

    The windows (`put_window`) are written by the faust app from its windowed tables.
    """

    def __init__(self, tumbling: float = 10.0, hopping: tuple[float, float] = (30.0, 10.0),
                 history: int = 2000, drift: DriftWatcher | None = None, store: RedisHistory | None = None,
                 topic: str = "metrics", keep_windows: int = 120, lag_group: str = "", lag_topic: str = ""):
        check_windows(tumbling, hopping)
        self.lock = threading.Lock()
        self.topic = topic
        self.sizes = {"tumbling": (float(tumbling), float(tumbling)),
                      "hopping": (float(hopping[0]), float(hopping[1]))}
        self.keep_windows = keep_windows
        self.windows: dict[str, dict[tuple[str, Any], dict[float, dict]]] = {k: {} for k in KINDS}
        self.history_cap = history
        self.series: dict[str, deque] = {}
        self.lag: deque = deque(maxlen=history)
        self.lag_group, self.lag_topic = lag_group, lag_topic
        self.latest: dict[tuple[str, str], dict] = {}
        self._last_seen: dict[tuple[str, str], tuple[float, int]] = {}
        self.alerts: deque = deque(maxlen=history)
        self.drift = drift or DriftWatcher()
        self.store = store
        self.records = 0
        self.seq = 0
        self._log: deque = deque(maxlen=5000)  # (seq, event) for SSE

    def _emit(self, event: dict) -> None:
        self.seq += 1
        event["seq"] = self.seq
        self._log.append((self.seq, event))

    def restore(self) -> int:
        """Reload the stored history (and re-warm the detectors silently); the number of points."""
        if self.store is None:
            return 0
        points, alerts, lag = self.store.load()
        with self.lock:
            for model, pts in points.items():
                series = self.series.setdefault(model, deque(maxlen=self.history_cap))
                for p in pts:
                    series.append(p)
                    for metric in DRIFT_METRICS:
                        if p.get(metric) is not None:
                            self.drift.update(model, metric, p[metric], p["ts"])
                    if p.get("worker") is not None:
                        self._last_seen[(p["worker"], model)] = (p["ts"], p.get("worker_events_seen", 0))
            self.alerts.extend(alerts)
            self.lag.extend(lag)
        return sum(len(p) for p in points.values()) + len(lag)

    # -- metric records

    def ingest(self, rec: dict) -> list[dict]:
        """Take one metric record; return the alerts it raised."""
        got = self.ingest_record(rec)
        return got.alerts if got else []

    def ingest_record(self, rec: dict) -> Ingested | None:
        """Take one metric record: history point, drift check, SSE event. None if skipped (a replay)."""
        model, worker = rec.get("model"), rec.get("worker", "?")
        if not model or rec.get("ts") is None:
            return None
        ts = float(rec["ts"])
        key = (worker, model)
        alerts: list[dict] = []
        with self.lock:
            last = self._last_seen.get(key)
            if last is not None and ts <= last[0]:
                return None  # replayed after a restart: already in the history
            seen = int(rec.get("events_seen") or 0)
            delta = max(0, seen - last[1]) if last is not None else 0
            rate = delta / (ts - last[0]) if last is not None and ts > last[0] else 0.0
            self._last_seen[key] = (ts, seen)
            self.latest[key] = rec
            self.records += 1
            pooled = latest_by_model({k: v for k, v in self.latest.items() if k[1] == model}).get(model, {})
            point = {"ts": ts, "worker": worker, "worker_events_seen": seen, "events_per_s": rate,
                     "evaluated": pooled.get("evaluated"), "events_seen": pooled.get("events_seen"),
                     "cold_start": pooled.get("cold_start"), "repeat": pooled.get("repeat"),
                     **{name: pooled.get(name) for name in ("recall", "auc", "mrr", "ndcg")}}
            self.series.setdefault(model, deque(maxlen=self.history_cap)).append(point)
            self._emit({"type": "point", "model": model, "point": point})
            for metric in DRIFT_METRICS:
                if point.get(metric) is not None:
                    alert = self.drift.update(model, metric, point[metric], ts)
                    if alert:
                        alerts.append(alert)
                        self.alerts.append(alert)
                        self._emit({"type": "alert", "alert": alert})
        if self.store is not None:
            try:
                self.store.push_point(model, point)
                for alert in alerts:
                    self.store.push_alert(alert)
            except Exception as exc:  # history is best effort; the live view goes on
                log.warning("could not store monitor history: %s", exc)
        by_type = {etype: {name: sub.get(name) for name in VALUES}
                   for etype, sub in (rec.get("by_event_type") or {}).items() if isinstance(sub, dict)}
        return Ingested(model, ts, delta, {name: rec.get(name) for name in VALUES}, by_type, alerts)

    # -- consumer lag samples

    def ingest_lag(self, sample: dict) -> bool:
        """Take one lag sample {"ts", "group", "topic", "partitions": {p: lag}, "total"}; False if a replay."""
        with self.lock:
            if self.lag and sample["ts"] <= self.lag[-1]["ts"]:
                return False
            self.lag.append(sample)
            self._emit({"type": "lag", "sample": sample})
        if self.store is not None:
            try:
                self.store.push_lag(sample)
            except Exception as exc:
                log.warning("could not store the lag history: %s", exc)
        return True

    # -- windows (written from the faust tables)

    def put_windows(self, updates: Iterable[tuple[str, str, Any, float, dict]]) -> None:
        """Copy windows in: (kind, group, key, start, accumulator) each; one SSE event for all."""
        rows = []
        with self.lock:
            for kind, group, key, start, acc in updates:
                size = self.sizes[kind][0]
                per_key = self.windows[kind].setdefault((group, key), {})
                row = window_row(start, size, acc)
                per_key[float(start)] = row
                if len(per_key) > self.keep_windows:
                    for old in sorted(per_key)[: len(per_key) - self.keep_windows]:
                        del per_key[old]
                if float(start) == max(per_key):
                    rows.append({"kind": kind, "group": group, "key": list(key) if isinstance(key, tuple) else key,
                                 "row": row})
            if rows:
                self._emit({"type": "windows", "updates": rows})

    def window_rows(self, kind: str, group: str, key: Any) -> list[dict]:
        with self.lock:
            return [row for _, row in sorted(self.windows[kind].get((group, key), {}).items())]

    def _windows_snapshot(self, kind: str, last: int) -> dict:
        by_model: dict[str, dict[str, list]] = {}
        lag: dict[str, list] = {}
        for (group, key), per_key in self.windows[kind].items():
            rows = [row for _, row in sorted(per_key.items())][-last:]
            if group == "model":
                by_model.setdefault(key, {})[ALL] = rows
            elif group == "type":
                by_model.setdefault(key[0], {})[key[1]] = rows
            else:
                lag[key] = rows
        size, step = self.sizes[kind]
        return {"size": size, "step": step, "by_model": by_model, "lag": lag}

    # -- reading

    def events_since(self, seq: int) -> list[dict]:
        with self.lock:
            if self._log and self._log[0][0] > seq + 1:
                return [{"type": "reset", "seq": self.seq}]
            return [e for s, e in self._log if s > seq]

    def rows(self) -> dict[str, dict]:
        with self.lock:
            return latest_by_model(dict(self.latest))

    def snapshot(self, last_windows: int = 30) -> dict:
        with self.lock:
            return {
                "topic": self.topic, "seq": self.seq, "records": self.records,
                "models": sorted(self.series),
                "latest": latest_by_model(dict(self.latest)),
                "series": {m: list(s) for m, s in sorted(self.series.items())},
                "tumbling": self._windows_snapshot("tumbling", last_windows),
                "hopping": self._windows_snapshot("hopping", last_windows),
                "lag": {"group": self.lag_group, "topic": self.lag_topic, "series": list(self.lag)},
                "alerts": list(self.alerts),
            }


# --------------------------------------------------------------------------- terminal view

def terminal_renderable(state: MonitorState):
    from rich.console import Group
    from rich.table import Table

    from stream_app.monitor.terminal import table

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


# --------------------------------------------------------------------------- faust app

_LAG_RECORD = None


def lag_record_type():
    """The faust Record of a lag sample (defined once, on first use: importing faust is not free)."""
    global _LAG_RECORD
    if _LAG_RECORD is None:
        import faust

        class LagSample(faust.Record, serializer="json", namespace="streamrec.monitor.LagSample"):
            ts: float
            group: str
            topic: str
            partitions: dict  # str(partition) -> lag
            total: int

        _LAG_RECORD = LagSample
    return _LAG_RECORD


def _record_ts(event) -> float:
    """Window time of a metric record: its own `ts` (the faust tables' relative_to handler)."""
    return float(orjson.loads(event.value)["ts"])


def build_app(settings, state: MonitorState, on_alert: Callable[[dict], None] | None = None,
              lag_interval: float = 2.0, lag_group: str | None = None, lag_topic: str | None = None,
              expires: float | None = None):
    """The faust app: windowed tables fed by an agent on the metrics topic; lag sampled on a timer.

    Tables (all with a changelog topic, so they survive a restart):
    `windows-<kind>-model` keyed by model, `windows-<kind>-type` keyed by (model, event type),
    both relative to the record's `ts`; `windows-<kind>-lag` keyed by "total" and "p<partition>",
    relative to the lag sample's `ts` field.
    """
    import faust

    from stream_app.io import kafka

    LagSample = lag_record_type()
    lag_group = lag_group or settings.consumer_group
    lag_topic_name = lag_topic or settings.events_topic
    app_id = f"streamrec-monitor-{settings.metrics_topic}"
    data_dir = settings.state_dir / "monitor"
    data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        value_serializer="raw", key_serializer="raw",
        web_enabled=False, datadir=str(data_dir), store="memory://",
        topic_replication_factor=1, topic_partitions=1,
        consumer_auto_offset_reset="earliest",
        # the broker holds a join for about half the session timeout (faust's default 60 s)
        broker_session_timeout=6.0, broker_heartbeat_interval=1.0,
    )
    metrics = app.topic(settings.metrics_topic, value_serializer="raw", key_serializer="raw")
    alerts_topic = app.topic(settings.alerts_topic, value_serializer="raw", key_serializer="raw")
    lag_samples = app.topic(f"{app_id}-lag-samples", value_type=LagSample, key_serializer="raw",
                            internal=True, partitions=1)

    tables: dict[tuple[str, str], Any] = {}
    for kind in KINDS:
        size, step = state.sizes[kind]
        keep = expires or max(size, step * state.keep_windows)
        for group in GROUPS:
            base = app.Table(f"windows-{kind}-{group}", default=dict, partitions=1)  # json keys and values
            wrapped = base.tumbling(size, expires=keep) if kind == "tumbling" else base.hopping(size, step, expires=keep)
            tables[(kind, group)] = (wrapped.relative_to_field(LagSample.ts) if group == "lag"
                                     else wrapped.relative_to(_record_ts))

    def update(items: list[tuple[str, Any, dict]], ts: float) -> None:
        """Merge (group, key, contribution) into every window of ts, then copy those windows out."""
        out = []
        for kind in KINDS:
            for group, key, add in items:
                wrapper = tables[(kind, group)]
                wrapper[key].apply(merge, add)
                for window_range in wrapper.table.window.ranges(ts):
                    acc = wrapper.table[(key, window_range)]
                    out.append((kind, group, key, window_range[0], acc))
        state.put_windows(out)

    @app.agent(metrics)
    async def consume(stream):
        async for value in stream:
            try:
                rec = orjson.loads(value)
            except (orjson.JSONDecodeError, TypeError):
                continue
            if not isinstance(rec, dict):
                continue
            try:
                got = state.ingest_record(rec)
            except (TypeError, ValueError) as exc:
                log.warning("skipping a malformed metric record: %s", exc)
                continue
            if got is None:
                continue
            items = [("model", got.model, contribution(got.values, got.events))]
            items += [("type", (got.model, etype), contribution(vals)) for etype, vals in got.by_event_type.items()]
            update(items, got.ts)
            for alert in got.alerts:
                log.warning("drift alert: %s", alert)
                await alerts_topic.send(key=alert["model"].encode(), value=orjson.dumps(alert))
                if on_alert:
                    on_alert(alert)

    @app.agent(lag_samples)
    async def consume_lag(stream):
        async for sample in stream:
            if not state.ingest_lag(sample.asdict()):
                continue
            items = [("lag", "total", contribution({"lag": sample.total}))]
            items += [("lag", f"p{p}", contribution({"lag": n})) for p, n in sample.partitions.items()]
            update(items, sample.ts)

    @app.timer(lag_interval)
    async def sample_lag():
        loop = asyncio.get_running_loop()
        try:
            lags = await loop.run_in_executor(None, kafka.group_lag, settings.kafka_bootstrap, lag_group,
                                              lag_topic_name)
        except Exception as exc:  # the broker may be busy or restarting: the next tick tries again
            log.warning("could not read the consumer lag of %s: %s", lag_group, exc)
            return
        await lag_samples.send(value=LagSample(ts=time.time(), group=lag_group, topic=lag_topic_name,
                                               partitions={str(p): n for p, n in lags.items()},
                                               total=sum(lags.values())))

    def copy_out(kind: str, group: str, wrapper):
        async def on_recover() -> None:
            """After recovery from the changelog: every window into the state (a restart shows them at once)."""
            out = [(kind, group, tuple(key) if isinstance(key, list) else key, window_range[0], acc)
                   for (key, window_range), acc in list(wrapper.table.items())]
            out.sort(key=lambda u: u[3])
            state.put_windows(out)

        return on_recover

    for (kind, group), wrapper in tables.items():
        wrapper.table.on_recover(copy_out(kind, group, wrapper))
    app.monitor_tables = tables  # for tests and debugging
    return app


def make_state(settings, history: int = 2000, tumbling: float = 10.0, hopping: tuple[float, float] = (30.0, 10.0),
               lag_group: str | None = None, lag_topic: str | None = None) -> MonitorState:
    store = None
    try:
        store = RedisHistory(settings.redis_url, settings.key_prefix, settings.metrics_topic, cap=history)
    except Exception as exc:
        log.warning("Redis at %s unavailable (%s): history will not survive a restart", settings.redis_url, exc)
    state = MonitorState(tumbling=tumbling, hopping=hopping, history=history, store=store,
                         topic=settings.metrics_topic, lag_group=lag_group or settings.consumer_group,
                         lag_topic=lag_topic or settings.events_topic)
    n = state.restore()
    if n:
        log.info("restored %d history points from Redis", n)
    return state


def run(settings, host: str = "127.0.0.1", port: int = 8050, terminal: bool = False, tumbling: float = 10.0,
        hopping: tuple[float, float] = (30.0, 10.0), lag_interval: float = 2.0, lag_group: str | None = None,
        lag_topic: str | None = None) -> None:
    """Run the monitor until interrupted: faust in the main thread, dashboard or terminal view aside."""
    import faust

    from stream_app.io import kafka

    check_windows(tumbling, hopping)
    kafka.wait_for_broker(settings.kafka_bootstrap)
    kafka.ensure_topics(settings.kafka_bootstrap, {settings.metrics_topic: 1, settings.alerts_topic: 1})
    state = make_state(settings, tumbling=tumbling, hopping=hopping, lag_group=lag_group, lag_topic=lag_topic)
    app = build_app(settings, state, lag_interval=lag_interval, lag_group=lag_group, lag_topic=lag_topic)
    stoppers: list[Callable[[], None]] = []
    if terminal:
        from rich.console import Console
        from rich.live import Live

        live = Live(terminal_renderable(state), console=Console(), refresh_per_second=4)
        live.start()
        stoppers.append(live.stop)

        @app.timer(0.5)
        async def refresh():
            live.update(terminal_renderable(state))
    else:
        from stream_app.monitor.dashboard import serve_in_thread

        server, _ = serve_in_thread(state, host, port)
        print(f"streamrec monitor: dashboard on http://{host}:{port}/ (metrics topic {settings.metrics_topic})", flush=True)
        stoppers.append(lambda: setattr(server, "should_exit", True))
    try:
        worker = faust.Worker(app, loglevel=os.environ.get("STREAMREC_MONITOR_LOGLEVEL", "WARNING"), quiet=True,
                              redirect_stdouts=False)
        worker.spinner = None  # it would draw over the rich table
        worker.execute_from_commandline()
    finally:
        for stop in stoppers:
            stop()


def replay(records: Iterable[dict], state: MonitorState | None = None) -> tuple[MonitorState, list[dict]]:
    """Feed records to a (new) state without Kafka (no windows: those are faust's); the state and every alert."""
    state = state or MonitorState()
    alerts: list[dict] = []
    for rec in records:
        alerts.extend(state.ingest(rec))
    return state, alerts
