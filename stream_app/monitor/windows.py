"""Windowed aggregation: the values the faust windowed tables hold, and how a window is shown.

A window's value is an accumulator of metric records (count, per-metric sums, counts and
maxima, events seen). It is plain JSON because it goes to the table's changelog topic.
"""

from __future__ import annotations

from typing import Any

VALUES = ("recall", "auc", "mrr")  # the metrics averaged per window
ALL = "all"  # event-type key of the whole-model aggregates
KINDS = ("tumbling", "hopping")
GROUPS = ("model", "type", "lag")  # window keys: model | (model, event type) | "total" / "p<partition>"


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
