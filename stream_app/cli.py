"""The `streamrec` command line. Commands import what they need when they run, so `--help` is quick."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer

from stream_app.core.errors import ConfigError, StreamrecError
from stream_app.core.settings import Settings
from stream_app.worker.config import OFFSET_GAP_POLICIES, WorkerConfig

app = typer.Typer(
    help="streamrec: a streaming, incremental recommender (Kafka in, online models, Redis state).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Bootstrap = typer.Option(None, "--bootstrap", help="Kafka bootstrap servers [env STREAMREC_KAFKA_BOOTSTRAP]")
RedisUrl = typer.Option(None, "--redis-url", help="Redis URL [env STREAMREC_REDIS_URL]")
FormatOpt = typer.Option("auto", "--format", help="auto|jsonl|csv|movielens")
RateOpt = typer.Option(None, "--rate", help="events per second (default: as fast as possible)")


def settings(**overrides: object) -> Settings:
    """Settings from the environment with flag overrides; a bad value exits with a clear message."""
    from pydantic import ValidationError

    try:
        return Settings().with_(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        fail(StreamrecError(f"setting {field} (env STREAMREC_{field.upper()}): {err['msg']} (got {err.get('input')!r})"))
        raise  # unreachable: fail() exits


def fail(exc: StreamrecError) -> None:
    typer.secho(f"error: {exc}", fg="red", err=True)
    raise typer.Exit(2)


@app.command()
def up(
    bootstrap: Optional[str] = Bootstrap,
    redis_url: Optional[str] = RedisUrl,
    partitions: Optional[int] = typer.Option(None, help="partitions of the events topic"),
) -> None:
    """Start the embedded Kafka-compatible broker (Tansu) and Redis, when none answers."""
    from stream_app.dev import embedded

    try:
        for line in embedded.up(settings(kafka_bootstrap=bootstrap, redis_url=redis_url, events_partitions=partitions)):
            typer.echo(line)
    except StreamrecError as exc:
        fail(exc)


@app.command()
def down(bootstrap: Optional[str] = Bootstrap, redis_url: Optional[str] = RedisUrl) -> None:
    """Stop what `streamrec up` started (and nothing else)."""
    from stream_app.dev import embedded

    try:
        for line in embedded.down(settings(kafka_bootstrap=bootstrap, redis_url=redis_url)):
            typer.echo(line)
    except StreamrecError as exc:
        fail(exc)


@app.command()
def produce(
    input: Optional[Path] = typer.Option(None, "--input", help="replay this file"),
    format: str = FormatOpt,
    synthetic: bool = typer.Option(False, "--synthetic", help="generate a seeded synthetic stream"),
    rate: Optional[float] = RateOpt,
    limit: Optional[int] = typer.Option(None, "--limit", help="stop after N events"),
    topic: Optional[str] = typer.Option(None, "--topic", help="topic [env STREAMREC_EVENTS_TOPIC]"),
    seed: int = typer.Option(0, "--seed", help="seed of the synthetic stream"),
    bootstrap: Optional[str] = Bootstrap,
) -> None:
    """Send events to Kafka: replay a file or generate a synthetic stream."""
    from producers import replay

    if (input is None) == (not synthetic):
        fail(StreamrecError("give exactly one of --input FILE or --synthetic"))
    try:
        summary = replay.produce_cli(
            settings(kafka_bootstrap=bootstrap, events_topic=topic),
            input=input, format=format, synthetic=synthetic, rate=rate, limit=limit, seed=seed,
        )
    except StreamrecError as exc:
        fail(exc)
    typer.echo(summary)


WORKER = WorkerConfig()  # the worker's defaults, defined once in WorkerConfig
ModelsOpt = typer.Option("pop", "--models", help="comma-separated model names (see `streamrec evaluate --help`)")


@app.command()
def worker(
    models: str = ModelsOpt,
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1, help=f"max events per micro-batch (default {WORKER.batch_size})"
    ),
    max_wait_ms: Optional[int] = typer.Option(
        None, "--max-wait-ms", min=1, help=f"max wait for a batch to fill (default {WORKER.max_wait_ms})"
    ),
    commit_max: Optional[int] = typer.Option(
        None, "--commit-max", min=1,
        help="max events per Redis commit (a backlog is learned in micro-batches, committed together)"
        f" (default {WORKER.commit_max})",
    ),
    commit_interval_ms: Optional[int] = typer.Option(
        None, "--commit-interval-ms", min=0,
        help=f"a busy stream commits to Redis at most this often (an idle one at once) (default {WORKER.commit_interval_ms})",
    ),
    sample_rate: Optional[float] = typer.Option(
        None, "--sample-rate", min=0.0, max=1.0, help=f"share of events evaluated (default {WORKER.sample_rate})"
    ),
    k: Optional[int] = typer.Option(None, "--k", min=1, help=f"cut-off of recall@k and friends (default {WORKER.k})"),
    window: Optional[int] = typer.Option(
        None, "--window", min=1, help="evaluated events per partition in the metric records' rolling figures"
        f" (default {WORKER.window})",
    ),
    group: Optional[str] = typer.Option(None, "--group", help="consumer group [env STREAMREC_CONSUMER_GROUP]"),
    topic: Optional[str] = typer.Option(None, "--topic", help="events topic [env STREAMREC_EVENTS_TOPIC]"),
    max_idle: Optional[float] = typer.Option(
        None, "--max-idle", help="exit after this many idle seconds once no partition of the topic lags"
    ),
    idle_expiry: Optional[float] = typer.Option(
        None, "--idle-expiry", min=1.0, help="expire users and items idle this many seconds of stream time (bounds memory)"
    ),
    max_clock_skew: Optional[float] = typer.Option(
        None, "--max-clock-skew", min=0.0,
        help="events whose ts is more than this many seconds ahead of this host's clock go to the dead letters;"
        f" inf: no limit (default {WORKER.max_clock_skew:g})",
    ),
    client: Optional[str] = typer.Option(
        None, "--client", help="Kafka client library: kafka-python or confluent [env STREAMREC_KAFKA_CLIENT]"
    ),
    on_offset_gap: Optional[str] = typer.Option(
        None, "--on-offset-gap",
        help="when a partition's stored offset is past the log's end (the broker lost its log): stop (the partition "
        "stops and alerts), earliest (learn the new log from its start, keeping the model) or latest (from its end)"
        f" (default {WORKER.on_offset_gap})",
    ),
    shared_items: Optional[bool] = typer.Option(
        None, "--shared-items/--local-items",
        help="one item vocabulary and item state for all partitions, each shard folding in the others' item "
        "changes (README \"Scale-out\"); or each partition's own (default: "
        f"{'shared' if WORKER.shared_items else 'local'})",
    ),
    align_slack: Optional[float] = typer.Option(
        None, "--align-slack", min=0.0,
        help="with --shared-items: a partition learns no event more than this many seconds of stream time (event "
        "ts) later than the slowest partition with events to learn, and is paused until that one catches up, so "
        "that what the shards fold in is their present, not their past or future (README \"Scale-out\"); 0: "
        f"partitions are not aligned (default {WORKER.align_slack:g})",
    ),
    processes: int = typer.Option(
        1, "--processes", min=1, help="group members to run, one process each (up to one per partition and core)"
    ),
    bootstrap: Optional[str] = Bootstrap,
    redis_url: Optional[str] = RedisUrl,
) -> None:
    """Run a stream worker: joins the consumer group, evaluates then learns, writes state to Redis."""
    import logging

    from models.registry import parse_names
    from stream_app.worker.processes import run_processes
    from stream_app.worker.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        given: dict[str, Any] = dict(batch_size=batch_size, max_wait_ms=max_wait_ms, commit_max=commit_max,
                     commit_interval_ms=commit_interval_ms, sample_rate=sample_rate, k=k, window=window,
                     idle_expiry=idle_expiry, on_offset_gap=on_offset_gap, shared_items=shared_items)
        if on_offset_gap is not None and on_offset_gap not in OFFSET_GAP_POLICIES:
            raise ConfigError(f"--on-offset-gap must be one of {', '.join(OFFSET_GAP_POLICIES)} (got {on_offset_gap!r})")
        config = replace(WORKER, models=tuple(parse_names(models)), **{n: v for n, v in given.items() if v is not None})
        if max_clock_skew is not None:
            config = replace(config, max_clock_skew=None if math.isinf(max_clock_skew) else max_clock_skew)
        if align_slack is not None:
            config = replace(config, align_slack=align_slack or None)
        conf = settings(kafka_bootstrap=bootstrap, redis_url=redis_url, consumer_group=group, events_topic=topic,
                        kafka_client=client)
        if processes == 1:
            Worker(conf, config).run(max_idle=max_idle)
        elif run_processes(conf, config, processes, max_idle):
            raise typer.Exit(1)
    except StreamrecError as exc:
        fail(exc)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="port to listen on"),
    models: Optional[str] = typer.Option(
        None, "--models", help="comma-separated models to serve (the worker must run them) [env STREAMREC_API_MODELS]",
    ),
    topic: Optional[str] = typer.Option(None, "--topic", help="events topic [env STREAMREC_EVENTS_TOPIC]"),
    partitions: Optional[int] = typer.Option(
        None, "--partitions", help="partitions of the events topic [env STREAMREC_EVENTS_PARTITIONS]",
    ),
    refresh: Optional[float] = typer.Option(
        None, "--refresh", min=0.01, help="seconds between checks of a shard's model version [env STREAMREC_API_REFRESH]",
    ),
    workers: int = typer.Option(
        1, "--workers", min=1,
        help="uvicorn worker processes on the port, each listening on a socket of its own (SO_REUSEPORT: the kernel "
             "spreads connections over them). More processes use more cores (no shared GIL) but each holds and "
             "refreshes its own copy of every shard (N x memory, N x reload work per model version)",
    ),
    ann_threshold: Optional[int] = typer.Option(
        None, "--ann-threshold", min=0,
        help="items per shard from which embedding models answer through an hnswlib index (exact below) "
             "[env STREAMREC_API_ANN_THRESHOLD]",
    ),
    bootstrap: Optional[str] = Bootstrap,
    redis_url: Optional[str] = RedisUrl,
) -> None:
    """Serve the lookup HTTP API (recommendations, similar items, POST /events, /metrics) from Redis state."""
    import os

    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # before numpy loads, here and in worker processes
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from models.registry import parse_names
    from stream_app.serving.api import create_app
    from stream_app.serving.http import CoalescingHttpToolsProtocol, OwnSocketPerProcess, bound_socket

    conf = settings(kafka_bootstrap=bootstrap, redis_url=redis_url, events_topic=topic, events_partitions=partitions,
                    api_models=models, api_refresh=refresh, api_ann_threshold=ann_threshold)
    try:
        names = ",".join(parse_names(conf.api_models))
        conf = conf.with_(api_models=names)
        if workers == 1:
            app_ = create_app(conf)
    except StreamrecError as exc:
        fail(exc)
    # Bound before saying so: a taken port fails here, with what to do.
    try:
        address = bound_socket(host, port) if workers == 1 else OwnSocketPerProcess(host, port, workers)
    except OSError as exc:
        fail(ConfigError(f"cannot listen on {host}:{port} ({exc}): choose another --port or stop what holds it"))
    typer.echo(f"serving on http://{host}:{port} (models: {names}; {workers} worker process(es))")
    # loop: uvloop if installed; http: httptools, one socket write per response
    options: dict[str, Any] = dict(host=host, port=port, log_level="warning", access_log=False,
                                   http=CoalescingHttpToolsProtocol)
    try:
        if workers == 1:
            server = uvicorn.Server(uvicorn.Config(app_, **options))
            server.run(sockets=[address])  # type: ignore[list-item]
            if not server.started:  # its start-up failed (logged above)
                raise typer.Exit(3)
        else:
            # Worker processes import the app by name and read their settings (API options included) from the
            # environment.
            os.environ.update(conf.environ())
            config = uvicorn.Config("stream_app.serving.api:app_from_env", factory=True, workers=workers, **options)
            Multiprocess(config, sockets=[address]).run()  # type: ignore[list-item]
    finally:
        address.close()


@app.command()
def evaluate(
    input: Path = typer.Option(..., "--input", help="events file (jsonl, csv or MovieLens)"),
    format: str = FormatOpt,
    model: str = typer.Option("pop", "--model", "--models", help="model name(s), comma-separated"),
    k: int = typer.Option(20, "--k", min=1),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="events learned together (1: freshest)"),
    include_seen: bool = typer.Option(False, "--include-seen/--exclude-seen", help="rank already-seen items too"),
    sort: bool = typer.Option(True, "--sort/--no-sort", help="replay in timestamp order"),
    limit: Optional[int] = typer.Option(None, "--limit", help="only the first N events"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Evaluate-then-learn over a file, without Kafka or Redis (the worker's models and evaluator)."""
    from stream_app.evaluation.offline import evaluate_file

    try:
        result = evaluate_file(
            input, format=format, models=model, k=k, batch_size=batch_size, exclude_seen=not include_seen,
            sort=sort, limit=limit,
        )
    except StreamrecError as exc:
        fail(exc)
    if json_out:
        import orjson

        typer.echo(orjson.dumps(result).decode())
    else:
        from stream_app.evaluation.offline import result_table

        result_table(result)


