"""The event streams the quality benchmarks replay."""

from __future__ import annotations

from pathlib import Path

from producers.readers import read_events
from producers.synthetic import SyntheticConfig, generate
from stream_app.core.events import Event

MOVIELENS = Path(__file__).resolve().parent.parent / "../shared/data/ml-latest-small/ratings.csv"
PROTOCOLS = {"exclude-seen": True, "include-seen": False}  # name -> Evaluator(exclude_seen=...)


def movielens(path: str | Path = MOVIELENS, limit: int | None = None) -> list[Event]:
    """MovieLens ratings as click events (value = rating) in time order, via the project's reader."""
    events = list(read_events(path, "movielens", sort_by_time=True))
    return events[:limit] if limit else events


def synthetic(n_events: int = 60_000) -> list[Event]:
    """The project's synthetic stream (default config, seed 0): sessions, device effects, re-views."""
    return list(generate(SyntheticConfig(), n_events, seed=0))
