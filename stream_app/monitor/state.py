"""The monitor's state: everything the dashboard and the terminal view show; thread-safe, no Kafka.

It takes metric records (one JSON record per worker and model) and lag samples, pools workers per model,
keeps a bounded history per model, the lag history, the windows copied from the faust
tables, the drift alerts, and a numbered log of change events for the dashboard's SSE
stream. events/s comes from `events_seen` deltas per (worker, model).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stream_app.monitor.drift import DRIFT_METRICS, DriftWatcher
from stream_app.monitor.pooling import latest_by_model
from stream_app.monitor.windows import ALL, KINDS, VALUES, check_windows, window_row

if TYPE_CHECKING:
    from stream_app.monitor.history import RedisHistory

log = logging.getLogger("streamrec.monitor")


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

    The windows (`put_windows`) are written by the faust app from its windowed tables.
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
            log.warning("skipping a metric record without model or ts: %.200r", rec)
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
                log.warning("could not store monitor history of %s: %s", model, exc)
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
            except Exception as exc:  # history is best effort; the live view goes on
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
        """The change events after `seq`; one "reset" event when some of them are no longer kept."""
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


def replay(records: Iterable[dict], state: MonitorState | None = None) -> tuple[MonitorState, list[dict]]:
    """Feed records to a (new) state without Kafka (no windows: those are faust's); the state and every alert."""
    state = state or MonitorState()
    alerts: list[dict] = []
    for rec in records:
        alerts.extend(state.ingest(rec))
    return state, alerts