@app.command()
def metrics(
    bootstrap: Optional[str] = Bootstrap,
    topic: Optional[str] = typer.Option(None, "--topic", help="metrics topic [env STREAMREC_METRICS_TOPIC]"),
    from_beginning: bool = typer.Option(False, "--from-beginning", help="replay every record on the topic"),
    exit_after: Optional[float] = typer.Option(None, "--exit-after", help="stop after this many seconds"),
) -> None:
    """Follow the metrics topic and show a live table per model."""
    from stream_app.monitor.terminal import follow

    try:
        follow(settings(kafka_bootstrap=bootstrap, metrics_topic=topic), from_beginning, exit_after)
    except StreamrecError as exc:
        fail(exc)


@app.command()
def monitor(
    terminal: bool = typer.Option(False, "--terminal", help="live rich table in the terminal instead of the web page"),
    host: str = typer.Option("127.0.0.1", "--host", help="dashboard address"),
    port: int = typer.Option(8050, "--port", help="dashboard port"),
    tumbling: int = typer.Option(10, "--tumbling", min=1, help="tumbling window size, seconds"),
    hopping: str = typer.Option("30,10", "--hopping", help="hopping window SIZE,STEP in seconds (SIZE a multiple of STEP)"),
    lag_interval: float = typer.Option(2.0, "--lag-interval", min=0.1, help="seconds between consumer-lag samples"),
    lag_group: Optional[str] = typer.Option(
        None, "--lag-group", help="consumer group whose lag is watched (default: the workers')"
    ),
    bootstrap: Optional[str] = Bootstrap,
    redis_url: Optional[str] = RedisUrl,
) -> None:
    """Watch the metrics topic: faust windowed tables, consumer lag, drift alerts, web dashboard (or --terminal)."""
    import logging

    from stream_app.monitor.service import run
    from stream_app.monitor.windows import check_windows

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        size, step = (float(x) for x in hopping.split(","))
        check_windows(tumbling, (size, step))
    except ValueError as exc:
        raise typer.BadParameter(f"--tumbling/--hopping: {exc}") from None
    try:
        run(settings(kafka_bootstrap=bootstrap, redis_url=redis_url), host=host, port=port, terminal=terminal,
            tumbling=tumbling, hopping=(size, step), lag_interval=lag_interval, lag_group=lag_group)
    except StreamrecError as exc:
        fail(exc)


