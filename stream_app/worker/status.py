"""`streamrec status`: where each partition of `events` stands, read from what the workers store in Redis
and from the broker's log.

Per partition: the owner (worker id and fencing token of the last claim), the stored offset (the next
event its state will learn), the log's start and end offsets, the lag, and the age of the last commit
(Redis server time on both sides, so clocks of other hosts do not matter). A problem is named:

- `offset gap`: the stored offset is past the log's end; the broker lost events the state has learned
  (an in-memory broker restarted), and new events below the stored offset would be skipped;
- `truncated`: the stored offset is below the log's start; events were deleted before they were learned;
- `no log`: Redis holds state for a partition the broker does not have;
- `stalled`: events wait (lag > 0) and the partition has not committed (or been claimed) for `stale_after` s.

Which workers hold partitions comes from the same state. The consumer group cannot tell it on the
embedded broker: Tansu's DescribeGroups answers member ids only, without client id, host or assignment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rich import box
from rich.console import Console
from rich.table import Table

from stream_app.core.settings import Settings
from stream_app.io import kafka
from stream_app.io.redis import FAILURES, Client, Keys, connect, unreachable

OFFSET_GAP, TRUNCATED, NO_LOG, STALLED = "offset gap", "truncated", "no log", "stalled"
STALE_AFTER = 60.0  # seconds without a commit while events wait


@dataclass(frozen=True)
class PartitionStatus:
    """One partition of the events topic, as its stored state and the broker's log show it."""

    partition: int
    worker: str | None  # worker id of the last claim (None: never claimed: unclaimed)
    token: int | None  # its fencing token
    offset: int | None  # stored next offset (None: nothing committed; a worker starts at the log's start)
    log_start: int | None  # None: the broker has no such partition
    log_end: int | None
    lag: int | None  # events in the log the state has not learned
    applied: int  # events learned so far
    version: int  # commits so far
    claim_age: float | None  # seconds since the last claim
    commit_age: float | None  # seconds since the last commit (None: never)
    problem: str | None  # one of the names above, or None

    @property
    def claimed(self) -> bool:
        return self.token is not None


def pending(row: PartitionStatus, on_offset_gap: str) -> bool:
    """True when a worker whose policy at an offset gap is `on_offset_gap` would have work on `row`: events
    to learn (a truncated log is learned from its start), or a gap its policy resolves (any but "stop")."""
    if row.problem == OFFSET_GAP:
        return on_offset_gap != "stop"
    return bool(row.lag) and row.problem in (None, STALLED, TRUNCATED)


@dataclass(frozen=True)
class WorkerStatus:
    """A worker id found in the stored state and the partitions it claimed last."""

    worker: str
    partitions: list[int]
    commit_age: float | None  # its most recent commit over those partitions


_FIELDS = ("owner", "worker", "offset", "applied", "version", "claimed_at", "committed_at")


def _stored(client: Client, settings: Settings, partitions: list[int]) -> tuple[float, list[list]]:
    """Redis TIME and, per partition, the values of `_FIELDS`: two round trips (a cluster pipeline
    cannot carry TIME, a command of no key)."""
    sec, usec = client.time()
    pipe = client.pipeline(transaction=False)
    for p in partitions:
        keys = Keys(settings.key_prefix, settings.events_topic, p)
        for name in _FIELDS:
            pipe.get(getattr(keys, name))
    values = pipe.execute()
    n = len(_FIELDS)
    return sec + usec / 1e6, [values[j * n : (j + 1) * n] for j in range(len(partitions))]


def _lag_and_problem(offset: int | None, bounds: tuple[int, int] | None, quiet: float | None,
                     stale_after: float) -> tuple[int | None, str | None]:
    """`quiet`: seconds since the owner's last commit or claim (None: unclaimed)."""
    if bounds is None:
        return None, NO_LOG
    start, end = bounds
    if offset is not None and offset > end:
        return 0, OFFSET_GAP
    if offset is not None and offset < start:
        return end - start, TRUNCATED
    lag = end - (start if offset is None else offset)  # no stored offset: a worker starts at the log's start
    return lag, STALLED if lag and quiet is not None and quiet > stale_after else None


