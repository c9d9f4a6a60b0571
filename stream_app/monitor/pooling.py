"""Pooling metric records: the latest record of each worker into one row per model."""

from __future__ import annotations

COLUMNS = ("recall", "auc", "mrr", "ndcg", "precision", "f1")  # averaged, weighted by evaluated events


def latest_by_model(records: dict[tuple[str, str], dict]) -> dict[str, dict]:
    """Pool the latest record of each (worker, model) into one row per model (weighted by evaluated events)."""
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
