"""Lookup benchmark: latency and throughput of `GET /recommendations` on loopback, and answer freshness.

Over 400 lines on purpose: one run sets up the data, the servers, the load and the report, so that
every figure comes from the same moments of a shared machine.

Run: `streamrec bench --only lookup` (or `python -m bench.lookup`). Starts its
own Tansu and Redis on free ports in a temporary directory, produces a stream
over a 20k-item catalogue (every item seen), lets a worker learn it (MF with
64 factors, plus popularity), then for each server configuration starts
`streamrec serve` as a separate process (the load generator runs in this
process, so server and client never share a GIL) and measures:
- closed loop: 16 concurrent clients, each sending its next request when the
  previous answer arrived (p50/p99 latency, requests/s);
- open loop: 500 requests/s on a fixed schedule, latency counted from the
  scheduled send time, a new connection opened whenever none is free (no
  coordinated omission: a slow server cannot slow the offered load down);
- `GET /items/{id}/similar` closed loop with 4 clients;
- when `wrk` is installed, the closed loop again from wrk (8 connections, a C client in its own
  process, as the scale-out issue measures it).
Requests mix known users (80%) and unknown ones (20%), with a device context.
The client is a small asyncio HTTP/1.1 keep-alive client on raw sockets
(uvloop when installed): on a 2-core machine an httpx client would take most
of a core away from the server it measures.

Configurations: `--workers 1` and `--workers 2` of the current code, the same
with popularity only, and (`--baseline REF`, e.g. HEAD before a change) the
code of a git revision serving popularity (or each of `--baseline-models`) from one process (or each
of `--baseline-workers`), all in the same run. With a baseline, the shard catch-up after a commit is
timed for its code too (before the servers start).

Freshness: with a worker running and the server answering, events of new
users are produced one at a time; the time from produce to the first answer
whose reasons point at that event's item is the freshness of one event.

Session lookups (`--models gru,pop`, or any session model first): the events
carry a `session_id` (sessions of ~SESSION_LEN events, interleaved, each of one
user), the worker writes every session's hidden state to Redis, and the
requests are `GET /recommendations?session_id=S&model=gru` for live sessions
(no unknown ones), so each answer runs the GRU from the session's state as the
server read it from Redis. Freshness is not measured there (session answers
carry no item reasons).

`--stream movielens` replays MovieLens latest-small instead (610 users with long histories, so reasons
have up to 50 recent items to explain from), and `--each` serves each model alone, so every model
answers with its own reasons (popularity alone explains through co-occurrence).

Writes bench/results/lookup.json and lookup.md (sessions_lookup.* for session lookups; lookup_movielens.*
for MovieLens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np

from bench.baseline import checkout
from bench.streams import movielens
from models import registry
from stream_app.core.events import encode, prepare
from stream_app.dev import embedded
from stream_app.io import kafka
from stream_app.io.redis import Keys, PartitionStore, connect
from stream_app.serving.cache import ModelCache
from stream_app.worker.config import WorkerConfig
from stream_app.worker.shard import Shard
from stream_app.worker.worker import Worker

RESULTS = Path(__file__).parent / "results"
WRK_SCRIPT = Path(__file__).parent / "wrk_paths.lua"
ROOT = Path(__file__).resolve().parent.parent
DEVICES = ("ios", "android", "web")
GOAL_OPEN_RATE, GOAL_P99_MS, GOAL_CLIENTS, GOAL_RPS = 500.0, 10.0, 16, 1000.0
WRK_CONNECTIONS = 8  # the closed loop of the scale-out issue: wrk with 8 connections
GOAL_BACKGROUND_RATE, GOAL_FRESH_P99_MS = 2000.0, 100.0  # event to answer p99 under this load
SESSION_LEN = 10  # mean events per session in the session workload


def make_events(n: int, items: int, users: int, seed: int, sessions: int = 0) -> list:
    """Zipf items, every item seen at least once; with `sessions`, each event belongs to one of them
    (session s, user s % users) and carries its `session_id`."""
    rng = np.random.default_rng(seed)
    zipf = rng.zipf(1.2, n) % items
    item_ids = np.where(np.arange(n) < items, np.arange(n), zipf)
    session_ids = rng.integers(0, sessions, n) if sessions else np.full(n, -1)
    user_ids = session_ids % users if sessions else rng.integers(0, users, n)
    devices = rng.integers(0, len(DEVICES), n)
    types = rng.choice(3, n, p=[0.8, 0.1, 0.1])
    t0 = time.time() - n * 0.01
    names = ("click", "purchase", "favorite")
    return [prepare({"user_id": f"u{u}", "item_id": f"i{i}", "event_type": names[t], "ts": t0 + j * 0.01,
                     "context": {"device": DEVICES[d]}, **({"session_id": f"s{s}"} if s >= 0 else {})})
            for j, (u, i, s, d, t) in enumerate(zip(user_ids.tolist(), item_ids.tolist(), session_ids.tolist(),
                                                    devices.tolist(), types.tolist()))]


def params(rng: random.Random, users: list[str], sessions: int = 0) -> dict:
    """A user lookup (80% known users), or with `sessions` a lookup of a live session."""
    if sessions:
        return {"session_id": f"s{rng.randrange(sessions)}", "k": "20", "context.device": rng.choice(DEVICES)}
    user = rng.choice(users) if rng.random() < 0.8 else f"new-{rng.randrange(10**9)}"
    return {"user_id": user, "k": "20", "context.device": rng.choice(DEVICES)}


def stats(latencies: list[float], seconds: float, errors: int) -> dict:
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "seconds": round(seconds, 2),
            "rps": round(len(latencies) / seconds, 1) if seconds > 0 else None,
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p90_ms": round(float(np.percentile(lat, 90)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "max_ms": round(float(lat.max()), 2) if len(lat) else None}


# --------------------------------------------------------------------------- a lean HTTP/1.1 client


class Conn:
    """One keep-alive HTTP/1.1 connection; `get` sends pre-encoded request bytes, returns (status, body)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        return cls(*await asyncio.open_connection(host, port))

    async def get(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    def close(self) -> None:
        self.writer.close()


def encode_get(host: str, port: int, path: str, query: dict) -> bytes:
    target = quote(path) + ("?" + urlencode(query) if query else "")
    return f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: keep-alive\r\n\r\n".encode()


async def closed_loop(host: str, port: int, clients: int, seconds: float, requests: list[bytes]) -> dict:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def run(seed: int) -> None:
        nonlocal errors
        conn = await Conn.open(host, port)
        j = seed * 7919
        try:
            while time.perf_counter() < stop:
                j += 1
                started = time.perf_counter()
                status, _ = await conn.get(requests[j % len(requests)])
                latencies.append(time.perf_counter() - started)
                errors += status != 200
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(run(s) for s in range(clients)))
    return {"clients": clients, **stats(latencies, time.perf_counter() - started, errors)}


