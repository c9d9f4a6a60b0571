"""Lookup API memory against the user base: the server's resident memory as the users grow 10x.

Run: `streamrec bench --only api_memory` (or `python -m bench.api_memory`). Starts its own Tansu
and Redis; for each user count (default 20,000 and 200,000 users over one 2,000-item catalogue,
three events each) writes the state a worker would (its shards driven directly, so no broker sets
the pace), then starts `streamrec serve` for each served configuration, asks every shard once (a
user lookup and a similar-items lookup) and reads the server's resident memory (RSS). Configurations:
`mf,pop`, whose answers are explained by embeddings, and `pop` alone (the default), explained by
co-occurrence, for which a view keeps an index of the users' histories; `--baseline REF` adds a git revision's
server in both configurations, measured in the same run.

Writes bench/results/api_memory.json and api_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil

from bench.baseline import checkout
from bench.lookup import ROOT, Server
from stream_app.core.events import encode, prepare
from stream_app.dev import embedded
from stream_app.io import kafka
from stream_app.io.redis import Keys, PartitionStore, connect
from stream_app.serving.cache import user_partition
from stream_app.worker.config import WorkerConfig
from stream_app.worker.shard import Shard

RESULTS = Path(__file__).parent / "results"
CHUNK = 5000  # events per commit


def write_state(settings, models: tuple[str, ...], users: int, items: int, per_user: int, seed: int) -> None:
    """Every user's `per_user` events (Zipf-ish items), learned and committed by one shard per partition."""
    rng = random.Random(seed)
    shards = {}
    for p in range(settings.events_partitions):
        store = PartitionStore(connect(settings.redis_url), Keys(settings.key_prefix, settings.events_topic, p))
        shards[p] = Shard(store, WorkerConfig(models=models))
        shards[p].resume()
    pending: dict[int, list[kafka.Record]] = {p: [] for p in shards}
    offsets = dict.fromkeys(shards, 0)
    t0 = time.time() - users * per_user
    for j in range(users * per_user):
        user = f"user-{rng.randrange(users) if j >= users else j}"  # everyone at least once
        item = f"item-{min(int(rng.paretovariate(1.0)) - 1, items - 1)}"
        p = user_partition(user, settings.events_partitions)
        value = encode(prepare({"user_id": user, "item_id": item, "event_type": "click", "ts": t0 + j,
                                "context": {"device": rng.choice(("ios", "android", "web"))}}))
        pending[p].append(kafka.Record(settings.events_topic, p, offsets[p], None, value))
        offsets[p] += 1
        if len(pending[p]) == CHUNK:
            _learn(shards[p], pending[p])
    for p, records in pending.items():
        _learn(shards[p], records)


def _learn(shard: Shard, records: list) -> None:
    if records:
        shard.process(kafka.Messages.of(records), lambda msg, reason: None)
        shard.commit()
        records.clear()


def resident(server: Server, users: int, partitions: int) -> float:
    """The server's RSS in MB once every shard answered a user lookup and a similar-items lookup."""
    base = f"http://127.0.0.1:{server.port}"
    asked = {user_partition(f"user-{u}", partitions): f"user-{u}" for u in range(min(users, 1000))}
    for user in asked.values():
        assert httpx.get(f"{base}/recommendations", params={"user_id": user, "k": 10}, timeout=60).status_code == 200
    assert httpx.get(f"{base}/items/item-1/similar", params={"k": 10}, timeout=60).status_code == 200
    time.sleep(1.0)
    return psutil.Process(server.proc.pid).memory_info().rss / 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="20000,200000", help="user counts, comma-separated")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--per-user", type=int, default=3, help="events per user")
    parser.add_argument("--baseline", default=None, help="also measure this git revision's server (both configurations)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.users.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="streamrec-api-memory-"))
    configs: list[tuple[str, str, Path | None]] = [("mf,pop", "mf,pop", None), ("pop", "pop", None)]
    if args.baseline:
        base_tree = checkout(args.baseline, tmp / "baseline")
        configs += [(f"{models}, baseline {args.baseline}", models, base_tree) for models in ("mf,pop", "pop")]
    result: dict = {"bench": "api_memory", "items": args.items, "events_per_user": args.per_user,
                    "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": list(os.getloadavg()), "rows": []}
    with embedded.EmbeddedServers(tmp) as servers:
        for users in counts:
            tag = uuid.uuid4().hex[:8]
            settings = servers.settings(events_topic=f"events-{tag}", key_prefix=f"bench-{tag}")
            print(f"writing the state of {users} users ...", flush=True)
            started = time.perf_counter()
            write_state(settings, ("mf", "pop"), users, args.items, args.per_user, seed=users)
            row: dict = {"users": users, "write_seconds": round(time.perf_counter() - started, 1), "rss_mb": {}}
            env = settings.environ()
            for name, models, tree in configs:
                print(f"  serve {name} ...", flush=True)
                run_env = {**env, "PYTHONPATH": str(tree or ROOT)}
                server = Server(run_env, models, 1, tmp / f"serve-{users}-{len(row['rss_mb'])}.log", cwd=tree)
                try:
                    server.wait_ready(120)
                    row["rss_mb"][name] = round(resident(server, users, settings.events_partitions), 1)
                finally:
                    server.stop()
            result["rows"].append(row)
    _write(result, args.out)
    return result


def _write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "api_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    names = list(result["rows"][0]["rss_mb"])
    lines = [f"# Lookup API memory against the user base ({result['items']} items, {result['events_per_user']} "
             f"events per user; resident memory of `streamrec serve` after every shard answered; {result['cpus']} "
             f"CPUs)", "", "| users | " + " | ".join(f"{n} RSS MB" for n in names) + " |",
             "|---:|" + "---:|" * len(names)]
    for row in result["rows"]:
        lines.append(f"| {row['users']:,} | " + " | ".join(f"{row['rss_mb'][n]:,.1f}" for n in names) + " |")
    first, last = result["rows"][0], result["rows"][-1]
    growth = last["users"] / first["users"]
    lines += ["", f"Users x{growth:g}: " + "; ".join(
        f"{n} RSS x{last['rss_mb'][n] / first['rss_mb'][n]:.2f}" for n in names) + "."]
    (out / "api_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