@app.command()
def demo(
    input: Optional[Path] = typer.Option(None, "--input", help="replay this file instead of a synthetic stream"),
    format: str = FormatOpt,
    events: int = typer.Option(30_000, "--events", min=1, help="how many events to replay"),
    models: str = typer.Option("pop,mf,gru,markov", "--models", help="models the worker runs"),
    rate: Optional[float] = RateOpt,
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    keep_running: bool = typer.Option(False, "--keep-running", help="leave broker and Redis up afterwards"),
) -> None:
    """The main job on embedded defaults: up, topics, worker, replay, progress, final table, clean stop."""
    from stream_app.dev.demo import run_demo

    try:
        run_demo(settings(), input=input, format=format, n_events=events, models=models, rate=rate,
                 batch_size=batch_size, keep_running=keep_running)
    except StreamrecError as exc:
        fail(exc)


@app.command()
def status(
    json_out: bool = typer.Option(False, "--json", help="print one JSON object: topic, partitions, workers"),
    stale_after: Optional[float] = typer.Option(
        None, "--stale-after", min=0.0, help="flag a partition with lag and no commit for this many seconds (default 60)",
    ),
    topic: Optional[str] = typer.Option(None, "--topic", help="events topic [env STREAMREC_EVENTS_TOPIC]"),
    bootstrap: Optional[str] = Bootstrap,
    redis_url: Optional[str] = RedisUrl,
) -> None:
    """Per partition: owner, stored offset, the log's start and end, lag, age of the last commit.
    Exits 1 when a partition has a problem (offset gap, truncated, no log, stalled)."""
    import logging

    from stream_app.worker.status import as_json, partition_status, render

    logging.getLogger("kafka").setLevel(logging.ERROR)  # the client's warnings (slow polls) are noise here
    conf = settings(kafka_bootstrap=bootstrap, redis_url=redis_url, events_topic=topic)
    try:
        rows = partition_status(conf, stale_after)
    except StreamrecError as exc:
        fail(exc)
    if json_out:
        import orjson

        typer.echo(orjson.dumps(as_json(conf, rows)).decode())
    else:
        render(conf, rows)
    if any(r.problem for r in rows):
        raise typer.Exit(1)


