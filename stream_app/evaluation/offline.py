"""`streamrec evaluate`: the worker's featurizer, models and evaluator over a file, no Kafka or Redis."""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from models.features import Featurizer
from models.registry import create, parse_names
from producers.readers import ReadReport, read_events
from stream_app.evaluation.prequential import Evaluator, run

stderr = Console(stderr=True)


def evaluate_file(
    path: Path,
    format: str = "auto",
    models: str = "pop",
    k: int = 20,
    batch_size: int = 1,
    exclude_seen: bool = True,
    sort: bool = True,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Prequential metrics of each model over the file's events, as `streamrec evaluate --json` prints them."""
    names = parse_names(models)
    report = ReadReport()
    events = list(itertools.islice(read_events(path, format, sort_by_time=sort, report=report), limit))
    built = {name: create(name, seed=seed) for name in names}
    evaluator = Evaluator(k=k, window=len(events) or 1, exclude_seen=exclude_seen, seed=seed)
    start = time.perf_counter()
    with Progress(
        TextColumn("evaluating {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr, disable=not progress or not sys.stderr.isatty(), transient=True,
    ) as bar:
        task = bar.add_task(",".join(names), total=len(events))
        run(events, built, Featurizer(), evaluator, batch_size, progress=lambda n: bar.advance(task, n))
    seconds = time.perf_counter() - start
    per_model = {}
    for name in names:
        s = evaluator.summary(name)
        per_model[name] = {m: s.get(m) for m in ("recall", "auc", "mrr", "ndcg", "precision", "f1")}
        per_model[name].update(evaluated=s.get("evaluated", 0), cold_start=s["cold_start"], repeat=s["repeat"],
                               by_event_type=s["by_event_type"])
    first = per_model[names[0]]
    return {
        **{m: first[m] for m in ("recall", "auc", "mrr", "ndcg")},
        "model": names[0],
        "k": k,
        "events": len(events),
        "evaluated": first["evaluated"],
        "cold_start": first["cold_start"],
        "repeat": first["repeat"],
        "exclude_seen": exclude_seen,
        "batch": batch_size,
        "seconds": round(seconds, 3),
        "events_per_s": round(len(events) / seconds, 1) if seconds > 0 else None,
        "bad_rows": report.bad,
        "models": per_model,
    }


def result_table(result: dict) -> None:
    """Print an evaluate result as a table."""
    seen = "seen items excluded" if result["exclude_seen"] else "seen items included"
    table = Table(title=f"prequential metrics, k={result['k']}, batch={result['batch']}, {result['events']} events, {seen}")
    for col in ("model", "recall", "auc", "mrr", "ndcg", "evaluated", "cold start", "repeat"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, m in result["models"].items():
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        table.add_row(name, fmt(m["recall"]), fmt(m["auc"]), fmt(m["mrr"]), fmt(m["ndcg"]), str(m["evaluated"]),
                      str(m["cold_start"]),
                      str(m["repeat"]))
    Console().print(table)
    Console().print(f"{result['seconds']} s, {result['events_per_s']} events/s; {result['bad_rows']} bad rows skipped")