async def open_loop(host: str, port: int, rate: float, seconds: float, requests: list[bytes]) -> dict:
    """A request due every 1/rate s; latency from the due time; a free connection or a new one, never a queue."""
    latencies: list[float] = []
    errors = 0
    idle: list[Conn] = []
    opened = 0
    tasks = set()

    async def one(due: float, request: bytes) -> None:
        nonlocal errors, opened
        conn = idle.pop() if idle else None
        try:
            try:
                if conn is None:
                    opened += 1
                    conn = await Conn.open(host, port)
                status, _ = await conn.get(request)
            except (asyncio.IncompleteReadError, ConnectionError):  # an idle keep-alive the server closed: retry
                if conn is not None:
                    conn.close()
                opened += 1
                conn = await Conn.open(host, port)
                status, _ = await conn.get(request)
        except (asyncio.IncompleteReadError, OSError):
            errors += 1
            latencies.append(time.perf_counter() - due)
            return
        latencies.append(time.perf_counter() - due)
        errors += status != 200
        idle.append(conn)

    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    for j in range(int(rate * seconds)):
        due = start + j / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(due, requests[j % len(requests)]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for conn in idle:
        conn.close()
    return {"target_rps": rate, "connections": opened, **stats(latencies, elapsed, errors)}


def wrk_closed_loop(host: str, port: int, connections: int, seconds: float, paths: list[str], tmp: Path) -> dict | None:
    """`wrk` (a C load generator in its own process, one thread) with `connections` keep-alive connections
    cycling through `paths`; None when wrk is not installed (Debian: `apt-get install wrk`)."""
    if shutil.which("wrk") is None:
        return None
    listing = tmp / f"wrk-paths-{port}.txt"
    listing.write_text("\n".join(paths) + "\n")
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(WRK_SCRIPT),
                          f"http://{host}:{port}"], env={**os.environ, "WRK_PATHS": str(listing)},
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    got = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    took = got["seconds_us"] / 1e6
    return {"clients": connections, "client": "wrk", "requests": got["requests"], "errors": got["errors"],
            "seconds": round(took, 2), "rps": round(got["requests"] / took, 1),
            **{f"{q}_ms": round(got[f"{q}_us"] / 1000, 2) for q in ("p50", "p90", "p99", "max")}}