keys_app = typer.Typer(help="API keys of the lookup API (stored as SHA-256 hashes in STREAMREC_API_KEYS_FILE).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("add")
def keys_add(
    name: str = typer.Argument(..., help="the key's name: it shows in errors and prefixes the event ids it writes"),
    scope: list[str] = typer.Option(["events:write"], "--scope", help="events:write and/or read (repeatable)"),
) -> None:
    """Create a key and print it once; only its hash is stored."""
    from stream_app.serving.keys import KeyStore, keys_file

    store = KeyStore(keys_file(settings()))
    try:
        token = store.add(name, scope)
    except StreamrecError as exc:
        fail(exc)
    typer.echo(f"added key {name!r} ({', '.join(sorted(set(scope)))}) to {store.path}; it is shown only now:", err=True)
    typer.echo(token)


@keys_app.command("list")
def keys_list() -> None:
    """The keys' names and scopes (the keys themselves are not stored)."""
    from stream_app.serving.keys import KeyStore, keys_file

    store = KeyStore(keys_file(settings()))
    try:
        keys = store.keys()
    except StreamrecError as exc:
        fail(exc)
    for key in keys:
        typer.echo(f"{key.name}\t{','.join(sorted(key.scopes))}")
    if not keys:
        typer.echo(f"no keys in {store.path}; create one with `streamrec keys add NAME --scope events:write`", err=True)


@keys_app.command("remove")
def keys_remove(name: str = typer.Argument(..., help="the key to remove")) -> None:
    """Remove a key; the API refuses it within a second."""
    from stream_app.serving.keys import KeyStore, keys_file

    store = KeyStore(keys_file(settings()))
    try:
        removed = store.remove(name)
    except StreamrecError as exc:
        fail(exc)
    if not removed:
        fail(StreamrecError(f"no key named {name!r} in {store.path}"))
    typer.echo(f"removed key {name!r}")


BENCHES = ("pipeline", "quality", "sessions", "lookup", "memory", "api_memory", "scale")


@app.command()
def bench(
    only: str = typer.Option("pipeline", "--only", help=f"comma-separated benchmarks: {', '.join(BENCHES)}, or all"),
    quality: bool = typer.Option(False, "--quality", help="also the model-quality benchmark (MovieLens)"),
    events: Optional[int] = typer.Option(None, "--events", help="events of the pipeline benchmark"),
) -> None:
    """Run the benchmarks (bench/); results go to bench/results/ as JSON and markdown."""
    import importlib

    names = list(BENCHES) if only == "all" else [n.strip() for n in only.split(",") if n.strip()]
    if quality and "quality" not in names:
        names.append("quality")
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        fail(StreamrecError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)} or all"))
    for name in names:
        typer.secho(f"== bench {name}", bold=True)
        argv = ["--events", str(events)] if name == "pipeline" and events else []
        try:
            importlib.import_module(f"bench.{name}").main(argv)
        except StreamrecError as exc:
            fail(exc)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
