"""The stream worker: Kafka micro-batches -> validate -> evaluate-then-learn -> Redis, exactly once.

Each Kafka partition of `events` is a shard with its own models, vocabularies
and evaluator; its state lives under the partition's Redis hash tag together
with the next offset to read (see `stream_app.io.redis`). On assignment the
worker claims the partition (fencing any earlier owner), loads its state and
seeks to the stored offset; Kafka commits are made for lag monitoring only.

Faults (README "Failure modes"): when Redis (or Kafka, for dead letters) fails, the worker drops what
it has not committed, pauses its partitions, keeps its group membership and reloads them from Redis
with backoff. A stored offset past the log's end (a broker that lost its log) is an offset gap,
handled by `WorkerConfig.on_offset_gap`, never skipped silently.
"""

from __future__ import annotations

import gc
import heapq
import logging
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from models.registry import parse_names
from stream_app.core.errors import (
    FencedError,
    InvalidEvent,
    MessageRefused,
    ServiceError,
    StreamrecError,
)
from stream_app.core.events import decode
from stream_app.core.settings import Settings
from stream_app.core.threads import limit_blas_threads
from stream_app.evaluation.prequential import summary
from stream_app.io import kafka
from stream_app.io.redis import Keys, PartitionStore, connect, exchange_stream_times, reachable
from stream_app.worker import dead_letters
from stream_app.worker.config import WorkerConfig
from stream_app.worker.shard import STEPS, Shard
from stream_app.worker.status import OFFSET_GAP, STALLED, partition_status, pending

log = logging.getLogger("streamrec.worker")
EXCHANGE_EVENTS = 64  # shared items: events learned between checks for a due fold and commit within a poll
RETRY_FIRST, RETRY_MAX = 0.5, 10.0  # seconds between attempts to reload partitions while Redis or Kafka is down
GAP_CHECK_EVERY = 30.0  # seconds between checks, when idle, of the owned partitions against the log's end
DRAIN_CHECK_EVERY = 2.0  # seconds between checks, once idle for `max_idle`, that no partition lags
REJOIN_AFTER = 20.0  # seconds without a partition, while others stall, before a member unwedges its group
REMIND_EVERY = 30.0  # seconds between reminders of stopped partitions, or of holding none
# A poll takes at most as many events as the worker learns in this share of the max poll interval: a
# worker learning slowly (many models at batch 1) must poll again before the group counts it gone.
POLL_SHARE = 0.25
FIRST_POLL = 256  # events of the first poll, before the learning speed is known
ALIGN_EVERY = 0.02  # shared items: seconds between exchanges of the partitions' stream times (`align_slack`)
# the same (and a poll's longest wait) while a partition of this worker is held, or while its stream time runs
# (a backlog): a held partition's release waits for an exchange, of its own worker and of the others
ALIGN_EVERY_HELD = 0.002
ALIGN_STALE = 10.0  # seconds a partition's stream time may stand still before it holds no other partition back


def stream_order(polled: list[kafka.Messages], size: int, slack: float | None = None
                 ) -> Iterator[tuple[kafka.Messages, list[float]]]:
    """A poll's messages in runs of one partition, with their event times, across partitions in stream-time
    order: each time a run of the partition whose next message is earliest (by its `ts`; one that does not
    decode counts as earliest, on its way to the dead letters), of at most `size` messages and, with `slack`,
    none more than `slack` seconds later than the next message of any other partition."""
    times = [[_ts(value) for value in messages.values] for messages in polled]
    heads = [(t[0], j, 0) for j, t in enumerate(times) if t]
    heapq.heapify(heads)
    while heads:
        _, j, start = heapq.heappop(heads)
        t, stop = times[j], min(start + size, len(times[j]))
        limit = heads[0][0] + slack if heads and slack is not None else float("inf")
        end = start + 1
        while end < stop and t[end] <= limit:
            end += 1
        yield polled[j][start:end], t[start:end]
        if end < len(t):
            heapq.heappush(heads, (t[end], j, end))


def _ts(value: bytes) -> float:
    try:
        return decode(value).ts
    except InvalidEvent:
        return -float("inf")


