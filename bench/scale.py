"""Scale benchmark: MovieLens or the synthetic stream through P partitions and W workers, quality from the metrics topic.

Run: `streamrec bench --only scale` (or `python -m bench.scale`). Starts its own Tansu and Redis on free
ports; then, for each (partitions, workers) of the grid, on fresh topics with that many partitions:
`streamrec worker --processes W --batch-size 1 --sample-rate 1 --window N` (every event evaluated, each
scored as its partition's models stood after learning every earlier event of the partition, the metric
window covering the whole replay), the MovieLens ratings produced as fast as possible keyed by user once
every partition is claimed, and measured:
- recall@k and AUC of each model pooled over all partitions, from each worker's last metric record on
  the metrics topic (windows pooled by their `evaluated` counts); events ranked, cold start, repeats;
- events/s end to end: from the first event produced until Redis counts every event applied;
- commit µs per event: the workers' own commit time (`seconds` in their metric records) over the events;
- Redis commands per event: `INFO commandstats` over the same span (commands run by the commit script
  included), this benchmark's own polling subtracted;
- freshness: after the replay, rounds of one marker event per partition (ts = now); the time until the
  partition's applied count in Redis moves, p50/p99.
`--items local,shared` runs the grid with each partition learning its own items (`--local-items`) and with
one item state for all partitions (`--shared-items`, README "Scale-out"). `--baseline REF` runs the
workers of commit REF over the same grid in the same run, with local items (REF must have `worker
--window`). Writes bench/results/scale.json and scale.md.
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
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from bench.baseline import checkout
from bench.streams import MOVIELENS, movielens, synthetic
from producers.producer import EventProducer
from producers.replay import replay
from stream_app.core.events import Event, encode, prepare
from stream_app.core.settings import Settings
from stream_app.dev import embedded
from stream_app.io import kafka
from stream_app.io.redis import Keys, applied_total, connect
from stream_app.monitor.pooling import latest_by_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
POLL = 0.02  # seconds between reads of the applied counters while waiting


def command_counts(redis) -> Counter:
    """Calls per command since the server started (`INFO commandstats`, scripts' commands included;
    INFO itself left out: only this benchmark sends it)."""
    stats = redis.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()
                    if not name.startswith("cmdstat_info")})


class Workers:
    """`streamrec worker --processes W` of a source tree, as a child process with its log in a file."""

    def __init__(self, settings: Settings, tree: Path, processes: int, models: str, k: int, window: int, log: Path,
                 extra: tuple[str, ...] = ()):
        self.command = [sys.executable, "-m", "stream_app.cli", "worker", "--processes", str(processes),
                        "--models", models, "--batch-size", "1", "--sample-rate", "1.0", "--k", str(k),
                        "--window", str(window), *extra]
        self.log = log
        env = {**settings.environ(), "PYTHONPATH": str(tree)}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(self.command, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)

    def check(self) -> None:
        """Raise when the workers have exited (with the end of their log)."""
        if self.proc.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"`{' '.join(self.command)}` exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def get_each(redis, names: list[str]) -> list:
    """GET of each key, one pipelined round trip (the partitions' keys live in different cluster slots,
    which one MGET may not span)."""
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.get(name)
    return pipe.execute()


def wait_claimed(redis, keys: list[Keys], members: int, workers: Workers, timeout: float = 180.0) -> None:
    """Wait until every partition is claimed and `members` distinct workers hold them (the group settled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers.check()
        owners = get_each(redis, [k.worker for k in keys])
        if all(owners) and len(set(owners)) == members:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the partitions were not all claimed by {members} worker(s) within {timeout:.0f} s")


def wait_applied(redis, settings: Settings, n: int, workers: Workers, timeout: float) -> tuple[float, int, int]:
    """Poll until Redis counts `n` applied events; returns when (perf_counter), how many polls it took and
    the count."""
    partitions = range(settings.events_partitions)
    polls, deadline = 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        polls += 1
        applied = applied_total(redis, settings.key_prefix, settings.events_topic, partitions)
        if applied >= n:
            return time.perf_counter(), polls, applied
        workers.check()
        time.sleep(POLL)
    raise RuntimeError(f"fewer than {n} events applied after {timeout:.0f} s")


def final_records(settings: Settings, n: int, models: list[str], timeout: float = 60.0) -> dict[tuple[str, str], dict]:
    """The latest metric record per (worker, model) once they account for all `n` applied events: every
    worker's records of every model carry the same `applied`, and those sum to `n` (a worker reports
    within `metrics_interval` seconds when idle)."""
    consumer = kafka.consumer(kafka.target(settings), None)
    tp = kafka.TopicPartition(settings.metrics_topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    latest: dict[tuple[str, str], dict] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for messages in consumer.poll(timeout_ms=500).values():
                for msg in messages:
                    rec = orjson.loads(msg.value)
                    latest[(rec["worker"], rec["model"])] = rec
            applied: dict[str, set[Any]] = {w: {latest.get((w, m), {}).get("applied") for m in models} for w, _ in latest}
            counts = [a.pop() for a in applied.values() if len(a) == 1 and None not in a]
            if len(counts) == len(applied) and sum(counts) == n:  # each worker's records agree, and add up
                return latest
    finally:
        consumer.close()
    raise RuntimeError(f"the metric records did not account for {n} applied events within {timeout:.0f} s: "
                       f"{ {k: r.get('applied') for k, r in latest.items()} }")


def freshness(redis, settings: Settings, rounds: int, timeout: float = 30.0) -> list[float]:
    """Seconds from a marker event's ts (its produce time) until its partition's applied count moves:
    `rounds` rounds of one marker per partition, each round waiting for all of them."""
    keys = [Keys(settings.key_prefix, settings.events_topic, p) for p in range(settings.events_partitions)]
    samples: list[float] = []
    with kafka.Sender(kafka.target(settings)) as sender:
        for r in range(rounds):
            before = [int(v or 0) for v in get_each(redis, [k.applied for k in keys])]
            sent = {}
            for p in range(len(keys)):
                event = prepare({"user_id": f"scale-marker-{p}", "item_id": "scale-marker", "event_type": "click"})
                sender.send(settings.events_topic, encode(event), key=event.user_id.encode(), partition=p)
                sent[p] = event.ts
            sender.flush()
            deadline = time.monotonic() + timeout
            while sent:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"marker round {r}: partitions {sorted(sent)} did not apply within {timeout:.0f} s")
                now = time.time()
                applied = get_each(redis, [keys[p].applied for p in sent])
                for p, value in zip(list(sent), applied):
                    if int(value or 0) > before[p]:
                        samples.append(now - sent.pop(p))
                time.sleep(0.002)
    return samples


def run(servers: Settings, events: list[Event], partitions: int, processes: int, models: list[str], k: int,
        rounds: int, tree: Path, tmp: Path, extra: tuple[str, ...] = (), rate: float | None = None) -> dict:
    """One grid point: fresh topics with `partitions` partitions, the workers of `tree`, the replay, the figures."""
    tag = uuid.uuid4().hex[:8]
    settings = servers.with_(events_topic=f"scale-{tag}", metrics_topic=f"scale-metrics-{tag}",
                             dlq_topic=f"scale-dlq-{tag}", alerts_topic=f"scale-alerts-{tag}",
                             consumer_group=f"scale-{tag}", key_prefix=f"scale-{tag}", events_partitions=partitions)
    kafka.ensure_topics(kafka.target(settings), embedded.topic_partitions(settings))
    redis = connect(settings.redis_url)
    keys = [Keys(settings.key_prefix, settings.events_topic, p) for p in range(partitions)]
    n = len(events)

    # This benchmark's own commands per poll of the applied counters, while nothing else talks to Redis.
    before = command_counts(redis)
    applied_total(redis, settings.key_prefix, settings.events_topic, range(partitions))
    per_poll = command_counts(redis) - before

    workers = Workers(settings, tree, processes, ",".join(models), k, window=n, log=tmp / f"workers-{tag}.log",
                      extra=extra)
    try:
        wait_claimed(redis, keys, min(processes, partitions), workers)
        before = command_counts(redis)
        start = time.perf_counter()
        with EventProducer(settings, config={"linger_ms": 20}) as producer:
            if rate is None:
                producer.send_many(iter(events))
            else:
                replay(events, producer, rate=rate)
        produced = time.perf_counter() - start
        end, polls, applied = wait_applied(redis, settings, n, workers, timeout=max(600.0, n / 50))
        used = command_counts(redis) - before
        for name, calls in per_poll.items():
            used[name] -= calls * polls
        records = final_records(settings, n, models)
        fresh = np.array(freshness(redis, settings, rounds))
    finally:
        workers.stop()
    per_worker = {w: r for (w, _), r in records.items()}  # one record per worker: the counters are the worker's
    seconds: Counter[str] = Counter()
    for r in per_worker.values():
        seconds.update(r.get("seconds", {}))
    pooled = latest_by_model(records)
    return {
        "partitions": partitions, "workers": processes, "events": n, "applied": applied,
        "produce_s": round(produced, 2), "seconds": round(end - start, 2),
        "events_per_s": round(n / (end - start), 1),
        "commit_us_per_event": round(1e6 * seconds["commit"] / n, 2) if seconds else None,
        "worker_us_per_event": {step: round(1e6 * s / n, 2) for step, s in seconds.items()},
        "redis_commands_per_event": round(sum(used.values()) / n, 4),
        "redis_commands": {name: c for name, c in used.most_common() if c},  # over the replay
        "commits": used["publish"],  # the commit script's runs (each publishes once; other scripts read logs, rows)
        "freshness_p50_p99_ms": [round(1000 * float(np.percentile(fresh, q)), 1) for q in (50, 99)],
        "freshness_samples": len(fresh),
        "reporting_workers": len(per_worker),
        "models": {m: {
            "recall": round(row["recall"], 4), "auc": round(row["auc"], 4), "ranked": row["evaluated"],
            "ranked_total": sum(r["evaluated_total"] for (_, name), r in records.items() if name == m),
            "cold_start": row["cold_start"], "repeat": row["repeat"],
        } for m, row in pooled.items()},
    }


def _delta(value: float, first: float) -> str:
    return f"{value - first:+.4f}"


COLUMNS = (  # (rich header, markdown header)
    ("P", "partitions"), ("W", "workers"), ("model", "model"), ("recall@{k}", "recall@{k}"),
    ("Δ", "Δ recall vs first row"), ("AUC", "AUC"), ("Δ", "Δ AUC"), ("ranked", "ranked"), ("cold", "cold start"),
    ("repeat", "repeat"), ("events/s", "events/s"), ("×", "events/s vs first row"), ("commit µs", "commit µs/event"),
    ("Redis cmd", "Redis commands/event"), ("fresh ms", "freshness p50 / p99 ms"),
)


def _partial(row: dict, model: dict) -> bool:
    """Whether a model's last metric records cover fewer events than the replay (a shard reloaded mid-replay
    counts from its reload)."""
    return model["ranked"] + model["cold_start"] + model["repeat"] < row["events"]


def render(result: dict) -> tuple[Table, str]:
    """The rich table and the markdown page of a result; deltas and ratios against the first grid row
    of the same tree."""
    trees = len(result["runs"]) > 1
    cols = [(short.format(k=result["k"]), long.format(k=result["k"])) for short, long in COLUMNS]
    cols = [("tree", "tree")] * trees + cols
    table = Table(title=f"scale: {result['dataset']}, {result['events']:,} events, batch 1, every event evaluated")
    for short, _ in cols:
        table.add_column(short, justify="left" if short in ("tree", "model") else "right")
    lines = ["| " + " | ".join(long for _, long in cols) + " |",
             "|" + "|".join("---" if short in ("tree", "model") else "---:" for short, _ in cols) + "|"]
    for tree, rows in result["runs"].items():
        first = rows[0]
        for row in rows:
            for model, m in row["models"].items():
                base = first["models"].get(model, m)
                commit = row["commit_us_per_event"]
                cells = [tree] * trees + [
                    str(row["partitions"]) + " *" * _partial(row, m), str(row["workers"]), model, f"{m['recall']:.4f}",
                    _delta(m["recall"], base["recall"]), f"{m['auc']:.4f}", _delta(m["auc"], base["auc"]),
                    f"{m['ranked']:,}", f"{m['cold_start']:,}", f"{m['repeat']:,}", f"{row['events_per_s']:,.0f}",
                    f"{row['events_per_s'] / first['events_per_s']:.2f}", "-" if commit is None else f"{commit:.1f}",
                    f"{row['redis_commands_per_event']:.4f}", "{:.0f} / {:.0f}".format(*row["freshness_p50_p99_ms"])]
                table.add_row(*cells)
                lines.append("| " + " | ".join(cells) + " |")
    pace = f"at {result['rate']:,.0f} events/s" if result.get("rate") else "as fast as possible"
    head = (f"# Scale benchmark ({result['when']})\n\n{result['dataset']}, the first {result['events']:,} events in "
            f"time order, produced {pace} keyed by user, through P partitions and `streamrec worker "
            f"--processes W --batch-size 1 --sample-rate 1{' ' + result['worker_args'] if result.get('worker_args') else ''}` "
            f"with {', '.join(result['models'])}. Recall and AUC are "
            f"pooled over all partitions from the metrics topic; events/s from the first event produced to the last "
            f"applied in Redis; freshness from {result['rounds']} rounds of one marker event per partition after the "
            f"replay. Machine: {result['machine']}; the grid took {result['grid_minutes']} minutes.\n\n")
    if any(_partial(row, m) for rows in result["runs"].values() for row in rows for m in row["models"].values()):
        lines += ["", "\\* The workers' last metric records cover only part of the replay: partitions were assigned "
                  "anew mid-replay, and a reloaded shard's evaluator counts from its reload. Not comparable."]
    steps = list(next(iter(result["runs"].values()))[0]["worker_us_per_event"])
    lines += ["", "Worker time per event by step, µs (all worker processes' seconds over the events), and commits:", "",
              "| " + "tree | " * trees + "partitions | workers | " + " | ".join(steps) + " | commits | events/commit |",
              "|" + "---|" * trees + "---:|" * (len(steps) + 4)]
    for tree, rows in result["runs"].items():
        for row in rows:
            lines.append("| " + f"{tree} | " * trees + f"{row['partitions']} | {row['workers']} | "
                         + " | ".join(f"{row['worker_us_per_event'].get(s, 0):.1f}" for s in steps)
                         + f" | {row['commits']:,} | {row['events'] / max(row['commits'], 1):,.0f} |")
    return table, head + "\n".join(lines) + "\n"


def warm_up(tree: Path, path: Path, models: str) -> None:
    """Compile `tree`'s models' kernels into its numba cache, so that no grid point pays for it."""
    subprocess.run([sys.executable, "-m", "stream_app.cli", "evaluate", "--input", str(path), "--models", models,
                    "--limit", "2000", "--json"], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True,
                   capture_output=True)


def main(argv: list[str] | None = None, servers: Settings | None = None) -> dict:
    """Run the grid; `servers`: Settings of a running broker and Redis (default: start both on free ports)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", default="1,2,4,8", help="partitions of each grid point")
    parser.add_argument("--workers", default="1,2,2,2", help="worker processes of each grid point")
    parser.add_argument("--models", default="mf,pop")
    parser.add_argument("--limit", type=int, default=None, help="only the first N ratings")
    parser.add_argument("--input", type=Path, default=MOVIELENS, help="MovieLens ratings.csv")
    parser.add_argument("--stream", choices=("movielens", "synthetic"), default="movielens",
                        help="replay MovieLens (--input) or the synthetic stream with planted device effects")
    parser.add_argument("--synthetic-events", type=int, default=60_000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20, help="freshness marker rounds per grid point")
    parser.add_argument("--items", default="local,shared", help="item state of the workers: local, shared or both")
    parser.add_argument("--baseline", default=None, help="also run the workers of this commit over the grid")
    parser.add_argument("--rate", type=float, default=None,
                        help="produce this many events/s (default: as fast as possible, a backlog)")
    parser.add_argument("--worker-args", default="", help='more options of `streamrec worker`, e.g. "--commit-max 256"')
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    grid = list(zip((int(p) for p in args.partitions.split(",")), (int(w) for w in args.workers.split(","))))
    if len(grid) != len(args.partitions.split(",")) or len(grid) != len(args.workers.split(",")):
        parser.error("--partitions and --workers need the same number of values")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.stream == "movielens":
        events, dataset = movielens(args.input, args.limit), f"MovieLens {args.input.parent.name}"
    else:
        events, dataset = synthetic(args.limit or args.synthetic_events), "The synthetic stream (seed 0)"
    result: dict = {
        "bench": "scale", "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs shared with other jobs, load average "
                   f"{os.getloadavg()[0]:.1f} at start, Python {platform.python_version()}",
        "dataset": dataset, "events": len(events), "models": models, "k": args.k,
        "grid": grid, "rounds": args.rounds, "baseline": args.baseline,
        "worker_args": args.worker_args, "rate": args.rate, "runs": {},
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="streamrec-scale-") as tmp_dir:
        tmp = Path(tmp_dir)
        sample = args.input
        if args.stream == "synthetic":  # what the warm-up evaluates
            sample = tmp / "synthetic.jsonl"
            sample.write_bytes(b"\n".join(encode(e) for e in events[:2000]) + b"\n")
        items = [i.strip() for i in args.items.split(",") if i.strip()]
        if set(items) - {"local", "shared"}:
            parser.error(f"--items takes local and/or shared, not {args.items!r}")
        more = tuple(args.worker_args.split())
        trees: dict[str, tuple[Path, tuple[str, ...]]] = {
            f"{item} items": (ROOT, (f"--{item}-items", *more)) for item in items}
        if args.baseline:
            trees[args.baseline] = (checkout(args.baseline, tmp / "baseline"), more)
        with ExitStack() as stack:
            if servers is None:
                servers = stack.enter_context(embedded.EmbeddedServers(tmp)).settings()
            for name, (tree, extra) in trees.items():
                warm_up(tree, sample, ",".join(models))
                result["runs"][name] = []
                for partitions, processes in grid:
                    print(f"{name}: {partitions} partition(s), {processes} worker process(es) ...", flush=True)
                    result["runs"][name].append(run(servers, events, partitions, processes, models, args.k,
                                                    args.rounds, tree, tmp, extra, args.rate))
    result["grid_minutes"] = round((time.monotonic() - started) / 60, 1)
    table, page = render(result)
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # a log gets the whole table
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "scale.md").write_text(page)
    return result


if __name__ == "__main__":
    main()
