"""The stream worker: Kafka micro-batches -> validate -> evaluate-then-learn -> Redis, exactly once.

Each Kafka partition of `events` is a shard with its own models, vocabularies
and evaluator; its state lives under the partition's Redis hash tag together
with the next offset to read (see `stream_app.state`). On assignment the
worker claims the partition (fencing any earlier owner), loads its state and
seeks to the stored offset; Kafka commits are made for lag monitoring only.
"""

from __future__ import annotations

import base64
import gc
from array import array
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import orjson

from models.base import Model
from models.features import Featurizer
from models.registry import create, parse_names
from producers.schema import Event, decode
from stream_app import kafka
from stream_app.errors import FencedError, InvalidEvent, ServiceError, StreamrecError
from stream_app.evaluation import Evaluator, restore, summary
from stream_app.serving import limit_blas_threads
from stream_app.settings import Settings
from stream_app.state import Changes, Keys, PartitionStore, connect

log = logging.getLogger("streamrec.worker")
HISTORY = 50  # recent (item, event type) pairs kept per user for exclusion and reasons
STEPS = ("decode", "featurize", "evaluate", "learn", "history", "commit")  # of `Shard.process`, timed


def _tick(clock: dict[str, float], step: str, since: float) -> float:
    """Add the time since `since` to `step`; returns now."""
    now = time.perf_counter()
    clock[step] += now - since
    return now


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker batches, evaluates and reports."""

    models: tuple[str, ...] = ("pop",)
    batch_size: int = 256  # events per micro-batch: evaluated, then learned
    max_wait_ms: int = 200
    commit_max: int = 8192  # events per poll and Redis commit at most: a backlog commits several micro-batches at once
    commit_interval_ms: int = 100  # a busy stream's learning reaches Redis within this (an idle one's at once)
    commit_share: float = 0.1  # ... and sooner when commits are cheap: they may take this share of the time
    sample_rate: float = 0.1
    k: int = 20
    window: int = 10_000
    metrics_every: int = 1000  # evaluated events between metric records
    metrics_interval: float = 5.0  # ... or seconds
    dedup_window: int = 100_000
    session_gap: float = 1800.0  # a user's implicit session ends after this idle time; sessions expire after it
    idle_expiry: float | None = None  # users and items idle this long (stream time, s) are expired; None: never
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    seed: int = 0


@dataclass
class _Pending:
    """What a shard has learned since its last commit."""

    events: int = 0
    next_offset: int | None = None
    since: float | None = None  # when the first of them was learned (monotonic)
    ids: dict[str, None] = field(default_factory=dict)  # new event ids, in order
    touched: set[int] = field(default_factory=set)  # user rows whose history changed
    ts: list[float] = field(default_factory=list)  # event times
    opened: dict[str, tuple[str, float]] = field(default_factory=dict)  # implicit sessions now open


class Shard:
    """One partition's models, vocabularies, evaluator and dedup window."""

    def __init__(self, store: PartitionStore, config: WorkerConfig, seconds: dict[str, float] | None = None):
        self.store = store
        self.config = config
        self.featurizer = Featurizer(session_gap=config.session_gap)
        self.models: dict[str, Model] = {name: create(name, seed=config.seed) for name in config.models}
        self.evaluator = Evaluator(config.k, config.window, config.sample_rate, seed=config.seed + store.keys.partition)
        self._query_kinds = {m.query for m in self.models.values()}
        self.dedup: dict[str, None] = {}  # event ids of the dedup window, oldest first
        self._dedup_parts: deque[dict[str, None]] = deque()  # the ids of `dedup` in insertion runs, oldest first
        self.history: dict[int, array] = {}  # user row -> (item, event type) pairs, the last HISTORY after a commit
        self.offset: int | None = None  # next offset to learn
        self.committed: int | None = None  # next offset to learn after a restart (in Redis)
        self.pending = _Pending()
        self.commit_seconds = 0.0  # how long the last commit took
        self.version = 0
        self.last_ts = np.zeros(0)  # event times of the last commit (freshness)
        self._expired_at = -float("inf")
        self.seconds = dict.fromkeys(STEPS, 0.0) if seconds is None else seconds  # wall time per step

    def resume(self) -> int | None:
        """Claim the partition and load its state; returns the offset to seek to."""
        self.store.claim()
        snap = self.store.load(self.models)
        f = self.featurizer
        for kind, vocab in (("user", f.users), ("item", f.items), ("session", f.sessions), ("context", f.contexts)):
            vocab.restore(snap.vocabs[kind])
        f.open_sessions.update(snap.open_sessions)
        for name, state in snap.models.items():
            self.models[name].import_state(state)
        self.dedup = dict.fromkeys(snap.dedup)
        self._dedup_parts = deque(dict.fromkeys(snap.dedup[s : s + 4096]) for s in range(0, len(snap.dedup), 4096))
        self.history = {u: array("i", h.ravel().tobytes()) for u, h in snap.history.items()}
        restore(
            self.evaluator,
            np.fromiter(f.items.index.values(), np.int64, len(f.items.index)),
            {u: h[:, 0] for u, h in snap.history.items()},
        )
        self.offset = self.committed = snap.offset
        return snap.offset

    def _expire(self, now: float) -> dict[str, np.ndarray]:
        """Expire idle sessions (and users and items with `idle_expiry`), at most once per session gap
        of stream time; models, evaluator and histories forget them. Returns the freed rows per kind."""
        if now - self._expired_at < self.config.session_gap:
            return {}
        self._expired_at = now
        f = self.featurizer
        plan = [("session", f.sessions, self.config.session_gap)]
        if self.config.idle_expiry is not None:
            plan += [("user", f.users, self.config.idle_expiry), ("item", f.items, self.config.idle_expiry)]
        freed = {}
        for kind, vocab, idle in plan:
            rows = vocab.expire(now - idle)
            if len(rows):
                for model in self.models.values():
                    model.forget(kind, rows)
                self.evaluator.forget(kind, rows)
                freed[kind] = rows
        for user in freed.get("user", np.zeros(0, np.int64)).tolist():
            self.history.pop(user, None)
        return freed

    def process(self, messages: kafka.Messages, dead_letter: Callable[[kafka.Record, str], None]) -> int:
        """Evaluate and learn `messages` in micro-batches of `batch_size`; `commit` makes them
        durable. Returns the events learned."""
        clock, pending = self.seconds, self.pending
        t = time.perf_counter()
        events, new_ids = self._decode(messages, dead_letter)
        t = _tick(clock, "decode", t)
        f = self.featurizer
        size = self.config.batch_size
        for start in range(0, len(events), size):
            batch = f.batch(events[start : start + size])
            self._refill(batch)
            t = _tick(clock, "featurize", t)
            evaluator = self.evaluator
            plans = evaluator.prepare(batch, self._query_kinds)
            t = _tick(clock, "evaluate", t)
            for name, model in self.models.items():
                plan = plans[model.query]
                scores = model.learn_scored(batch, plan.rows)  # each row scored just before it is learned
                t = _tick(clock, "learn", t)
                evaluator.record(name, batch, plan, scores)
                t = _tick(clock, "evaluate", t)
            users, history = batch.users.tolist(), self.history
            for u, i, e in zip(users, batch.items.tolist(), batch.event_types.tolist()):
                h = history.get(u)
                if h is None:
                    h = history[u] = array("i")
                h.append(i)  # flat (item, event type) pairs
                h.append(e)
            pending.touched.update(users)
            t = _tick(clock, "history", t)
        if pending.since is None:
            pending.since = time.monotonic()
        pending.next_offset = messages.next_offset
        pending.events += len(events)
        pending.ids.update(new_ids)
        pending.ts += [e.ts for e in events]
        pending.opened.update((e.user_id, f.open_sessions[e.user_id]) for e in events if e.session_id is None)
        self.offset = pending.next_offset
        if new_ids:
            self.dedup.update(new_ids)
            self._dedup_parts.append(new_ids)
            # Drop the oldest runs while `dedup_window` ids remain (a plain dict: OrderedDict costs 3x more).
            parts = self._dedup_parts
            while len(self.dedup) - len(parts[0]) >= self.config.dedup_window:
                for event_id in parts.popleft():
                    del self.dedup[event_id]
        return len(events)

    def _refill(self, batch) -> None:
        """Give models back, from Redis, the session states of this batch that their LRU dropped."""
        sessions = None
        for name, model in self.models.items():
            for table, kind in model.tables.items():
                if kind != "session":
                    continue
                sessions = np.unique(batch.sessions) if sessions is None else sessions
                rows = model.evicted(kind, sessions)
                if len(rows):
                    model.import_rows(table, rows, self.store.session_rows_of(name, table, rows))

    def commit(self) -> int:
        """Write everything learned since the last commit, with the next offset, in one atomic
        Redis write; returns the events committed."""
        pending, f = self.pending, self.featurizer
        if pending.next_offset is None:
            return 0
        t = time.perf_counter()
        tables: list = []
        for name, model in self.models.items():
            state = model.export_state()
            for table, ids in model.drain_changes().items():
                values = state[table] if ids is None else state[table][ids]
                tables.append((name, table, model.tables[table], ids, values))
        ts = np.array(pending.ts, np.float64)  # [n]
        expired = self._expire(float(ts.max())) if len(ts) else {}
        vocab_new, vocab_removed = {}, {}
        for kind, vocab in (("user", f.users), ("item", f.items), ("session", f.sessions), ("context", f.contexts)):
            vocab_new[kind], vocab_removed[kind] = vocab.drain()
        history = {}  # user row -> its last HISTORY pairs, for the users this commit touched
        for u in pending.touched:
            h = self.history.get(u)
            if h is not None:  # None: expired since
                del h[: -2 * HISTORY]
                history[u] = h.tobytes()
        changes = Changes(
            next_offset=pending.next_offset,
            applied=pending.events,
            vocab_new=vocab_new,
            vocab_removed=vocab_removed,
            open_sessions=pending.opened,
            dedup=list(pending.ids),
            history=history,
            tables=tables,
            expired=expired,
        )
        self.version = self.store.commit(changes)
        self.committed = pending.next_offset
        self.last_ts = ts
        self.pending = _Pending()
        self.commit_seconds = _tick(self.seconds, "commit", t) - t
        return changes.applied

    def _decode(self, messages: kafka.Messages, dead_letter: Callable[[kafka.Record, str], None]
                ) -> tuple[list[Event], dict[str, None]]:
        """Valid, not yet seen events of `messages` in order (dead letters for the rest), and their new ids."""
        valid: list[Event] = []
        for j, raw in enumerate(messages.values):
            try:
                valid.append(decode(raw))
            except InvalidEvent as exc:
                dead_letter(messages.record(j), str(exc))
        new_ids = dict.fromkeys([e.event_id for e in valid])
        seen = self.dedup
        if len(new_ids) == len(valid) and None not in new_ids and seen.keys().isdisjoint(new_ids):
            return valid, new_ids  # the common case: every id new, and given once
        events: list[Event] = []
        new_ids = {}
        for event in valid:
            event_id = event.event_id
            if event_id is not None:
                if event_id in seen or event_id in new_ids:
                    continue
                new_ids[event_id] = None
            events.append(event)
        return events, new_ids


