"""`streamrec demo`: the whole pipeline on embedded defaults, start to summary, cleaned up after."""

from __future__ import annotations

import itertools
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from models.registry import parse_names
from producers.producer import EventProducer
from producers.readers import EventReader
from producers.replay import replay
from producers.synthetic import SyntheticConfig, generate
from stream_app.core.errors import ServiceError
from stream_app.core.events import Event
from stream_app.core.settings import Settings
from stream_app.dev import embedded
from stream_app.io.redis import applied_total, connect
from stream_app.monitor.pooling import latest_by_model
from stream_app.monitor.terminal import read_records, table

console = Console()


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _already_up(settings: Settings) -> bool:
    """Whether the broker and Redis answer already; `ConfigError` for addresses the demo cannot manage
    (a Redis Cluster, say: start the services yourself and run the worker, API and producer by hand)."""
    kafka, redis = embedded.kafka_address(settings.kafka_bootstrap), embedded.redis_address(settings.redis_url)
    return _listening(*kafka) and _listening(*redis)


def run_demo(
    base: Settings,
    input: Path | None = None,
    format: str = "auto",
    n_events: int = 30_000,
    models: str = "pop,mf,gru,markov",
    rate: float | None = None,
    batch_size: int = 256,
    keep_running: bool = False,
    seed: int = 0,
) -> dict:
    """Run the demo; returns the pooled final metrics per model."""
    names = parse_names(models)
    settings = base.with_(key_prefix=f"{base.key_prefix}-demo-{int(time.time())}")
    state_dir = Path(settings.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    started_servers = not _already_up(settings)
    console.rule("streamrec demo")
    for line in embedded.up(settings):
        console.print(line)
    worker = _start(settings, "worker", "--models", ",".join(names), "--batch-size", str(batch_size), "--sample-rate", "0.2")
    console.print(f"worker started (pid {worker.pid}, models {', '.join(names)})")
    helpers = []
    api_port, dash_port = _free_or_none(8000), _free_or_none(8050)
    if api_port:
        helpers.append(_start(settings, "serve", "--port", str(api_port), "--models", ",".join(names)))
        console.print(f"lookup API: http://127.0.0.1:{api_port}/recommendations?user_id=...  (docs at /docs)")
    if dash_port:
        helpers.append(_start(settings, "monitor", "--port", str(dash_port)))
        console.print(f"live dashboard: http://127.0.0.1:{dash_port}/")
    redis = connect(settings.redis_url)
    try:
        events: Iterable[Event]
        if input is not None:
            reader = EventReader(input, format)
            reader.sort_by_time = reader.format == "movielens"
            events = itertools.islice(iter(reader), n_events)
            source = f"{input} ({reader.format})"
        else:
            events = generate(SyntheticConfig(), n_events, seed)
            source = f"synthetic stream (seed {seed})"
        console.print(f"replaying {n_events:,} events from {source} to topic {settings.events_topic!r}")
        with EventProducer(settings) as producer:
            stats = replay(events, producer, rate=rate, limit=n_events, progress=True)
        console.print(stats.summary())
        _wait_learned(settings, redis, stats.sent, worker)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        ours = f"{socket.gethostname()}-{worker.pid}"  # the worker's id (WorkerConfig.worker_id)
        rows = latest_by_model({k: r for k, r in read_records(settings, timeout=3.0).items() if k[0] == ours})
        console.print(table(rows, f"final metrics per model (k=20, batch {batch_size}, {stats.sent:,} events)"))
        if api_port:
            _show_lookup(api_port, "mf" if "mf" in names else names[0])
        return rows
    finally:
        for proc in [worker, *helpers]:
            _stop(proc)
        if not keep_running:
            removed = sum(redis.delete(k) for k in redis.scan_iter(match=f"{{{settings.key_prefix}:*", count=1000))
            console.print(f"removed {removed} demo keys from Redis")
            if started_servers:
                for line in embedded.down(settings):
                    console.print(line)
        else:
            console.print(f"left running; state under Redis key prefix {settings.key_prefix!r}")


def _start(settings: Settings, command: str, *args: str) -> subprocess.Popen:
    """A `streamrec <command>` child with these settings, logging to the state dir."""
    log = Path(settings.state_dir) / f"demo-{command}.log"
    return subprocess.Popen(
        [sys.executable, "-m", "stream_app.cli", command, *args],
        env=settings.environ(), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _free_or_none(port: int) -> int | None:
    return None if _listening("127.0.0.1", port) else port


def _show_lookup(port: int, model: str) -> None:
    """Ask the running API for one user's recommendations and print them."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    for _ in range(40):
        try:
            answer = httpx.get(f"{base}/recommendations", params={"user_id": "u0", "k": 5, "model": model}, timeout=2.0)
            break
        except httpx.HTTPError:
            time.sleep(0.25)
    else:
        console.print("the lookup API did not answer; see demo-serve.log in the state dir")
        return
    console.print(f"GET /recommendations?user_id=u0&k=5&model={model} -> {answer.status_code}")
    console.print_json(answer.text)


def _wait_learned(settings: Settings, redis, target: int, worker: subprocess.Popen, timeout: float = 300.0) -> None:
    """Show the worker's progress until it applied `target` events."""
    partitions = range(settings.events_partitions)
    with Progress(TextColumn("learning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("learning", total=target)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = applied_total(redis, settings.key_prefix, settings.events_topic, partitions)
            bar.update(task, completed=done)
            if done >= target:
                return
            if worker.poll() is not None:
                raise ServiceError(f"the worker exited with code {worker.returncode}; see its log in {settings.state_dir}")
            time.sleep(0.25)
    raise ServiceError(f"the worker did not learn {target} events within {timeout:.0f} s; see its log in {settings.state_dir}")
