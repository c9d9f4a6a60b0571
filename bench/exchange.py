"""Shared items: how quality depends on how often the shards exchange their item changes.

Run: `python -m bench.exchange`. MovieLens ratings in time order, split by user over P partition shards
in one process (the worker's `Shard`, a real Redis started on a free port; no broker, so nothing but the
exchange interval varies): every `--every` events each shard learns its share at batch 1, commits and
folds the others' changes in. Recall@20 and AUC pooled over the shards, every event evaluated, against
one partition over the same events. Writes bench/results/exchange.json and exchange.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

from bench.streams import MOVIELENS, movielens
from stream_app.core.events import Event, encode
from stream_app.dev import embedded
from stream_app.evaluation.prequential import pooled
from stream_app.io import kafka
from stream_app.io.redis import Keys, PartitionStore, connect
from stream_app.worker.config import WorkerConfig
from stream_app.worker.shard import Shard

RESULTS = Path(__file__).parent / "results"


def replay(redis_url: str, events: list[Event], partitions: int, every: int, shared: bool, models: tuple[str, ...]) -> dict:
    """One run: the events through `partitions` shards, exchanging every `every` events; pooled metrics."""
    client = connect(redis_url)
    prefix = f"exchange-{uuid.uuid4().hex[:8]}"
    config = WorkerConfig(models=models, shared_items=shared, batch_size=1, sample_rate=1.0, window=len(events))
    shards = [Shard(PartitionStore(client, Keys(prefix, "events", p)), config, partitions=partitions)
              for p in range(partitions)]
    for shard in shards:
        shard.resume()
    offsets = [0] * partitions
    pending: list[list[Event]] = [[] for _ in range(partitions)]
    started = time.perf_counter()
    for j, event in enumerate(events, 1):
        pending[kafka.partition_for(event.user_id.encode(), partitions)].append(event)
        if j % every and j < len(events):
            continue
        for p, shard in enumerate(shards):
            if pending[p]:
                records = [kafka.Record("events", p, offsets[p] + i, None, encode(e)) for i, e in enumerate(pending[p])]
                offsets[p] += len(records)
                shard.process(kafka.Messages.of(records), lambda record, reason: None)
                pending[p] = []
            shard.commit()
        for shard in shards:
            shard.fold()
    out: dict = {"partitions": partitions, "every": every, "items": "shared" if shared else "local",
                 "seconds": round(time.perf_counter() - started, 1), "models": {}}
    for name in models:
        row = pooled([s.evaluator.windows[name] for s in shards])
        out["models"][name] = {"recall": round(row["recall"], 4), "auc": round(row["auc"], 4), "ranked": row["evaluated"]}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=30_000, help="the first N ratings")
    parser.add_argument("--partitions", default="4,8")
    parser.add_argument("--every", default="100,500,2000", help="events between exchanges")
    parser.add_argument("--models", default="pop,mf")
    parser.add_argument("--input", type=Path, default=MOVIELENS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    events = movielens(args.input, args.limit)
    models = tuple(m.strip() for m in args.models.split(","))
    result: dict = {"bench": "exchange", "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "machine": f"{platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
                    "events": len(events), "runs": []}
    with tempfile.TemporaryDirectory(prefix="streamrec-exchange-") as tmp, embedded.EmbeddedServers(Path(tmp)) as servers:
        url = servers.settings().redis_url
        result["runs"].append(replay(url, events, 1, len(events), False, models))
        for partitions in (int(p) for p in args.partitions.split(",")):
            result["runs"].append(replay(url, events, partitions, len(events), False, models))
            for every in (int(e) for e in args.every.split(",")):
                result["runs"].append(replay(url, events, partitions, every, True, models))
                print(result["runs"][-1], flush=True)
    lines = [f"# Exchange interval of shared items ({result['when']}; {result['machine']})", "",
             f"MovieLens, the first {len(events):,} ratings, batch 1, every event evaluated; `python -m bench.exchange`.", "",
             "| items | partitions | events between exchanges | " + " | ".join(f"{m} recall@20 | {m} AUC" for m in models)
             + " | ranked |", "|---|---:|---:|" + "---:|" * (2 * len(models) + 1)]
    for run in result["runs"]:
        interval = "-" if run["items"] == "local" else f"{run['every']:,}"
        cells = [f"{run['models'][m]['recall']:.4f} | {run['models'][m]['auc']:.4f}" for m in models]
        lines.append(f"| {run['items']} | {run['partitions']} | {interval} | " + " | ".join(cells)
                     + f" | {run['models'][models[0]]['ranked']:,} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exchange.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "exchange.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