def run_async(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# --------------------------------------------------------------------------- the server under test


def sockets_of(pid: int, port: int, status: str) -> list[int]:
    """Per child process of `pid` (recursively): how many of its TCP sockets of `port` are in `status`
    (a psutil.CONN_* value, e.g. "LISTEN" or "ESTABLISHED")."""
    import psutil

    return [sum(c.status == status and c.laddr.port == port for c in child.net_connections("tcp"))
            for child in psutil.Process(pid).children(recursive=True)]


class Server:
    """`streamrec serve` (or a git revision's) as a child process on a free port."""

    def __init__(self, env: dict, models: str, workers: int, log: Path, cwd: Path | None = None,
                 extra: tuple[str, ...] = ()):
        self.port, self.workers = embedded.free_port("127.0.0.1"), workers
        cmd = [sys.executable, "-m", "stream_app.cli", "serve", "--port", str(self.port), "--models", models, *extra]
        if workers != 1:
            cmd += ["--workers", str(workers)]
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until it answers /healthz and each of its worker processes listens (one that still loads would
        leave the first connections to the others)."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if (httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200
                        and (self.workers == 1 or sum(map(bool, sockets_of(self.proc.pid, self.port, "LISTEN")))
                             >= self.workers)):
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start; see {self.log.name}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def measure(server: Server, args, model: str, users: list[str], items: list[str], sessions: int, tmp: Path) -> dict:
    """`items`: item ids, most popular first."""
    rng = random.Random(0)
    host, port = "127.0.0.1", server.port
    recs = [encode_get(host, port, "/recommendations", {**params(rng, users, sessions), "model": model})
            for _ in range(4096)]
    similar = [encode_get(host, port, f"/items/{items[min(int(rng.paretovariate(1.0)), len(items)) - 1]}/similar",
                          {"k": "20"}) for _ in range(1024)]

    async def go() -> dict:
        await closed_loop(host, port, 4, 2.0, recs)  # warm-up: every worker process has loaded its shards
        out = {"closed_loop": await closed_loop(host, port, args.clients, args.seconds, recs)}
        await asyncio.sleep(0.5)
        out["open_loop"] = await open_loop(host, port, args.rate, args.seconds, recs)
        await asyncio.sleep(0.5)
        out["similar_closed_loop"] = await closed_loop(host, port, 4, args.seconds / 2, similar)
        return out

    out = run_async(go())
    paths = [r.split(b" ")[1].decode() for r in recs]  # the same requests, as wrk sends them
    wrk = wrk_closed_loop(host, port, WRK_CONNECTIONS, args.seconds, paths, tmp)
    return out if wrk is None else {**out, "wrk_closed_loop": wrk}


def _produce_load(settings, rate: float, users: list[str], items: list[str], stop) -> None:
    """`rate` events/s (known users, random items; 10 ms ticks) until `stop` is set."""
    rng, sent, started = random.Random(7), 0, time.perf_counter()
    with kafka.Sender(kafka.target(settings), config={"linger_ms": 5}) as sender:
        while not stop.is_set():
            due = int(rate * (time.perf_counter() - started))
            for _ in range(due - sent):
                event = prepare({"user_id": rng.choice(users), "item_id": rng.choice(items),
                                 "event_type": "click", "context": {"device": rng.choice(DEVICES)}})
                sender.send(settings.events_topic, encode(event), key=event.user_id.encode())
            sent = max(sent, due)
            time.sleep(0.01)


