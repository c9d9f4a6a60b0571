"""Lookup benchmark: latency and throughput of `GET /recommendations` on loopback.

Run: `streamrec bench --only lookup` (or `python -m bench.lookup`). Starts its
own Tansu and Redis on free ports in a temporary directory, produces a stream
over a 20k-item catalogue (every item seen), lets a worker learn it, starts
`streamrec serve` as a separate process, then measures:
- closed loop: 16 concurrent clients, each sending its next request when the
  previous answer arrived (p50/p99 latency, requests/s);
- open loop: 500 requests/s on a fixed schedule, latency counted from the
  scheduled send time (no coordinated omission);
- `GET /items/{id}/similar` closed loop with 4 clients;
- the time to rebuild one shard from Redis (what a version change costs).
Requests mix known users (80%) and unknown ones (20%), with a device context.
Writes JSON and a markdown table under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

from models.registry import MODELS
from producers.schema import encode, prepare
from stream_app import embedded, kafka
from stream_app.serving import ModelCache
from stream_app.worker import Worker, WorkerConfig

RESULTS = Path(__file__).parent / "results"
DEVICES = ("ios", "android", "web")


def make_events(n: int, items: int, users: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    zipf = rng.zipf(1.2, n) % items
    item_ids = np.where(np.arange(n) < items, np.arange(n), zipf)  # every item is seen at least once
    user_ids = rng.integers(0, users, n)
    devices = rng.integers(0, len(DEVICES), n)
    types = rng.choice(3, n, p=[0.8, 0.1, 0.1])
    t0 = time.time() - n * 0.01
    names = ("click", "purchase", "favorite")
    return [prepare({"user_id": f"u{u}", "item_id": f"i{i}", "event_type": names[t], "ts": t0 + j * 0.01,
                     "context": {"device": DEVICES[d]}})
            for j, (u, i, d, t) in enumerate(zip(user_ids.tolist(), item_ids.tolist(), devices.tolist(), types.tolist()))]


def params(rng: random.Random, users: int) -> dict:
    user = f"u{rng.randrange(users)}" if rng.random() < 0.8 else f"new-{rng.randrange(10**9)}"
    return {"user_id": user, "k": "20", "context.device": rng.choice(DEVICES)}


def stats(latencies: list[float], seconds: float, errors: int) -> dict:
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "seconds": round(seconds, 2),
            "rps": round(len(latencies) / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "max_ms": round(float(lat.max()), 2) if len(lat) else None}


def closed_loop(base: str, clients: int, seconds: float, make) -> dict:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def run(seed: int) -> None:
        rng = random.Random(seed)
        mine, bad = [], 0
        with httpx.Client(base_url=base, timeout=10) as client:
            while time.perf_counter() < stop:
                path, query = make(rng)
                started = time.perf_counter()
                r = client.get(path, params=query)
                mine.append(time.perf_counter() - started)
                bad += r.status_code != 200
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(s,)) for s in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats(latencies, time.perf_counter() - started, errors[0])


def open_loop(base: str, rate: float, seconds: float, make, senders: int = 64) -> dict:
    """Requests due every 1/rate s, sent by `senders` threads; latency counts from the due time
    (a request that waits for a free sender is late, so overload shows; no coordinated omission)."""
    import queue as queues

    rng = random.Random(1)
    jobs: queues.Queue = queues.Queue()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def sender() -> None:
        mine, bad = [], 0
        with httpx.Client(base_url=base, timeout=10) as client:
            while (job := jobs.get()) is not None:
                due, path, query = job
                r = client.get(path, params=query)
                mine.append(time.perf_counter() - due)
                bad += r.status_code != 200
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    for j in range(int(rate * seconds)):
        due = start + j / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        jobs.put((due, *make(rng)))
    for _ in threads:
        jobs.put(None)
    for t in threads:
        t.join()
    out = stats(latencies, time.perf_counter() - start, errors[0])
    out["target_rps"] = rate
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--models", default="mf,pop" if "mf" in MODELS else "pop",
                        help="models the worker runs and the API serves (first one is queried)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    tmp = Path(tempfile.mkdtemp(prefix="streamrec-lookup-"))
    result: dict = {"bench": "lookup", "models": list(models), "items": args.items, "users": args.users,
                    "events": args.events, "host": platform.node(), "python": platform.python_version(),
                    "cpus": os.cpu_count()}
    if "mf" not in models:
        result["note"] = "MF is not in models.registry yet: measured with context-aware popularity (pop)"
    with embedded.EmbeddedServers(tmp) as servers:
        tag = uuid.uuid4().hex[:8]
        settings = servers.settings(events_topic=f"events-{tag}", consumer_group=f"bench-{tag}",
                                    key_prefix=f"bench-{tag}")
        kafka.ensure_topics(settings.kafka_bootstrap, embedded.topic_partitions(settings))
        print(f"producing {args.events} events over {args.items} items ...", flush=True)
        with kafka.Sender(settings.kafka_bootstrap, config={"linger_ms": 20}) as sender:
            for e in make_events(args.events, args.items, args.users, seed=0):
                sender.send(settings.events_topic, encode(e), key=e.user_id.encode())
        print(f"worker learning with {','.join(models)} ...", flush=True)
        started = time.perf_counter()
        Worker(settings, WorkerConfig(models=models, batch_size=1000, sample_rate=0.0)).run(max_idle=3)
        result["worker_seconds"] = round(time.perf_counter() - started, 1)

        cache = ModelCache(settings, models)
        reloads = []
        for _ in range(3):
            t = time.perf_counter()
            view = cache._load(0)
            reloads.append(time.perf_counter() - t)
        result["shard_reload_ms"] = round(1000 * min(reloads), 1)
        result["items_per_shard"] = int(view.valid_items.sum())

        port = embedded.free_port("127.0.0.1")
        env = dict(os.environ, STREAMREC_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
                   STREAMREC_REDIS_URL=settings.redis_url, STREAMREC_EVENTS_TOPIC=settings.events_topic,
                   STREAMREC_KEY_PREFIX=settings.key_prefix,
                   STREAMREC_EVENTS_PARTITIONS=str(settings.events_partitions))
        log = open(tmp / "serve.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "stream_app.cli", "serve", "--port", str(port),
                                 "--models", ",".join(models)], env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"serve did not start; see {tmp / 'serve.log'}")
                time.sleep(0.1)
            model = models[0]

            def recs(rng: random.Random):
                return "/recommendations", {**params(rng, args.users), "model": model}

            def similar(rng: random.Random):
                return f"/items/i{min(int(rng.paretovariate(1.0)), args.items - 1)}/similar", {"k": "20"}

            closed_loop(base, 4, 2.0, recs)  # warm-up: shard views loaded, JIT compiled
            print(f"closed loop: {args.clients} clients for {args.seconds}s ...", flush=True)
            result["closed_loop"] = {"clients": args.clients, **closed_loop(base, args.clients, args.seconds, recs)}
            print(f"open loop: {args.rate} req/s for {args.seconds}s ...", flush=True)
            result["open_loop"] = open_loop(base, args.rate, args.seconds, recs)
            result["similar_closed_loop"] = {"clients": 4, **closed_loop(base, 4, args.seconds / 2, similar)}
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lookup.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [("closed loop, %d clients" % args.clients, result["closed_loop"]),
            ("open loop, %g req/s" % args.rate, result["open_loop"]),
            ("similar items, 4 clients", result["similar_closed_loop"])]
    table = (f"# Lookup benchmark ({', '.join(models)}; {args.items} items, {result['items_per_shard']} per shard)\n\n"
             + (f"{result['note']}\n\n" if "note" in result else "")
             + "| load | requests/s | p50 ms | p99 ms | max ms | errors |\n|---|---|---|---|---|---|\n"
             + "".join(f"| {name} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['errors']} |\n"
                       for name, r in rows)
             + f"\nShard rebuild from Redis: {result['shard_reload_ms']} ms.\n")
    (args.out / "lookup.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
