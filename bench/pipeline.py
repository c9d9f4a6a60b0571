"""Pipeline benchmark: raw kafka-python consume rate vs the worker end to end, on the same broker.

Run: `streamrec bench` (or `python -m bench.pipeline`). Starts the embedded
broker and Redis when none answers, produces a synthetic stream to a fresh
topic, then measures in one run:
- the raw consume rate of a bare kafka-python consumer (the baseline: the better of a run
  before and one after the workers);
- the worker's end-to-end events/s (Kafka in -> models updated -> Redis written), with each
  client, as one process and as `worker --processes N` (one group member per process);
- freshness: seconds from an event's `ts` (its produce time) until its batch is committed to Redis;
- with `--baseline REF`: the one-process worker of commit REF beside this tree's, runs alternating
  (`--pairs` each, both in child processes), for a change's cost measured in one run.
Writes JSON and a markdown table under bench/results/ (`pipeline.*` for pop, `pipeline-<models>.*` otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.baseline import checkout
from producers.producer import EventProducer
from producers.synthetic import SyntheticConfig, generate
from stream_app.core.settings import Settings
from stream_app.dev import embedded
from stream_app.io import kafka
from stream_app.io.redis import Keys, applied_total, connect
from stream_app.worker.config import WorkerConfig
from stream_app.worker.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


def raw_consume_rate(settings: Settings, topic: str, n: int) -> float:
    """Events/s of a bare kafka-python consumer reading `n` messages from the start."""
    consumer = kafka.consumer(kafka.target(settings), None, max_poll_records=2000)
    tps = [kafka.TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    got, start = 0, time.perf_counter()
    while got < n:
        for messages in consumer.poll(timeout_ms=500).values():
            got += len(messages)
    seconds = time.perf_counter() - start
    consumer.close()
    return got / seconds


def worker_rate(settings: Settings, config: WorkerConfig, n: int) -> tuple[float, dict[str, float]]:
    """End-to-end events/s of one worker over `n` events, and its µs per event in each step
    (`consume` is the rest: polling Kafka and the loop around the steps)."""
    worker = Worker(settings, config)
    worker.run(stop_after=n)
    assert worker.started_at is not None, "the worker never started"
    seconds = time.monotonic() - worker.started_at
    steps = {step: 1e6 * s / worker.applied for step, s in worker.seconds.items()}
    steps["consume"] = 1e6 * seconds / worker.applied - sum(steps.values())
    return worker.applied / seconds, steps


_WORKER_RATE = """
import json, sys
from bench.pipeline import Settings, WorkerConfig, worker_rate  # as each tree lays them out
settings, config = Settings().with_(**json.loads(sys.argv[1])), json.loads(sys.argv[2])
rate, steps = worker_rate(settings, WorkerConfig(models=tuple(config.pop("models")), **config), int(sys.argv[3]))
print(json.dumps({"rate": rate, "steps": steps}))
"""


def paired_rates(settings: Settings, config: WorkerConfig, n: int, baseline: Path, pairs: int) -> dict[str, list[float]]:
    """One-process worker events/s of the `baseline` tree and of this one, `pairs` runs each, alternating
    which goes first; each run in a child process, its own group and key space, over the same events."""
    trees = {"baseline": baseline, "this tree": ROOT}
    options = {"models": list(config.models), "batch_size": config.batch_size, "sample_rate": config.sample_rate}
    rates: dict[str, list[float]] = {name: [] for name in trees}
    for rep in range(pairs + 1):  # the first pair warms each tree's compiled-code cache, and is dropped
        for name, tree in sorted(trees.items(), reverse=rep % 2 == 1):
            own = {"consumer_group": f"{settings.consumer_group}-pair{rep}-{tree.name}",
                   "key_prefix": f"{settings.key_prefix}-pair{rep}-{tree.name}",
                   **{k: getattr(settings, k) for k in ("kafka_bootstrap", "redis_url", "events_topic", "metrics_topic",
                                                       "dlq_topic", "kafka_client")}}
            done = subprocess.run([sys.executable, "-c", _WORKER_RATE, json.dumps(own), json.dumps(options), str(n)],
                                  cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
                                  check=True)
            if rep:
                rates[name].append(json.loads(done.stdout.strip().splitlines()[-1])["rate"])
    return rates


def processes_rate(settings: Settings, config: WorkerConfig, n: int, processes: int) -> tuple[float, int]:
    """End-to-end events/s of `streamrec worker --processes N` over `n` events, from the moment every
    partition is claimed until Redis counts `n` applied events; and how many partitions changed
    hands during that time (a rebalance, which the rate then includes)."""
    redis = connect(settings.redis_url)
    partitions = range(settings.events_partitions)
    keys = [Keys(settings.key_prefix, settings.events_topic, p) for p in partitions]
    owners = [k.owner for k in keys]
    command = [sys.executable, "-m", "stream_app.cli", "worker", "--processes", str(processes),
               "--models", ",".join(config.models), "--batch-size", str(config.batch_size),
               "--commit-max", str(config.commit_max), "--sample-rate", str(config.sample_rate)]
    proc = subprocess.Popen(command, env=settings.environ(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not all(redis.exists(k) for k in owners):
            if proc.poll() is not None:
                raise RuntimeError(f"`{' '.join(command)}` exited with {proc.returncode}")
            time.sleep(0.005)
        start, epochs = time.perf_counter(), [int(redis.get(k.epoch) or 0) for k in keys]
        while applied_total(redis, settings.key_prefix, settings.events_topic, partitions) < n:
            time.sleep(0.005)
        rate = n / (time.perf_counter() - start)
        return rate, sum(int(redis.get(k.epoch) or 0) - e for k, e in zip(keys, epochs))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def measure_freshness(settings: Settings, config: WorkerConfig, n: int, rate: float) -> list[float]:
    """Freshness samples of a worker that has joined its group before the paced producer starts."""
    worker = Worker(settings, config)
    thread = threading.Thread(target=worker.run, kwargs={"stop_after": n})
    thread.start()
    while worker.started_at is None and thread.is_alive():
        time.sleep(0.05)
    produce_paced(settings, n, rate, seed=2)
    thread.join()
    return list(worker.freshness)


def produce_paced(settings: Settings, n: int, rate: float, seed: int) -> None:
    """Produce `n` events at `rate`/s with `ts` = their produce time (for freshness)."""
    with EventProducer(settings) as producer:
        start = time.monotonic()
        for j, event in enumerate(generate(SyntheticConfig(), n, seed)):
            ahead = start + j / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            producer.send(event.replace(ts=time.time(), event_id=None))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--models", default="pop")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--fresh-rate", type=float, default=2000.0, help="events/s of the freshness run")
    parser.add_argument("--processes", type=int, default=2, help="worker processes of the multi-process runs")
    parser.add_argument("--fresh-client", default="kafka-python", choices=kafka.CLIENTS)
    parser.add_argument("--baseline", default=None, help="also run the one-process worker of this commit, paired")
    parser.add_argument("--pairs", type=int, default=3, help="runs of each tree with --baseline")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    run = uuid.uuid4().hex[:8]
    settings = Settings().with_(events_topic=f"bench-{run}", metrics_topic=f"bench-metrics-{run}",
                                dlq_topic=f"bench-dlq-{run}", consumer_group=f"bench-{run}", key_prefix=f"bench-{run}")
    for line in embedded.up(settings):
        print(line)
    print(f"producing {args.events:,} synthetic events to {settings.events_topic}")
    with EventProducer(settings) as producer:
        for event in generate(SyntheticConfig(), args.events, seed=1):
            producer.send(event)

    raw_before = raw_consume_rate(settings, settings.events_topic, args.events)
    config = WorkerConfig(models=tuple(args.models.split(",")), batch_size=args.batch_size, sample_rate=args.sample_rate)
    e2e, steps, multi, handovers = {}, {}, {}, {}
    for client in kafka.CLIENTS:  # each run in its own group and key space, over the same events
        run_settings = settings.with_(kafka_client=client, consumer_group=f"bench-{run}-{client}",
                                      key_prefix=f"bench-{run}-{client}")
        e2e[client], steps[client] = worker_rate(run_settings, config, args.events)
        multi[client], handovers[client] = processes_rate(
            run_settings.with_(consumer_group=f"bench-{run}-{client}-p", key_prefix=f"bench-{run}-{client}-p"),
            config, args.events, args.processes,
        )

    raw = max(raw_before, raw_consume_rate(settings, settings.events_topic, args.events))  # the conservative baseline
    paired = {}
    if args.baseline:
        with tempfile.TemporaryDirectory(prefix="streamrec-baseline-") as tmp:
            paired = paired_rates(settings, config, args.events, checkout(args.baseline, Path(tmp) / "tree"), args.pairs)

    n_fresh = int(args.fresh_rate * 10)
    freshness = {}  # commit interval (ms) -> [p50, p99] s
    for interval in sorted({config.commit_interval_ms, 0}, reverse=True):
        fresh = settings.with_(events_topic=f"bench-fresh-{run}-{interval}", consumer_group=f"bench-fresh-{run}-{interval}",
                               key_prefix=f"bench-fresh-{run}-{interval}", kafka_client=args.fresh_client)
        kafka.ensure_topics(kafka.target(fresh), {fresh.events_topic: fresh.events_partitions})
        lat = np.array(measure_freshness(fresh, replace(config, commit_interval_ms=interval), n_fresh, args.fresh_rate))
        freshness[interval] = [round(float(np.percentile(lat, q)), 4) for q in (50, 99)]

    result = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "events": args.events, "models": args.models, "batch": args.batch_size, "sample_rate": args.sample_rate,
        "raw_consume_events_per_s": round(raw),
        "worker_events_per_s": {c: round(r) for c, r in e2e.items()},
        "ratio": {c: round(r / raw, 3) for c, r in e2e.items()},
        "processes": args.processes, "partitions": settings.events_partitions, "commit_max": config.commit_max,
        "worker_us_per_event": {c: {k: round(v, 2) for k, v in st.items()} for c, st in steps.items()},
        "worker_processes_events_per_s": {c: round(r) for c, r in multi.items()},
        "processes_ratio": {c: round(r / raw, 3) for c, r in multi.items()},
        "processes_handovers": handovers,
        "paired_with": args.baseline,
        "paired_events_per_s": {name: [round(r) for r in rates] for name, rates in paired.items()},
        "freshness_rate_events_per_s": args.fresh_rate,
        "freshness_p50_p99_s_by_commit_interval_ms": freshness,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "pipeline" if args.models == "pop" else "pipeline-" + args.models.replace(",", "-")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        "| measure | value |\n|---|---|\n"
        f"| raw kafka-python consume | {result['raw_consume_events_per_s']:,} events/s |\n"
        + "".join(
            f"| worker end to end on {c} ({args.models}, batch {args.batch_size}, {args.sample_rate:.0%} evaluated)"
            f" | {result['worker_events_per_s'][c]:,} events/s (ratio to raw {result['ratio'][c]:.2f}) |\n"
            for c in kafka.CLIENTS
        )
        + "".join(
            f"| {args.processes} worker processes on {settings.events_partitions} partitions, {c}"
            f" | {result['worker_processes_events_per_s'][c]:,} events/s (ratio to raw {result['processes_ratio'][c]:.2f}) |\n"
            for c in kafka.CLIENTS
        )
        + "".join(
            f"| one process, {name} ({args.baseline if name == 'baseline' else 'working tree'}), "
            f"{settings.kafka_client}, {args.pairs} runs alternating | median {np.median(rates):,.0f} events/s "
            f"({', '.join(f'{r:,.0f}' for r in rates)}) |\n" for name, rates in paired.items()
        )
        + "".join(
            f"| freshness ({args.fresh_client}, commit interval {ms} ms) at {args.fresh_rate:,.0f} events/s, p50 / p99"
            f" | {p50:.3f} s / {p99:.3f} s |\n" for ms, (p50, p99) in freshness.items()
        )
    )
    table += (
        "\n| one worker process, µs per event | " + " | ".join(steps[kafka.CLIENTS[0]]) + " |\n"
        + "|---|" + "---:|" * len(steps[kafka.CLIENTS[0]]) + "\n"
        + "".join(f"| {c} | " + " | ".join(f"{v:.1f}" for v in steps[c].values()) + " |\n" for c in kafka.CLIENTS)
    )
    (args.out / f"{name}.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
