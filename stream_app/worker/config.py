"""The worker's settings: how it batches, evaluates, commits and reports."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Literal

from stream_app.core.events import MAX_CLOCK_SKEW

# What a worker does with a partition whose stored offset is past the log's end (the broker lost its log):
# stop it and tell the operator, or carry the model state over and learn the log from its start or its end.
OffsetGapPolicy = Literal["stop", "earliest", "latest"]
OFFSET_GAP_POLICIES: tuple[str, ...] = ("stop", "earliest", "latest")


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker batches, evaluates and reports."""

    models: tuple[str, ...] = ("pop",)
    batch_size: int = 256  # events per micro-batch: evaluated, then learned
    max_wait_ms: int = 20  # a poll's wait for events (and the broker's for a fetch): a fresh event waits for no more
    commit_max: int = 8192  # events per poll and Redis commit at most: a backlog commits several micro-batches at once
    commit_interval_ms: int = 20  # a busy stream's learning reaches Redis within this (an idle one's at once)
    commit_share: float = 0.1  # ... and sooner when commits are cheap: they may take this share of the time
    sample_rate: float = 0.1
    k: int = 20
    window: int = 10_000
    metrics_every: int = 1000  # evaluated events between metric records
    metrics_interval: float = 5.0  # ... or seconds
    dedup_window: int = 100_000
    session_gap: float = 1800.0  # a user's implicit session ends after this idle time; sessions expire after it
    idle_expiry: float | None = None  # users and items idle this long (stream time, s) are expired; None: never
    on_offset_gap: OffsetGapPolicy = "stop"
    max_clock_skew: float | None = MAX_CLOCK_SKEW  # events with ts further ahead of this host's clock are dead letters; None: any
    shared_items: bool = False  # one item vocabulary and item state for all partitions (README "Scale-out")
    fold_interval_ms: int = 200  # shared items: how often the other partitions' item changes are folded in
    # Shared items: a partition learns no event more than this many seconds of stream time (event `ts`) later
    # than the slowest partition with events to learn, and waits for it (README "Scale-out"); None: no alignment.
    align_slack: float | None = 3600.0
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    seed: int = 0
