"""The `streamrec` command line (DESIGN.md section 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stream_app.errors import StreamrecError
from stream_app.settings import Settings

app = typer.Typer(
    help="streamrec: a streaming, incremental recommender (Kafka in, online models, Redis state).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Bootstrap = typer.Option(None, "--bootstrap", help="Kafka bootstrap servers [env STREAMREC_KAFKA_BOOTSTRAP]")
RedisUrl = typer.Option(None, "--redis-url", help="Redis URL [env STREAMREC_REDIS_URL]")


def settings(**overrides: object) -> Settings:
    return Settings().with_(**overrides)


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
    from stream_app import embedded

    try:
        for line in embedded.up(settings(kafka_bootstrap=bootstrap, redis_url=redis_url, events_partitions=partitions)):
            typer.echo(line)
    except StreamrecError as exc:
        fail(exc)


@app.command()
def down(bootstrap: Optional[str] = Bootstrap, redis_url: Optional[str] = RedisUrl) -> None:
    """Stop what `streamrec up` started (and nothing else)."""
    from stream_app import embedded

    try:
        for line in embedded.down(settings(kafka_bootstrap=bootstrap, redis_url=redis_url)):
            typer.echo(line)
    except StreamrecError as exc:
        fail(exc)


@app.command()
def produce(
    input: Optional[Path] = typer.Option(None, "--input", help="replay this file"),
    format: str = typer.Option("auto", "--format", help="auto|jsonl|csv|movielens"),
    synthetic: bool = typer.Option(False, "--synthetic", help="generate a seeded synthetic stream"),
    rate: Optional[float] = typer.Option(None, "--rate", help="events per second (default: as fast as possible)"),
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