class Worker:
    """Consumes `events` in a consumer group and keeps its partitions' state in Redis."""

    def __init__(self, settings: Settings, config: WorkerConfig = WorkerConfig()):
        parse_names(",".join(config.models))
        self.settings = settings
        self.config = config
        self.shards: dict[int, Shard] = {}
        self.redis = connect(settings.redis_url)
        self.sender = kafka.Sender(kafka.target(settings))
        self.consumer: kafka.GroupConsumer | None = None
        self.waiting: set[int] = set()  # assigned, not loaded: Redis or Kafka down, or stopped at an offset gap
        self.stopped: dict[int, dict] = {}  # partitions stopped at an offset gap -> their alert
        self.gaps = 0  # offset gaps met
        self._down_since: float | None = None  # when Redis or Kafka failed (monotonic); None: up
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST
        self._gaps_checked_at = time.monotonic()
        self._unassigned_since = time.monotonic()
        self._joined_at = time.monotonic()
        self._drain_checked_at = 0.0
        self._reminded_at = time.monotonic()
        self._folded_at = time.monotonic()
        self.held: dict[int, float] = {}  # paused for being too far ahead in stream time -> its next event's ts
        self._aligned_at = 0.0
        self._aligned_floor = -float("inf")  # the slowest stream time of this worker's busy partitions, last exchanged
        self._others: dict[int, float] = {}  # stream time of the other workers' partitions that hold others back
        self._own_work: set[int] = set()  # this worker's partitions with events to learn (or not known not to)
        self._moved: dict[int, tuple[float, float]] = {}  # partition -> its stream time, when it was first seen
        self._event_seconds: float | None = None  # learning time per event, moving average of the polls
        self.running = True
        self.applied = 0
        self.dead = 0
        self.started_at: float | None = None  # first assignment (monotonic)
        self.freshness: deque[float] = deque(maxlen=200_000)  # seconds from event ts to its Redis commit
        self.seconds = dict.fromkeys(STEPS, 0.0)  # wall time per step of `Shard.process`, all shards
        self._evaluated_at_report = 0
        self._reported_at = time.monotonic()

    def assign(self, partitions: list[int]) -> dict[int, int | None]:
        """Claim and load newly assigned partitions; returns the offsets to resume from (those that
        cannot be loaded now stay `waiting`, paused)."""
        self.waiting.update(partitions)
        starts = self._load(partitions)
        if self.consumer is not None:  # a partition paused before a rebalance that gave it back stays paused
            self.consumer.resume(starts)
        self._own_work.update(starts)  # events to learn, for all this worker knows before its next exchange
        if partitions and self.started_at is None:
            self.started_at = time.monotonic()
        log.info("%s assigned %s", self.config.worker_id, partitions)
        return starts

    def _load(self, partitions: list[int]) -> dict[int, int | None]:
        """Claim and load `partitions`, each checked against the log's bounds; returns where to start
        each one loaded. On a Redis or Kafka failure every partition waits (`_suspend`)."""
        if not partitions:
            return {}
        s, starts = self.settings, {}
        try:
            bounds = kafka.log_bounds(kafka.target(s), s.events_topic)
            for partition in partitions:
                store = PartitionStore(self.redis, Keys(s.key_prefix, s.events_topic, partition),
                                       self.config.dedup_window, self.config.session_gap, worker_id=self.config.worker_id)
                shard = Shard(store, self.config, self.seconds, len(bounds) or s.events_partitions)
                with reachable(s.redis_url):
                    start = self._checked_start(partition, shard, shard.resume(), bounds.get(partition))
                if partition not in self.stopped:
                    self.shards[partition] = shard
                    self.waiting.discard(partition)
                    starts[partition] = start
        except ServiceError as exc:
            self._suspend(exc)
            return {}
        return starts

    def _checked_start(self, partition: int, shard: Shard, stored: int | None, bounds: tuple[int, int] | None) -> int | None:
        """Where `shard` starts: its stored offset, unless the log no longer holds it. Below the log's
        start (retention removed events before they were learned) it starts at the log's start; past
        the log's end (the broker lost its log) it follows `on_offset_gap`. Both are alerted."""
        if stored is None or bounds is None:
            return stored
        start, end = bounds
        if start <= stored <= end:
            return stored
        policy = "earliest" if stored < start else self.config.on_offset_gap
        kind = "offset_expired" if stored < start else "offset_gap"
        alert = {"ts": time.time(), "kind": kind, "worker": self.config.worker_id, "topic": self.settings.events_topic,
                 "partition": partition, "stored_offset": stored, "log_start": start, "log_end": end, "policy": policy}
        self.gaps += 1
        self._alert(alert)
        if policy == "stop":
            log.error("partition %s STOPPED: its state in Redis resumes at offset %s but the log holds %s..%s (the broker "
                      "lost its log?); learning it would skip events. Restart the worker with --on-offset-gap earliest "
                      "(learn the log from its start, keeping the model) or latest (from its end)", partition, stored,
                      start, end)
            self.stopped[partition] = alert
            return None
        resume_at = end if policy == "latest" else start
        log.error("partition %s: stored offset %s is outside the log's %s..%s; the model state is carried over and learning "
                  "resumes at offset %s (--on-offset-gap %s)", partition, stored, start, end, resume_at, policy)
        shard.store.record_gap({**alert, "resumed_at": resume_at})
        shard.offset = shard.committed = resume_at
        return resume_at

    def _alert(self, alert: dict) -> None:
        """An operational alert on the alerts topic; when Kafka cannot take it the log has said it already."""
        try:
            self.sender.send(self.settings.alerts_topic, orjson.dumps(alert), key=str(alert["partition"]).encode())
        except ServiceError as exc:
            log.warning("alert not sent (%s): %s", exc, alert)

    def _suspend(self, exc: Exception) -> None:
        """Redis or Kafka failed: stop learning every partition (the next load re-reads what was not
        committed) and retry with backoff; the partitions stay assigned, paused."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.error("%s: %s; partitions %s paused, not learning; retrying with backoff", self.config.worker_id, exc,
                      sorted(self.waiting | set(self.shards)))
        self.waiting.update(self.shards)
        self.shards.clear()
        self.held.clear()  # paused while they wait; loaded again, they are aligned afresh
        self._retry_at = now + self._retry_delay
        self._retry_delay = min(2 * self._retry_delay, RETRY_MAX)

    def _retry_waiting(self) -> None:
        """Pause the waiting partitions; when their retry is due, load them and resume them at their start."""
        if self.consumer is None:
            return
        self.consumer.pause(self.waiting)
        retry = sorted(self.waiting - set(self.stopped))
        if not retry or time.monotonic() < self._retry_at:
            return
        starts = self._load(retry)
        for partition, start in starts.items():
            self.consumer.seek(partition, start)
        self.consumer.resume(starts)
        if not self.waiting - set(self.stopped) and self._down_since is not None:
            log.info("%s: Redis and Kafka answer again after %.1f s; partitions %s resumed from their stored state",
                     self.config.worker_id, time.monotonic() - self._down_since, sorted(starts))
            self._down_since, self._retry_delay = None, RETRY_FIRST

    def revoke(self, partitions: list[int]) -> None:
        """Commit what the revoked partitions have learned, then let them go."""
        self.waiting.difference_update(partitions)
        for partition in partitions:
            self.stopped.pop(partition, None)
            self.held.pop(partition, None)
            shard = self.shards.pop(partition, None)
            if shard is not None:
                self._last_commit(partition, shard, "revoked")
        log.info("%s revoked %s", self.config.worker_id, partitions)

    def dead_letter(self, msg: kafka.Record, reason: str) -> None:
        """Send `msg` to the dead-letter topic with `reason`, its payload cut to size (`dead_letters`)."""
        dead_letters.send(self.sender, self.settings.dlq_topic, msg, reason, self.config.worker_id)
        self.dead += 1

    def run(self, max_idle: float | None = None, stop_after: int | None = None) -> None:
        """Consume until stopped (SIGTERM/SIGINT), `stop_after` applied events, or idle for `max_idle` s with no
        partition of the topic left lagging (time spent waiting for Redis or Kafka to come back is not idle)."""
        # One BLAS thread: workers scale by processes (--processes), and BLAS threads spin against each other.
        limit_blas_threads(1)
        # Rarer garbage collections: the clients allocate objects per message, and with a shard's state in
        # memory every collection has much to walk.
        thresholds = gc.get_threshold()
        gc.set_threshold(50_000, 20, 20)
        self.consumer = self._join()
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, lambda *_: self.stop())
            except ValueError:  # not the main thread
                pass
        idle_since = time.monotonic()
        try:
            while self.running:
                if self.waiting:
                    self._retry_waiting()
                wait = self.config.max_wait_ms / 1000
                polled = self.consumer.poll(self.poll_size(), min(wait, ALIGN_EVERY_HELD) if self.held else wait)
                recovering = self.waiting.difference(self.stopped)
                now = time.monotonic()
                if polled or recovering or self.held:  # a held partition has events to learn
                    idle_since = now
                elif max_idle is not None and now - max(idle_since, self._idle_from()) > max_idle and self._drained():
                    break
                self._align_due()
                self._learn_all(polled)
                self._timed(polled, now)
                self._fold_due()
                self._commit_due(idle=not polled)
                if not polled:
                    self._check_gaps()
                self._remind()
                self._unwedge_group()
                self._maybe_report()
                if stop_after is not None and self.applied >= stop_after:
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            gc.set_threshold(*thresholds)
            self.close()

    def _idle_from(self) -> float:
        """Idle time counts from the first assignment (whose loading may take a while), or from joining."""
        return self._joined_at if self.started_at is None else self.started_at

    def _drained(self) -> bool:
        """True when no partition of the topic has work a worker of this configuration would do (`pending`):
        an idle member stays while another partition lags, or sits at an offset gap its policy resolves, to
        take it when its owner dies or the group hands partitions round (checked every `DRAIN_CHECK_EVERY` s)."""
        now = time.monotonic()
        if now - self._drain_checked_at < DRAIN_CHECK_EVERY:
            return False
        self._drain_checked_at = now
        try:
            waiting = [r.partition for r in partition_status(self.settings) if pending(r, self.config.on_offset_gap)]
        except ServiceError as exc:
            log.warning("%s: idle, but cannot check the other partitions (%s)", self.config.worker_id, exc)
            return False
        if waiting:
            log.info("%s: idle, staying while partitions %s have work (events to learn, or an offset gap its policy "
                     "resolves)", self.config.worker_id, waiting)
        return not waiting

    def poll_size(self) -> int:
        """Events to poll at most: `commit_max`, or fewer when learning them would take longer than
        `POLL_SHARE` of the max poll interval at the speed measured so far."""
        if self._event_seconds is None:
            return min(self.config.commit_max, FIRST_POLL)
        budget = POLL_SHARE * kafka.REBALANCE_TIMEOUT_MS / 1000
        return max(1, min(self.config.commit_max, int(budget / self._event_seconds)))

    def _timed(self, polled: list[kafka.Messages], since: float) -> None:
        """Update the learning time per event with a poll learned from `since` (monotonic)."""
        events = sum(len(m) for m in polled)
        if events:
            per_event = (time.monotonic() - since) / events
            old = self._event_seconds
            self._event_seconds = per_event if old is None else 0.5 * (old + per_event)

    def _join(self) -> kafka.GroupConsumer:
        s = self.settings
        return kafka.group_consumer(s.kafka_client, kafka.target(s), s.consumer_group, s.events_topic, self.assign,
                                    self.revoke, self.config.commit_max, self.config.max_wait_ms)

    def _unwedge_group(self) -> None:
        """A member that has held no partition for `REJOIN_AFTER` s while some partition stalls (events wait,
        no commit for as long) or sits at an offset gap nobody has claimed since, deletes its consumer group
        and joins it again as a new member. After a fleet restart the embedded broker can keep a member that
        left as the group's leader, and after the broker itself restarted (losing its log) it can leave the
        group without an assignment: the members then wait for minutes (README: Failure modes, fleet
        restart). Apache Kafka refuses to delete a group with members, so there this does nothing."""
        now = time.monotonic()
        if self.shards or self.waiting or now - max(self._unassigned_since, self._joined_at) < REJOIN_AFTER:
            return
        self._joined_at = now
        s = self.settings
        try:
            idle = now - self._unassigned_since
            stalled = [r.partition for r in partition_status(s, stale_after=REJOIN_AFTER) if r.problem == STALLED
                       or r.problem == OFFSET_GAP and (r.claim_age is None or r.claim_age >= idle)]
            if not stalled:
                return
            answer = kafka.delete_group(kafka.target(s), s.consumer_group)
        except ServiceError as exc:
            log.warning("%s: cannot check the group's partitions (%s)", self.config.worker_id, exc)
            return
        log.warning("%s: no partition after %.0f s in group %s while partitions %s wait for an owner; the group is "
                    "wedged. Deleted it (%s) and joining again as a new member", self.config.worker_id, idle,
                    s.consumer_group, stalled, answer)
        if self.consumer is not None:
            self.consumer.close()
        self.consumer = self._join()

    def _learn_all(self, polled: list[kafka.Messages]) -> None:
        """Learn a poll. With shared items, what other partitions learn reaches a shard only through commits
        and folds, so the poll is learned in runs across its partitions in stream-time order (`stream_order`)
        with folds, commits and alignment in between, as when the stream keeps up; a partition too far
        ahead of the slowest one is held (`_allowed`) and the rest of its runs fetched again once resumed."""
        if not self.config.shared_items:
            for messages in polled:
                self._guarded(messages.partition, self._learn, messages)
            return
        skipped: set[int] = set()  # held during this poll
        for run, times in stream_order(polled, max(self.config.batch_size, EXCHANGE_EVENTS), self.config.align_slack):
            partition = run.partition
            if partition in skipped or partition in self.held or partition not in self.shards:
                skipped.add(partition)
                continue
            allowed = self._allowed(partition, times)
            if allowed:
                self._guarded(partition, self._learn, run[:allowed])
            if allowed < len(run) and partition in self.shards:
                self._hold(partition, times[allowed])
                skipped.add(partition)
            self._fold_due()
            self._align_due()
            self._commit_due(idle=False)

    def _learn(self, messages: kafka.Messages) -> None:
        shard = self.shards.get(messages.partition)
        if shard is None:
            return  # revoked, dropped (fenced) or suspended while in flight; the next owner or load re-reads it
        if shard.offset is not None and messages.first_offset != shard.offset:
            messages = messages.since(shard.offset)
            if not len(messages):
                return
        shard.process(messages, self.dead_letter)

    def _align_due(self) -> None:
        """With shared items and `align_slack`: every `ALIGN_EVERY` s (`ALIGN_EVERY_HELD` while one of its
        partitions is held, or its slowest busy one has moved a quarter of the slack since), publish the
        stream time and lag of this worker's partitions, read every partition's, and resume the held
        partitions whose next event may now be learned (`_allowed`).

        Only partitions with events to learn count, and another worker's only while its stream time moves
        (standing still for `ALIGN_STALE` s: a dead, stopped or unowned partition holds nobody back). The
        slowest partition always learns its next event, so some partition with work always learns."""
        c = self.config
        now = time.monotonic()
        if not c.shared_items or c.align_slack is None or self.consumer is None:
            return
        floor = self._own_floor()
        # held, or its own slowest moved a quarter of the slack (a backlog): the others wait for this news
        soon = bool(self.held) or floor - self._aligned_floor >= c.align_slack / 4
        if now - self._aligned_at < (ALIGN_EVERY_HELD if soon else ALIGN_EVERY):
            return
        self._aligned_at, self._aligned_floor = now, floor
        ends = self.consumer.ends(self.shards)
        lags = {p: ends[p] - s.offset if p in ends and s.offset is not None else -1 for p, s in self.shards.items()}
        s = self.settings
        try:
            with reachable(s.redis_url):
                marks = exchange_stream_times(self.redis, s.key_prefix, s.events_topic,
                                              {p: (shard.stream_time, lags[p]) for p, shard in self.shards.items()})
        except ServiceError as exc:
            log.warning("%s: cannot exchange stream times (%s); alignment kept as it was", c.worker_id, exc)
            return
        for partition, (ts, _) in marks.items():
            if self._moved.get(partition, (None,))[0] != ts:
                self._moved[partition] = (ts, now)
        self._own_work = {p for p, lag in lags.items() if lag != 0}
        self._others = {p: ts for p, (ts, lag) in marks.items()
                        if p not in self.shards and lag != 0 and now - self._moved[p][1] < ALIGN_STALE}
        released = {p for p, ts in self.held.items() if p not in self.shards or self._allowed(p, [ts])}
        for partition in released:
            del self.held[partition]
        self.consumer.resume(released - self.waiting)
        for partition in released & set(self.shards):
            self.consumer.seek(partition, self.shards[partition].offset)  # whatever the poll gave it meanwhile

    def _own_floor(self) -> float:
        """The slowest stream time of this worker's partitions with events to learn (inf: none)."""
        return min((self.shards[p].stream_time for p in self._own_work if p in self.shards), default=float("inf"))

    def _allowed(self, partition: int, times: list[float]) -> int:
        """How many of a partition's next events (their times) it may learn now: those at most `align_slack`
        later than the slowest other partition with events to learn (this worker's at their live stream time;
        -inf: nothing learned since loaded), and at least one when it is the slowest itself."""
        slack, shard = self.config.align_slack, self.shards[partition]
        if slack is None:
            return len(times)
        floor = min([*(ts for p, ts in self._others.items() if p != partition),
                     *(self.shards[p].stream_time for p in self._own_work if p != partition and p in self.shards)],
                    default=float("inf"))
        n = 0
        while n < len(times) and times[n] <= floor + slack:
            n += 1
        return max(n, int(shard.stream_time <= floor and len(times) > 0))

    def _hold(self, partition: int, next_ts: float) -> None:
        """Pause a partition too far ahead, whose next event is at `next_ts`, until it may learn that event;
        it is fetched again from its next offset."""
        assert self.consumer is not None
        self.consumer.seek(partition, self.shards[partition].offset)
        self.consumer.pause([partition])
        self.held[partition] = next_ts

    def _fold_due(self) -> None:
        """With shared items: every `fold_interval_ms`, each shard folds in the other partitions' item changes."""
        if not self.config.shared_items or time.monotonic() - self._folded_at < self.config.fold_interval_ms / 1000:
            return
        self._folded_at = time.monotonic()
        for partition, shard in list(self.shards.items()):
            self._guarded(partition, shard.fold)

    def _commit_due(self, idle: bool) -> None:
        """Commit the shards whose learning is due in Redis: all of them when the stream is idle, else
        those with `commit_max` events pending, or pending for `commit_interval_ms` or for long enough
        that committing takes at most `commit_share` of the time (its last commit's duration / share)."""
        now, c = time.monotonic(), self.config
        due = [p for p, s in self.shards.items() if s.pending.since is not None and (
            idle or s.pending.events >= c.commit_max
            or now - s.pending.since >= min(c.commit_interval_ms / 1000, s.commit_seconds / c.commit_share))]
        for partition in due:
            if partition in self.shards:  # not suspended by an earlier failure of this loop
                self._guarded(partition, self._commit, self.shards[partition])
        if due:
            self._commit_kafka()

    def _commit(self, shard: Shard) -> None:
        try:
            self.sender.flush()  # dead letters are on Kafka before the offset moves past them
        except MessageRefused as exc:  # the broker will never take them: reading the batch again would not help
            log.error("%s: %s; the offset moves on (the messages they were about are still in the events log)",
                      self.config.worker_id, exc)
        self.applied += shard.commit()
        self.freshness.extend((time.time() - shard.last_ts).tolist())

    def _last_commit(self, partition: int, shard: Shard, why: str) -> None:
        """Commit a partition this worker is giving up; on failure the next owner re-reads what it learned."""
        try:
            with reachable(self.settings.redis_url):
                self._commit(shard)
        except (StreamrecError, OSError) as exc:
            log.warning("partition %s %s before its last commit (%s)", partition, why, exc)

    def _guarded(self, partition: int, action: Callable, *args: Any) -> None:
        """Run `action`; a fenced partition is dropped; when Redis or Kafka fails, every partition waits."""
        try:
            with reachable(self.settings.redis_url):
                action(*args)
        except FencedError as exc:
            log.warning("dropping partition %s: %s", partition, exc)
            self.shards.pop(partition, None)
        except (ServiceError, OSError) as exc:
            self._suspend(exc)

    def _check_gaps(self) -> None:
        """Every `GAP_CHECK_EVERY` s of idleness, compare each owned partition's offset with the log's end:
        a broker that restarted without its log answers fetches past its end with nothing, not an error."""
        now = time.monotonic()
        if not self.shards or now - self._gaps_checked_at < GAP_CHECK_EVERY:
            return
        self._gaps_checked_at = now
        s = self.settings
        try:
            bounds = kafka.log_bounds(kafka.target(s), s.events_topic)
        except ServiceError as exc:
            log.warning("%s: cannot check offsets against the log (%s)", self.config.worker_id, exc)
            return
        lost = [p for p, shard in self.shards.items()
                if p in bounds and shard.offset is not None and shard.offset > bounds[p][1]]
        for partition in lost:
            self._last_commit(partition, self.shards.pop(partition), "lost its log")
        self.waiting.update(lost)
        self._retry_at = now  # reloaded, and checked against the log, at the next turn

    def _remind(self) -> None:
        """Every `REMIND_EVERY` s, say which partitions are stopped at an offset gap, and whether this worker
        has held no partition for longer than the group's session timeout."""
        now = time.monotonic()
        if self.shards or self.waiting:
            self._unassigned_since = now
        if now - self._reminded_at < REMIND_EVERY:
            return
        self._reminded_at = now
        for partition, alert in self.stopped.items():
            log.error("partition %s still stopped at an offset gap: %s", partition, alert)
            self._alert(alert)
        idle = now - self._unassigned_since
        if idle > kafka.SESSION_TIMEOUT_MS / 1000:
            log.warning("%s has held no partition of %s for %.0f s: the group %s has other members with all of them, "
                        "or its coordinator has not rebalanced yet (README: Failure modes)", self.config.worker_id,
                        self.settings.events_topic, idle, self.settings.consumer_group)

    def _commit_kafka(self) -> None:
        """Commit consumed offsets to Kafka, for lag monitoring only (Redis holds the truth)."""
        if self.consumer is None:  # not consuming (shards driven directly)
            return
        self.consumer.commit({p: s.committed for p, s in self.shards.items() if s.committed is not None})

    def metric_records(self) -> list[dict]:
        """One metric record per model, pooled over this worker's partitions."""
        evaluators = [s.evaluator for s in self.shards.values()]
        events_seen = sum(e.events_seen for e in evaluators)
        records = []
        for name in self.config.models:
            rec = summary(evaluators, name)
            if not rec.get("evaluated"):
                continue
            rec.update({
                "ts": time.time(), "worker": self.config.worker_id, "model": name, "k": self.config.k,
                "window": self.config.window, "events_seen": events_seen, "batch": self.config.batch_size,
                "applied": self.applied, "dead_letters": self.dead, "offset_gaps": self.gaps,
                "stopped": sorted(self.stopped),
                "versions": {str(p): s.version for p, s in self.shards.items()},
                "seconds": {step: round(s, 4) for step, s in self.seconds.items()},  # this worker's, all shards
            })
            records.append(rec)
        return records

    def _maybe_report(self, force: bool = False) -> None:
        evaluated = sum(sum(s.evaluator.evaluated.values()) for s in self.shards.values())
        due = evaluated - self._evaluated_at_report >= self.config.metrics_every * len(self.config.models)
        if force or due or time.monotonic() - self._reported_at > self.config.metrics_interval:
            for record in self.metric_records():
                self.sender.send(self.settings.metrics_topic, orjson.dumps(record), key=record["model"].encode())
            self._evaluated_at_report = evaluated
            self._reported_at = time.monotonic()

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        try:
            for partition, shard in list(self.shards.items()):
                self._last_commit(partition, shard, "closed")
            self._maybe_report(force=True)
            self.sender.close()
        finally:
            if self.consumer is not None:
                self.consumer.close()