def background(settings, rate: float, users: list[str], items: list[str], stop) -> BaseProcess:
    """A process producing `rate` events/s until `stop` (a multiprocessing event) is set: its own
    interpreter, so the load does not slow the measuring client down."""
    load = multiprocessing.get_context("spawn").Process(target=_produce_load, args=(settings, rate, users, items, stop),
                                                        name="background-load", daemon=True)
    load.start()
    return load


def freshness(settings, env: dict, server: Server, models: str, samples: int, tmp: Path, items: list[str],
              users: list[str], rate: float) -> dict:
    """Produce one event of a new user at a time, among `rate` events/s of background load; time until
    an answer's reasons point at its item."""
    import httpx

    log = open(tmp / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "stream_app.cli", "worker", "--models", models,
                               "--sample-rate", "0"], env=env, stdout=log, stderr=subprocess.STDOUT)
    lags: list[float] = []
    missed, stop, load = 0, multiprocessing.get_context("spawn").Event(), None
    try:
        with kafka.Sender(kafka.target(settings), config={"linger_ms": 0}) as sender, \
                httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
            # the worker starts (restores its state, joins the group) before the clock runs
            warm = prepare({"user_id": f"warm-{uuid.uuid4().hex[:6]}", "item_id": items[2], "event_type": "click"})
            sender.send(settings.events_topic, encode(warm), key=warm.user_id.encode())
            sender.flush()
            if _reflected(client, warm.user_id, items[2], 120.0) is None:
                raise SystemExit(f"the worker did not start; see {tmp / 'worker.log'}")
            load = background(settings, rate, users, items, stop) if rate else None
            time.sleep(2.0)  # the load in full swing before the clock runs
            for j in range(samples):
                user, item = f"fresh-{uuid.uuid4().hex[:8]}", items[1 + j % 50]
                event = prepare({"user_id": user, "item_id": item, "event_type": "purchase",
                                 "context": {"device": "ios"}})
                produced = time.perf_counter()
                sender.send(settings.events_topic, encode(event), key=user.encode())
                sender.flush()
                seen = _reflected(client, user, item, 10.0)
                if seen is None:
                    missed += 1
                else:
                    lags.append(seen - produced)
                time.sleep(random.uniform(0.05, 0.3))  # not phase-locked to the worker's or cache's cycle
    finally:
        stop.set()
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()
    lat = np.array(lags) * 1000
    if load is not None:
        load.join(10)
    out: dict[str, Any] = {"samples": len(lags), "missed_after_10s": missed, "background_events_per_s": rate}
    if len(lat):
        out.update({f"p{q}_ms": round(float(np.percentile(lat, q)), 1) for q in (10, 50, 90, 99)})
        out.update({"min_ms": round(float(lat.min()), 1), "max_ms": round(float(lat.max()), 1),
                    "histogram_ms": _histogram(lat)})
    return out


def catch_up(settings, models: tuple[str, ...], items: list[str], commits: int = 20) -> dict:
    """Time a view of partition 0 catching up with one commit of one event (a new user), `commits` times:
    the cache's share of an event's way into an answer (p50 and max, ms)."""
    store = PartitionStore(connect(settings.redis_url), Keys(settings.key_prefix, settings.events_topic, 0))
    shard = Shard(store, WorkerConfig(models=models))
    shard.resume()  # claims the partition: the freshness worker claims it back
    cache = ModelCache(settings, models, background=False, refresh_interval=0.0)
    cache.refresh()  # every shard loaded whole once
    full, offset, times = cache.full_reloads, shard.offset or 0, []
    events = [encode(prepare({"user_id": f"catch-up-{j}", "item_id": items[j % 50], "event_type": "purchase"}))
              for j in range(commits)]
    with kafka.Sender(kafka.target(settings)) as sender:  # in the log as learned: the worker resumes after them
        for value in events:
            sender.send(settings.events_topic, value, partition=0)
    for j, value in enumerate(events):
        record = kafka.Record(settings.events_topic, 0, offset + j, None, value)
        shard.process(kafka.Messages.of([record]), lambda msg, reason: None)
        shard.commit()
        started = time.perf_counter()
        cache.shard(0)
        times.append(1000 * (time.perf_counter() - started))
    assert cache.full_reloads == full, "a catch-up read the whole shard"
    return {"p50_ms": round(float(np.median(times)), 1), "max_ms": round(max(times), 1)}


