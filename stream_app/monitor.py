"""The metrics monitor: windowed aggregates, drift alerts, bounded history, served live.

Layout (the Kafka part is thin on purpose; everything else is testable without a broker):

- `WindowedAggregate`: tumbling (step == size) and hopping (step < size) windows over
  record time (`ts`) per key, holding count and means of recall/AUC/MRR and events/s.
- `DriftWatcher`: one `river.drift.ADWIN` per (model, metric) on recall and AUC; a
  detected *drop* becomes an alert `{"ts","model","metric","before","after","detector"}`.
- `MonitorState`: ingests metric records (DESIGN.md section 5), pools workers per model
  (`metrics_view.latest_by_model`), keeps a bounded per-model history, the windows,
  the alerts, and a sequence of change events for the dashboard's SSE stream.
- `RedisHistory`: the bounded history in Redis (one capped list per model plus one for
  alerts), reloaded when the monitor restarts so charts and detectors resume.
- `build_app` / `run`: a faust-streaming app whose one agent feeds `metrics` records to
  the state and sends alerts to the alerts topic; the dashboard (uvicorn, a thread) or a
  rich terminal view shows the state.

Consumer lag is not in the metric records, so it is not shown; events/s comes from
`events_seen` deltas per (worker, model).
"""

from __future__ import annotations

import logging
import os
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import orjson

from stream_app.metrics_view import latest_by_model

log = logging.getLogger("streamrec.monitor")

VALUES = ("recall", "auc", "mrr")
DRIFT_METRICS = ("recall", "auc")
ALL = "all"  # event-type key of the whole-model aggregates


# --------------------------------------------------------------------------- windows

@dataclass
class _Acc:
    n: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    events: int = 0


class WindowedAggregate:
    """Windows of `size` seconds starting every `step` seconds (tumbling when step == size).

    A record at time t belongs to every window [start, start + size) with start a
    multiple of `step`. Only the `keep` most recent windows per key are kept.
    """

    def __init__(self, size: float, step: float | None = None, keep: int = 120):
        self.size = float(size)
        self.step = float(step or size)
        if self.step <= 0 or self.step > self.size:
            raise ValueError("need 0 < step <= size")
        self.keep = keep
        self._windows: dict[Any, dict[float, _Acc]] = {}

    @property
    def kind(self) -> str:
        return "tumbling" if self.step == self.size else "hopping"

    def starts(self, ts: float) -> list[float]:
        last = math.floor(ts / self.step) * self.step
        out = []
        start = last
        while start > ts - self.size:
            out.append(round(start, 9))
            start -= self.step
        return sorted(out)

    def add(self, key: Any, ts: float, values: dict[str, float | None], events: int = 0) -> None:
        windows = self._windows.setdefault(key, {})
        for start in self.starts(ts):
            acc = windows.get(start)
            if acc is None:
                acc = windows[start] = _Acc()
            acc.n += 1
            acc.events += events
            for name, v in values.items():
                if v is not None:
                    acc.sums[name] = acc.sums.get(name, 0.0) + float(v)
                    acc.counts[name] = acc.counts.get(name, 0) + 1
        if len(windows) > self.keep:
            for start in sorted(windows)[: len(windows) - self.keep]:
                del windows[start]

    def keys(self) -> list[Any]:
        return list(self._windows)

    def windows(self, key: Any) -> list[dict]:
        """One dict per window of `key`, oldest first: start, end, n, means, events_per_s."""
        out = []
        for start, acc in sorted(self._windows.get(key, {}).items()):
            row: dict[str, Any] = {"start": start, "end": start + self.size, "n": acc.n,
                                   "events_per_s": acc.events / self.size}
            for name, total in acc.sums.items():
                row[name] = total / acc.counts[name]
            out.append(row)
        return out


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

    def load(self) -> tuple[dict[str, list[dict]], list[dict]]:
        models = sorted(m.decode() for m in self.client.smembers(f"{self.base}:models"))
        points = {m: [orjson.loads(x) for x in self.client.lrange(f"{self.base}:history:{m}", 0, -1)] for m in models}
        alerts = [orjson.loads(x) for x in self.client.lrange(f"{self.base}:alerts", 0, -1)]
        return points, alerts


# --------------------------------------------------------------------------- state

