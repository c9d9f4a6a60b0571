"""Replay events into Kafka at a given rate: `streamrec produce` and the reusable `replay`.

    stats = replay(events, producer, rate=500, limit=10_000, progress=True)
    print(stats.summary())

`produce_cli` is what `streamrec produce` calls: it opens the file (or the
synthetic stream), makes sure the events topic exists, replays, and returns
a one-line summary.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from producers.readers import EventReader, ReadReport
from stream_app.core.errors import ConfigError
from stream_app.core.events import Event

__all__ = ["ReplayStats", "replay", "produce_cli", "SYNTHETIC_DEFAULT_EVENTS"]

# `--synthetic` with neither --limit nor --rate sends this many events
# (with --rate and no --limit the stream is endless, until Ctrl-C).
SYNTHETIC_DEFAULT_EVENTS = 100_000
_PROGRESS_EVERY_S = 0.1


@dataclass
class ReplayStats:
    """What a replay did. `bad` is the reader's report when the events came from a file."""

    sent: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    source: str = ""
    destination: str = ""
    bad: ReadReport | None = field(default=None)

    @property
    def events_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def summary(self, reasons: int = 3) -> str:
        parts = [
            f"sent {self.sent:,} events" + (f" from {self.source}" if self.source else "")
            + (f" to {self.destination}" if self.destination else ""),
            f"in {self.seconds:.2f} s ({self.events_per_s:,.0f} events/s)",
        ]
        text = " ".join(parts)
        if self.bad is not None:
            text += "; " + self.bad.describe(reasons)
        if self.interrupted:
            text += "; interrupted before the end"
        return text


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} events/s" if speed else "- events/s", style="progress.data.speed")


def _progress_bar() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def replay(
    events: Iterable[Event | dict[str, Any]],
    producer: Any,
    rate: float | None = None,
    limit: int | None = None,
    progress: bool | Progress | Callable[[int, float], None] | None = None,
    *,
    stop: threading.Event | None = None,
    description: str = "producing",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplayStats:
    """Send `events` through `producer` (anything with `send(event)`), paced and bounded.

    * `rate`: events per second (None: as fast as possible). Pacing keeps the
      *average* at `rate` from the start (event n goes out at start + n/rate),
      so a slow moment is caught up, never exceeded.
    * `limit`: stop after this many events (None: when `events` ends).
    * `progress`: True shows a rich progress bar with events/s on stderr; a
      rich `Progress` gets a task added (for a caller's own live display); a
      callable gets `(sent, seconds)` about every 0.1 s and at the end.
    * `stop`: a `threading.Event`; setting it ends the replay early
      (`interrupted=True`). Ctrl-C does the same.

    The producer is neither flushed nor closed here: the caller owns it.
    """
    if rate is not None and not rate > 0:
        raise ConfigError(f"rate must be a positive number of events per second (got {rate})")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0 (got {limit})")
    stats = ReplayStats()
    report: Callable[[int, float], None] | None = None
    own_bar: Progress | None = None
    if progress is True:
        own_bar = _progress_bar()
        progress = own_bar
    if isinstance(progress, Progress):
        bar = progress
        task = bar.add_task(description, total=limit)

        def report(sent: int, seconds: float) -> None:
            bar.update(task, completed=sent)
    elif callable(progress):
        report = progress

    start = clock()
    next_report = start
    try:
        if own_bar is not None:
            own_bar.start()
        if limit == 0:
            return stats
        for event in events:
            if stop is not None and stop.is_set():
                stats.interrupted = True
                break
            if rate is not None:
                due = start + stats.sent / rate
                ahead = due - clock()
                if ahead > 0.001:
                    sleep(ahead)
            producer.send(event)
            stats.sent += 1
            if report is not None:
                now = clock()
                if now >= next_report:
                    report(stats.sent, now - start)
                    next_report = now + _PROGRESS_EVERY_S
            if limit is not None and stats.sent >= limit:
                break
    except KeyboardInterrupt:
        stats.interrupted = True
    finally:
        stats.seconds = clock() - start
        if report is not None:
            report(stats.sent, stats.seconds)
        if own_bar is not None:
            own_bar.stop()
    return stats


def produce_cli(
    settings: Any,
    input: Path | None = None,
    format: str = "auto",
    synthetic: bool = False,
    rate: float | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> str:
    """`streamrec produce`: replay a file (`input`) or the synthetic stream; returns the summary line.

    MovieLens files are replayed in time order (their `ratings.csv` is ordered
    by user); jsonl and csv in file order. `--synthetic` without `--limit`
    and `--rate` sends `SYNTHETIC_DEFAULT_EVENTS` events; with `--rate` and
    no `--limit` it runs until Ctrl-C. The progress bar is drawn on stderr
    when stderr is a terminal.
    """
    from producers.producer import EventProducer
    from producers.synthetic import SyntheticConfig, generate
    from stream_app.io.kafka import ensure_topics, target

    if (input is None) == (not synthetic):
        raise ConfigError("give exactly one of --input FILE or --synthetic")
    if rate is not None and not rate > 0:
        raise ConfigError(f"--rate must be a positive number of events per second (got {rate})")
    if limit is not None and limit < 0:
        raise ConfigError(f"--limit must be >= 0 (got {limit})")

    report: ReadReport | None = None
    if input is not None:
        reader = EventReader(input, format)
        reader.sort_by_time = reader.format == "movielens"
        report = reader.report
        events: Iterable[Event] = reader
        source = f"{input} ({reader.format}{', sorted by time' if reader.sort_by_time else ''})"
    else:
        n = limit if limit is not None else (None if rate is not None else SYNTHETIC_DEFAULT_EVENTS)
        events = generate(SyntheticConfig(), n, seed)
        source = f"the synthetic stream (seed {seed})"

    ensure_topics(target(settings), {settings.events_topic: settings.events_partitions})
    start = time.monotonic()
    with EventProducer(settings) as producer:
        stats = replay(events, producer, rate=rate, limit=limit, progress=sys.stderr.isatty())
    stats.seconds = time.monotonic() - start  # including the final flush: events/s counts delivered events
    stats.source = source
    stats.destination = f"{settings.events_topic!r} at {settings.kafka_bootstrap}"
    stats.bad = report
    return stats.summary()