def baseline_catch_up(base_dir: Path, env: dict, models: tuple[str, ...], items: list[str]) -> dict:
    """`catch_up` as the code in `base_dir` (a baseline's checkout) does it, in a process of its own."""
    code = ("import json, sys; from bench.lookup import catch_up; from stream_app.core.settings import Settings; "
            "models, items = json.loads(sys.stdin.read()); print(json.dumps(catch_up(Settings(), tuple(models), items)))")
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps([models, items]), capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(base_dir)}, cwd=base_dir, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _reflected(client, user: str, item: str, timeout: float) -> float | None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        r = client.get("/recommendations", params={"user_id": user, "k": "5"})
        if r.status_code == 200:
            items = r.json()["items"]
            if items and items[0]["reason"].get("item_id") == item:
                return time.perf_counter()
        time.sleep(0.005)
    return None


def _histogram(lat_ms: np.ndarray) -> dict[str, int]:
    edges = [0, 100, 250, 500, 750, 1000, 1500, 2000, 5000, float("inf")]
    counts, _ = np.histogram(lat_ms, bins=edges)
    return {(f"{int(a)}-{int(b)}" if b != float("inf") else f">={int(a)}"): int(c)
            for a, b, c in zip(edges[:-1], edges[1:], counts)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", choices=("synthetic", "movielens"), default="synthetic",
                        help="the Zipf stream below, or MovieLens latest-small (long user histories)")
    parser.add_argument("--limit", type=int, default=None, help="MovieLens: only the first N ratings")
    parser.add_argument("--each", action="store_true",
                        help="serve each model alone (its own reasons) instead of the first beside the others")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--models", default="mf,pop", help="models the worker runs and the API serves (first one is "
                        "queried; a session model first, e.g. gru,pop, measures session lookups)")
    parser.add_argument("--workers", default="1,2", help="server worker-process counts to measure")
    parser.add_argument("--baseline", default=None,
                        help="also measure this git revision's server, e.g. HEAD before a change")
    parser.add_argument("--baseline-models", default="pop",
                        help="the models the baseline serves, each alone (comma-separated)")
    parser.add_argument("--baseline-workers", default="1", help="server worker-process counts of the baseline")
    parser.add_argument("--clients", type=int, default=GOAL_CLIENTS)
    parser.add_argument("--rate", type=float, default=GOAL_OPEN_RATE)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--freshness-samples", type=int, default=100)
    parser.add_argument("--background-rate", type=float, default=GOAL_BACKGROUND_RATE,
                        help="events/s produced besides the timed ones while freshness is measured")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    tmp = Path(tempfile.mkdtemp(prefix="streamrec-lookup-"))
    query = registry.create(models[0]).query
    if args.stream == "movielens":  # user lookups, whatever the model
        events, sessions, query = movielens(limit=args.limit), 0, "user"
    else:
        sessions = args.events // SESSION_LEN if query == "session" else 0
        events = make_events(args.events, args.items, args.users, seed=0, sessions=sessions)
    users = sorted({e.user_id for e in events})
    items = [i for i, _ in Counter(e.item_id for e in events).most_common()]
    result: dict = {"bench": "lookup", "stream": args.stream, "query": query, "models": list(models),
                    "items": len(items), "users": len(users), "events": len(events),
                    **({"sessions": sessions} if sessions else {}),
                    "host": platform.node(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_average_at_start": list(os.getloadavg()),
                    "http": _http_stack(), "clients": args.clients, "rate": args.rate}
    if "mf" in models:
        from models.mf import MF

        result["factors"] = MF().dim
    with embedded.EmbeddedServers(tmp) as servers:
        tag = uuid.uuid4().hex[:8]
        settings = servers.settings(events_topic=f"events-{tag}", consumer_group=f"bench-{tag}",
                                    key_prefix=f"bench-{tag}")
        kafka.ensure_topics(kafka.target(settings), embedded.topic_partitions(settings))
        print(f"producing {len(events)} events over {len(items)} items ...", flush=True)
        with kafka.Sender(kafka.target(settings), config={"linger_ms": 20}) as sender:
            for e in events:
                sender.send(settings.events_topic, encode(e), key=e.user_id.encode())
        print(f"worker learning with {','.join(models)} ...", flush=True)
        started = time.perf_counter()
        Worker(settings, WorkerConfig(models=models, batch_size=1000, sample_rate=0.0)).run(max_idle=3)
        result["worker_seconds"] = round(time.perf_counter() - started, 1)

        cache = ModelCache(settings, models, background=False)
        reloads = []
        for _ in range(3):
            t = time.perf_counter()
            view = cache._load(0).prepare()
            reloads.append(time.perf_counter() - t)
        result["shard_reload_ms"] = round(1000 * min(reloads), 1)
        result["items_per_shard"] = int(view.valid_items.sum())
        env = settings.environ()
        env["PYTHONPATH"] = str(ROOT)
        base_dir = checkout(args.baseline, tmp / "baseline") if args.baseline else None
        if not sessions:
            result["shard_catch_up_ms"] = catch_up(settings, models, items)
            if base_dir is not None:
                result["baseline_shard_catch_up_ms"] = baseline_catch_up(base_dir, env, models, items)
        if args.each:  # each model served alone: its reasons come from its own state
            configs: list[tuple[str, str, str, int, Path | None]] = [
                (f"{m} alone, --workers {w}", m, m, int(w), None) for m in models for w in args.workers.split(",")]
        else:
            configs = [(f"{models[0]}, --workers {w}", ",".join(models), models[0], int(w), None)
                       for w in args.workers.split(",")]
            if models[0] != "pop":
                configs.append(("pop, --workers 1", ",".join(models), "pop", 1, None))
        if base_dir is not None:
            configs += [(f"{m}, baseline {args.baseline}" + (f", --workers {w}" if w != "1" else ""), m, m, int(w),
                         base_dir) for m in args.baseline_models.split(",") for w in args.baseline_workers.split(",")]
        runs: list[dict] = []
        first_server: Server | None = None
        for name, serve_models, model, workers, cwd in configs:
            print(f"measuring {name} ...", flush=True)
            run_env = dict(env)
            if cwd is not None:
                run_env["PYTHONPATH"] = str(cwd)
            server = Server(run_env, serve_models, workers, tmp / f"serve-{len(runs)}.log", cwd=cwd)
            try:
                server.wait_ready()
                got = measure(server, args, model, users, items, sessions, tmp)
            finally:
                if name != f"{configs[0][0]}":
                    server.stop()
            runs.append({"config": name, "model": model, "workers": workers, **got})
            if name == configs[0][0]:
                first_server = server
        result["runs"] = runs
        assert first_server is not None, "no server was measured"
        try:
            if not sessions:
                print("freshness ...", flush=True)
                result["freshness"] = freshness(settings, env, first_server, configs[0][1],
                                                args.freshness_samples, tmp, items, users, args.background_rate)
        finally:
            first_server.stop()
    result["goals"] = _goals(runs, args)
    _write(result, args)
    return result


def _http_stack() -> str:
    parts = []
    for mod in ("uvloop", "httptools"):
        try:
            __import__(mod)
            parts.append(mod)
        except ImportError:
            pass
    return "uvicorn + " + (" + ".join(parts) if parts else "asyncio + h11")


def _goals(runs: list[dict], args) -> dict:
    """Each goal against each run of the current code (baselines left out)."""
    out = {}
    for r in runs:
        if "baseline" in r["config"]:
            continue
        o, c = r["open_loop"], r["closed_loop"]
        out[r["config"]] = {
            f"open loop {args.rate:g} req/s p99 <= {GOAL_P99_MS:g} ms": {
                "p99_ms": o["p99_ms"], "achieved_rps": o["rps"],
                "met": bool(o["p99_ms"] is not None and o["p99_ms"] <= GOAL_P99_MS and o["errors"] == 0)},
            f"{args.clients} clients p99 <= {GOAL_P99_MS:g} ms": {
                "p99_ms": c["p99_ms"], "met": bool(c["p99_ms"] is not None and c["p99_ms"] <= GOAL_P99_MS
                                                   and c["errors"] == 0)},
            f"{args.clients} clients >= {GOAL_RPS:g} req/s": {
                "rps": c["rps"], "met": bool(c["rps"] is not None and c["rps"] >= GOAL_RPS and c["errors"] == 0)},
        }
        if (w := r.get("wrk_closed_loop")) is not None:
            out[r["config"]][f"wrk, {WRK_CONNECTIONS} connections p99 <= {GOAL_P99_MS:g} ms"] = {
                "p99_ms": w["p99_ms"], "rps": w["rps"], "met": bool(w["p99_ms"] <= GOAL_P99_MS and w["errors"] == 0)}
    return out


def _write(result: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "sessions_lookup" if result["query"] == "session" else "lookup"
    if result["stream"] != "synthetic":
        stem += f"_{result['stream']}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    what = (f"session lookups of {result['sessions']} live sessions" if result["query"] == "session"
            else "user lookups")
    stream = "MovieLens latest-small, " if result["stream"] == "movielens" else ""
    lines = [f"# Lookup benchmark ({stream}{what}; {', '.join(result['models'])}; {result['items']} items, "
             f"{result['items_per_shard']} per shard" + (f", {result['factors']} factors" if "factors" in result else "")
             + f"; {result['cpus']} CPUs, load average {result['load_average_at_start'][0]:.1f} at start; "
             f"{result['http']})", ""]
    if "note" in result:
        lines += [result["note"], ""]
    lines += ["| server | load | requests/s | p50 ms | p99 ms | max ms | errors |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        for label, key in ((f"closed loop, {args.clients} clients", "closed_loop"),
                           (f"wrk, {WRK_CONNECTIONS} connections", "wrk_closed_loop"),
                           (f"open loop, {args.rate:g} req/s", "open_loop"),
                           ("similar items, 4 clients", "similar_closed_loop")):
            if key not in r:
                continue
            m = r[key]
            lines.append(f"| {r['config']} | {label} | {m['rps']} | {m['p50_ms']} | {m['p99_ms']} | {m['max_ms']} "
                         f"| {m['errors']} |")
    lines += ["", "Goals:", ""]
    for config, goals in result["goals"].items():
        for goal, got in goals.items():
            shown = {k: v for k, v in got.items() if k != "met"}
            lines.append(f"- {config}: {goal}: {'met' if got['met'] else 'NOT met'} ({shown})")
    f = result.get("freshness", {})
    if f.get("samples"):
        goal = "met" if f["p99_ms"] <= GOAL_FRESH_P99_MS else "NOT met"
        lines += ["", f"Freshness (event produced -> reflected in an answer, {f['samples']} events among "
                      f"{f['background_events_per_s']:g} events/s of other users' events, "
                      f"{f['missed_after_10s']} not within 10 s; p99 <= {GOAL_FRESH_P99_MS:g} ms {goal}): "
                      f"p10 {f['p10_ms']} ms, p50 {f['p50_ms']} ms, p90 {f['p90_ms']} ms, p99 {f['p99_ms']} ms, "
                      f"max {f['max_ms']} ms; "
                      f"histogram {f['histogram_ms']}."]
    lines += ["", f"Shard rebuild from Redis (load + prepare): {result['shard_reload_ms']} ms."]
    if "shard_catch_up_ms" in result:
        c = result["shard_catch_up_ms"]
        lines += [f"Shard catch-up after a commit (the rows it changed + prepare): p50 {c['p50_ms']} ms, "
                  f"max {c['max_ms']} ms."]
    if "baseline_shard_catch_up_ms" in result:
        c = result["baseline_shard_catch_up_ms"]
        lines += [f"Shard catch-up after a commit, baseline {args.baseline}: p50 {c['p50_ms']} ms, max {c['max_ms']} ms."]
    lines += [""]
    text = "\n".join(lines)
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