def _row(p: int, now: float, stored: list, bounds: tuple[int, int] | None, stale_after: float) -> PartitionStatus:
    owner, worker, offset, applied, version, claimed_at, committed_at = stored
    claim_age, commit_age = (None if raw is None else max(0.0, now - float(raw)) for raw in (claimed_at, committed_at))
    quiet = None if owner is None else min((a for a in (claim_age, commit_age) if a is not None), default=0.0)
    lag, problem = _lag_and_problem(None if offset is None else int(offset), bounds, quiet, stale_after)
    return PartitionStatus(
        partition=p, worker=None if owner is None else (worker or b"?").decode(), token=None if owner is None else int(owner),
        offset=None if offset is None else int(offset), log_start=bounds[0] if bounds else None,
        log_end=bounds[1] if bounds else None, lag=lag, applied=int(applied or 0), version=int(version or 0),
        claim_age=claim_age, commit_age=commit_age, problem=problem,
    )


def partition_status(settings: Settings, stale_after: float | None = None) -> list[PartitionStatus]:
    """Every partition of the events topic, plus any the broker lacks but Redis holds state for
    (up to `events_partitions`); `stale_after` defaults to STALE_AFTER. Raises `ServiceError` when Kafka
    or Redis does not answer."""
    kafka.wait_for_broker(kafka.target(settings), timeout=5.0)  # a broker that is down fails fast, not in 30 s
    bounds = kafka.log_bounds(kafka.target(settings), settings.events_topic)
    candidates = sorted(set(bounds) | set(range(settings.events_partitions)))
    client = connect(settings.redis_url)
    try:
        now, stored = _stored(client, settings, candidates)
    except FAILURES as exc:
        raise unreachable(settings.redis_url, exc) from None
    finally:
        client.close()
    return [_row(p, now, values, bounds.get(p), STALE_AFTER if stale_after is None else stale_after)
            for p, values in zip(candidates, stored) if p in bounds or any(v is not None for v in values)]


def worker_status(rows: list[PartitionStatus]) -> list[WorkerStatus]:
    """The workers that own partitions according to the stored state, by worker id."""
    owned: dict[str, list[PartitionStatus]] = {}
    for row in rows:
        if row.worker is not None:
            owned.setdefault(row.worker, []).append(row)
    return [WorkerStatus(worker, [r.partition for r in mine],
                         min((r.commit_age for r in mine if r.commit_age is not None), default=None))
            for worker, mine in sorted(owned.items())]


def as_json(settings: Settings, rows: list[PartitionStatus]) -> dict:
    """The machine-readable status: topic, partitions (every field of `PartitionStatus`) and workers."""
    return {"topic": settings.events_topic, "partitions": [asdict(r) for r in rows],
            "workers": [asdict(w) for w in worker_status(rows)]}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def render(settings: Settings, rows: list[PartitionStatus], console: Console | None = None) -> None:
    """Print the partitions and the workers holding them as rich tables."""
    console = console or Console()
    show = lambda v: "-" if v is None else str(v)  # noqa: E731
    table = Table(title=f"partitions of {settings.events_topic} (Redis prefix {settings.key_prefix})",
                  box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    for col in ("part", "owner", "token", "stored\noffset", "log\nstart", "log\nend", "lag", "applied", "last\ncommit"):
        table.add_column(col, justify="left" if col in ("owner", "last\ncommit") else "right", no_wrap=col != "owner",
                         overflow="fold", min_width=8 if col == "owner" else None)
    table.add_column("problem", no_wrap=True, min_width=len(OFFSET_GAP))
    for r in rows:
        owner = r.worker if r.claimed else "[dim]unclaimed[/dim]"
        problem = f"[bold red]{r.problem}[/bold red]" if r.problem else "[green]ok[/green]"
        table.add_row(str(r.partition), owner, show(r.token), show(r.offset), show(r.log_start), show(r.log_end),
                      show(r.lag), str(r.applied), _age(r.commit_age), problem)
    console.print(table)
    workers = worker_status(rows)
    if not workers:
        console.print("no worker has claimed a partition yet")
    for w in workers:
        console.print(f"worker {w.worker} holds partitions {', '.join(map(str, w.partitions))}; "
                      f"last commit {_age(w.commit_age)} ago")
    if not rows:
        console.print(f"topic {settings.events_topic} has no partitions on {settings.kafka_bootstrap}")
