"""`streamrec worker --processes N`: one group member per process, signals forwarded."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from dataclasses import replace

from stream_app.core.settings import Settings
from stream_app.worker.config import WorkerConfig
from stream_app.worker.worker import Worker


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