class MonitorState:
    """Everything the dashboard and the terminal view show; thread-safe; no Kafka."""

    def __init__(self, tumbling: float = 10.0, hopping: tuple[float, float] = (30.0, 10.0),
                 history: int = 2000, drift: DriftWatcher | None = None, store: RedisHistory | None = None,
                 topic: str = "metrics"):
        self.lock = threading.Lock()
        self.topic = topic
        self.tumbling = WindowedAggregate(tumbling)
        self.hopping = WindowedAggregate(*hopping)
        self.history_cap = history
        self.series: dict[str, deque] = {}
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
        points, alerts = self.store.load()
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
        return sum(len(p) for p in points.values())

    def ingest(self, rec: dict) -> list[dict]:
        """Take one metric record; return the alerts it raised."""
        model, worker = rec.get("model"), rec.get("worker", "?")
        if not model or rec.get("ts") is None:
            return []
        ts = float(rec["ts"])
        key = (worker, model)
        alerts: list[dict] = []
        with self.lock:
            last = self._last_seen.get(key)
            if last is not None and ts <= last[0]:
                return []  # replayed after a restart: already in the history
            seen = int(rec.get("events_seen") or 0)
            delta = max(0, seen - last[1]) if last is not None else 0
            rate = delta / (ts - last[0]) if last is not None and ts > last[0] else 0.0
            self._last_seen[key] = (ts, seen)
            self.latest[key] = rec
            self.records += 1
            values = {name: rec.get(name) for name in VALUES}
            for agg in (self.tumbling, self.hopping):
                agg.add((model, ALL), ts, values, delta)
                for etype, sub in (rec.get("by_event_type") or {}).items():
                    agg.add((model, etype), ts, {name: sub.get(name) for name in VALUES})
            pooled = latest_by_model({k: v for k, v in self.latest.items() if k[1] == model}).get(model, {})
            point = {"ts": ts, "worker": worker, "worker_events_seen": seen, "events_per_s": rate,
                     "evaluated": pooled.get("evaluated"), "events_seen": pooled.get("events_seen"),
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
        return alerts

    def events_since(self, seq: int) -> list[dict]:
        with self.lock:
            if self._log and self._log[0][0] > seq + 1:
                return [{"type": "reset", "seq": self.seq}]
            return [e for s, e in self._log if s > seq]

    def rows(self) -> dict[str, dict]:
        with self.lock:
            return latest_by_model(dict(self.latest))

    def snapshot(self) -> dict:
        with self.lock:
            def windows(agg: WindowedAggregate) -> dict:
                out: dict[str, dict[str, list]] = {}
                for model, etype in agg.keys():
                    out.setdefault(model, {})[etype] = agg.windows((model, etype))[-30:]
                return {"size": agg.size, "step": agg.step, "by_model": out}

            return {
                "topic": self.topic, "seq": self.seq, "records": self.records,
                "models": sorted(self.series),
                "latest": latest_by_model(dict(self.latest)),
                "series": {m: list(s) for m, s in sorted(self.series.items())},
                "tumbling": windows(self.tumbling), "hopping": windows(self.hopping),
                "alerts": list(self.alerts),
            }


# --------------------------------------------------------------------------- terminal view

def terminal_renderable(state: MonitorState):
    from rich.console import Group
    from rich.table import Table

    from stream_app.metrics_view import table

    rows = state.rows()
    snap_windows = {}
    with state.lock:
        for model in rows:
            w = state.tumbling.windows((model, ALL))
            snap_windows[model] = w[-1] if w else None
        alerts = list(state.alerts)[-8:]
    main = table(rows, f"streamrec monitor ({state.topic}, {state.records} records)")
    win = Table(title=f"last {state.tumbling.size:g}s tumbling window")
    for col in ("model", "records", "recall", "auc", "mrr", "events/s"):
        win.add_column(col, justify="left" if col == "model" else "right")
    for model, w in snap_windows.items():
        if w:
            win.add_row(model, str(w["n"]), *(f"{w[c]:.4f}" if c in w else "-" for c in VALUES), f"{w['events_per_s']:.1f}")
    al = Table(title="alerts (drops found by ADWIN)")
    for col in ("time", "model", "metric", "before", "after"):
        al.add_column(col)
    for a in alerts:
        al.add_row(time.strftime("%H:%M:%S", time.localtime(a["ts"])), a["model"], a["metric"],
                   f"{a['before']:.4f}", f"{a['after']:.4f}")
    return Group(main, win, al)


# --------------------------------------------------------------------------- faust app

def build_app(settings, state: MonitorState, on_alert: Callable[[dict], None] | None = None):
    """The faust app: one agent on the metrics topic; alerts go to the alerts topic."""
    import faust

    data_dir = settings.state_dir / "monitor"
    data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"streamrec-monitor-{settings.metrics_topic}",
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

    @app.agent(metrics)
    async def consume(stream):
        async for value in stream:
            try:
                rec = orjson.loads(value)
            except (orjson.JSONDecodeError, TypeError):
                continue
            if not isinstance(rec, dict):
                continue
            for alert in state.ingest(rec):
                log.warning("drift alert: %s", alert)
                await alerts_topic.send(key=alert["model"].encode(), value=orjson.dumps(alert))
                if on_alert:
                    on_alert(alert)

    return app


def make_state(settings, history: int = 2000) -> MonitorState:
    store = None
    try:
        store = RedisHistory(settings.redis_url, settings.key_prefix, settings.metrics_topic, cap=history)
    except Exception as exc:
        log.warning("Redis at %s unavailable (%s): history will not survive a restart", settings.redis_url, exc)
    state = MonitorState(history=history, store=store, topic=settings.metrics_topic)
    n = state.restore()
    if n:
        log.info("restored %d history points from Redis", n)
    return state


def run(settings, host: str = "127.0.0.1", port: int = 8050, terminal: bool = False) -> None:
    """Run the monitor until interrupted: faust in the main thread, dashboard or terminal view aside."""
    import faust

    from stream_app import kafka

    kafka.wait_for_broker(settings.kafka_bootstrap)
    kafka.ensure_topics(settings.kafka_bootstrap, {settings.metrics_topic: 1, settings.alerts_topic: 1})
    state = make_state(settings)
    app = build_app(settings, state)
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
        from stream_app.dashboard import serve_in_thread

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
    """Feed records to a (new) state without Kafka; the state and every alert raised."""
    state = state or MonitorState()
    alerts: list[dict] = []
    for rec in records:
        alerts.extend(state.ingest(rec))
    return state, alerts
