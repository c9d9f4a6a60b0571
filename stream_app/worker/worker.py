"""The stream worker: Kafka micro-batches -> validate -> evaluate-then-learn -> Redis, exactly once.

Each Kafka partition of `events` is a shard with its own models, vocabularies
and evaluator; its state lives under the partition's Redis hash tag together
with the next offset to read (see `stream_app.io.redis`). On assignment the
worker claims the partition (fencing any earlier owner), loads its state and
seeks to the stored offset; Kafka commits are made for lag monitoring only.
"""

from __future__ import annotations

import base64
import gc
import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from models.registry import parse_names
from stream_app.core.errors import (
    FencedError,
    ServiceError,
    StreamrecError,
)
from stream_app.core.settings import Settings
from stream_app.core.threads import limit_blas_threads
from stream_app.evaluation.prequential import summary
from stream_app.io import kafka
from stream_app.io.redis import Keys, PartitionStore, connect
from stream_app.worker.config import WorkerConfig
from stream_app.worker.shard import STEPS, Shard

log = logging.getLogger("streamrec.worker")


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
        # One BLAS thread: workers scale by processes (--processes), and BLAS threads spin against each other.
        limit_blas_threads(1)
        # Rarer garbage collections: the clients allocate objects per message, and with a shard's state in
        # memory every collection has much to walk.
        thresholds = gc.get_threshold()
        gc.set_threshold(50_000, 20, 20)
        self.consumer = consumer = kafka.group_consumer(
            s.kafka_client, kafka.target(s), s.consumer_group, s.events_topic, self.assign, self.revoke,
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
                polled = consumer.poll(self.config.commit_max, self.config.max_wait_ms / 1000)
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
            if self.consumer is not None:
                self.consumer.seek(partition, self.assign([partition])[partition])

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