class Worker:
    """Consumes `events` in a consumer group and keeps its partitions' state in Redis."""

    def __init__(self, settings: Settings, config: WorkerConfig = WorkerConfig()):
        parse_names(",".join(config.models))
        self.settings = settings
        self.config = config
        self.shards: dict[int, Shard] = {}
        self.redis = connect(settings.redis_url)
        self.sender = kafka.Sender(settings.kafka_bootstrap)
        self.consumer = None
        self.running = True
        self.applied = 0
        self.dead = 0
        self.started_at: float | None = None  # first assignment (monotonic)
        self.freshness: deque[float] = deque(maxlen=200_000)  # seconds from event ts to its Redis commit
        self.seconds = dict.fromkeys(STEPS, 0.0)  # wall time per step of `Shard.process`, all shards
        self._evaluated_at_report = 0
        self._reported_at = time.monotonic()

    def assign(self, partitions: list[int]) -> dict[int, int | None]:
        """Claim and load newly assigned partitions; returns the offsets to resume from."""
        starts = {}
        for partition in partitions:
            keys = Keys(self.settings.key_prefix, self.settings.events_topic, partition)
            store = PartitionStore(self.redis, keys, self.config.dedup_window, self.config.session_gap)
            shard = Shard(store, self.config, self.seconds)
            starts[partition] = shard.resume()
            self.shards[partition] = shard
        if partitions and self.started_at is None:
            self.started_at = time.monotonic()
        log.info("%s assigned %s", self.config.worker_id, partitions)
        return starts

    def revoke(self, partitions: list[int]) -> None:
        """Commit what the revoked partitions have learned, then let them go."""
        for partition in partitions:
            shard = self.shards.pop(partition, None)
            if shard is not None:
                self._last_commit(partition, shard, "revoked")
        log.info("%s revoked %s", self.config.worker_id, partitions)

    def dead_letter(self, msg: kafka.Record, reason: str) -> None:
        try:
            raw, encoding = (msg.value or b"").decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            raw, encoding = base64.b64encode(msg.value).decode(), "base64"
        record = {"reason": reason, "topic": msg.topic, "partition": msg.partition, "offset": msg.offset,
                  "raw": raw, "raw_encoding": encoding, "ts": time.time(), "worker": self.config.worker_id}
        self.sender.send(self.settings.dlq_topic, orjson.dumps(record), key=msg.key)
        self.dead += 1

    def run(self, max_idle: float | None = None, stop_after: int | None = None) -> None:
        """Consume until stopped (SIGTERM/SIGINT), idle for `max_idle` s, or `stop_after` applied events."""
        s = self.settings
        # One BLAS thread: workers scale by processes (--processes), and BLAS threads spinning against
        # each other on a busy machine made MF scoring 3-4x slower here.
        limit_blas_threads(1)
        # Rarer garbage collections: the clients allocate objects per message, and with a shard's state in
        # memory every collection has much to walk (kafka-python: ~10% of the per-event cost, measured).
        thresholds = gc.get_threshold()
        gc.set_threshold(50_000, 20, 20)
        self.consumer = kafka.group_consumer(
            s.kafka_client, s.kafka_bootstrap, s.consumer_group, s.events_topic, self.assign, self.revoke,
            self.config.commit_max, self.config.max_wait_ms,
        )
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, lambda *_: self.stop())
            except ValueError:  # not the main thread
                pass
        idle_since = time.monotonic()
        try:
            while self.running:
                polled = self.consumer.poll(self.config.commit_max, self.config.max_wait_ms / 1000)
                if polled or self.started_at is None:  # idle time counts from the first assignment
                    idle_since = time.monotonic()
                elif max_idle is not None and time.monotonic() - idle_since > max_idle:
                    break
                for messages in polled:
                    self._guarded(messages.partition, self._learn, messages)
                self._commit_due(idle=not polled)
                self._maybe_report()
                if stop_after is not None and self.applied >= stop_after:
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            gc.set_threshold(*thresholds)
            self.close()

    def _learn(self, messages: kafka.Messages) -> None:
        shard = self.shards.get(messages.partition)
        if shard is None:
            return  # revoked while the batch was in flight; the new owner re-reads it
        if shard.offset is not None and messages.first_offset != shard.offset:
            messages = messages.since(shard.offset)
            if not len(messages):
                return
        shard.process(messages, self.dead_letter)

    def _commit_due(self, idle: bool) -> None:
        """Commit the shards whose learning is due in Redis: all of them when the stream is idle, else
        those with `commit_max` events pending, or pending for `commit_interval_ms` or for long enough
        that committing takes at most `commit_share` of the time (its last commit's duration / share)."""
        now, c = time.monotonic(), self.config
        due = [p for p, s in self.shards.items() if s.pending.since is not None and (
            idle or s.pending.events >= c.commit_max
            or now - s.pending.since >= min(c.commit_interval_ms / 1000, s.commit_seconds / c.commit_share))]
        for partition in due:
            self._guarded(partition, self._commit, self.shards[partition])
        if due:
            self._commit_kafka()

    def _commit(self, shard: Shard) -> None:
        self.sender.flush()  # dead letters are on Kafka before the offset moves past them
        self.applied += shard.commit()
        self.freshness.extend((time.time() - shard.last_ts).tolist())

    def _last_commit(self, partition: int, shard: Shard, why: str) -> None:
        """Commit a partition this worker is giving up; on failure the next owner re-reads what it learned."""
        try:
            self._commit(shard)
        except (StreamrecError, OSError, ConnectionError) as exc:
            log.warning("partition %s %s before its last commit (%s)", partition, why, exc)

    def _guarded(self, partition: int, action: Callable, *args: Any) -> None:
        """Run `action`; a fenced partition is dropped, one whose Redis or Kafka failed is reloaded."""
        try:
            action(*args)
        except FencedError as exc:
            log.warning("dropping partition %s: %s", partition, exc)
            self.shards.pop(partition, None)
        except (ServiceError, OSError, ConnectionError) as exc:
            log.error("partition %s not committed (%s); reloading it from Redis", partition, exc)
            time.sleep(1.0)
            self.shards.pop(partition, None)
            self.consumer.seek(partition, self.assign([partition])[partition])

    def _commit_kafka(self) -> None:
        """Commit consumed offsets to Kafka, for lag monitoring only (Redis holds the truth)."""
        if self.consumer is None:  # not consuming (shards driven directly)
            return
        self.consumer.commit({p: s.committed for p, s in self.shards.items() if s.committed is not None})

    def metric_records(self) -> list[dict]:
        """One DESIGN.md metric record per model, pooled over this worker's partitions."""
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
                "applied": self.applied, "dead_letters": self.dead,
                "versions": {str(p): s.version for p, s in self.shards.items()},
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


def _run_member(settings: Settings, config: WorkerConfig, max_idle: float | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    Worker(settings, config).run(max_idle=max_idle)


def run_processes(settings: Settings, config: WorkerConfig, processes: int, max_idle: float | None = None) -> int:
    """Run `processes` workers of one group, each in its own process (Kafka splits the partitions
    between them); SIGTERM/SIGINT stop them all. Returns how many exited with an error."""
    ctx = multiprocessing.get_context("spawn")
    members = [
        ctx.Process(target=_run_member, args=(settings, replace(config, worker_id=f"{config.worker_id}-{i}"), max_idle),
                    name=f"streamrec-worker-{i}")
        for i in range(processes)
    ]
    for member in members:
        member.start()

    def forward(signum, _frame) -> None:
        for member in members:
            if member.pid is not None and member.is_alive():
                os.kill(member.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for member in members:
            member.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return sum(1 for m in members if m.exitcode)
