"""Memory per million users and items: what one worker shard holds for each model.

Run: `streamrec bench --only memory` (or `python -m bench.memory`). For each
model, in a fresh process: a featurizer, an evaluator (bookkeeping only) and
the model learn a stream in which `--ids` new users meet `--ids` new items,
each id seen twice (so an admission threshold of 2 lets them all in). It
reports, scaled to a million users plus a million items:
- the model's state (every table it persists, exact bytes);
- the resident memory the whole shard grew by (vocabularies, evaluator, model,
  array capacity; measured, so somewhat noisy).
Writes JSON and a markdown table under bench/results/.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import time
from pathlib import Path

import psutil

from models.features import Featurizer, RawEvent
from models.registry import MODELS, create
from stream_app.evaluation.prequential import Evaluator

RESULTS = Path(__file__).parent / "results"


def stream(n_ids: int, batch: int):
    """Batches of events: user j meets item j, then (half a stream later) again."""
    chunk = []
    for j in range(2 * n_ids):
        k = j % n_ids
        chunk.append(RawEvent(f"user-{k}", f"item-{k}", "click", 1.7e9 + j, context={"device": "ios"}))
        if len(chunk) == batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def measure(name: str, n_ids: int, batch: int) -> dict:
    """Bytes per million users + items for `name` (run in a fresh process)."""
    process = psutil.Process()
    featurizer, model = Featurizer(), create(name, seed=0)
    evaluator = Evaluator(sample_rate=0.0)
    warm = featurizer.batch([RawEvent("warm-user", "warm-item", "click", 1.7e9)])  # imports and compiles
    evaluator.step(warm, {name: model})
    gc.collect()
    before = process.memory_info().rss
    start = time.perf_counter()
    for events in stream(n_ids, batch):
        b = featurizer.batch(events)
        evaluator.step(b, {name: model})
    seconds = time.perf_counter() - start
    gc.collect()
    grown = process.memory_info().rss - before
    state = sum(a.nbytes for a in model.export_state().values())
    scale = 1e6 / n_ids
    return {"model": name, "ids": n_ids, "events": 2 * n_ids, "seconds": round(seconds, 1),
            "state_mb_per_million": round(state * scale / 2**20, 1),
            "rss_mb_per_million": round(grown * scale / 2**20, 1)}


def _child(name: str, n_ids: int, batch: int, out) -> None:
    out.put(measure(name, n_ids, batch))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ids", type=int, default=100_000, help="new users (and as many new items)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    ctx = multiprocessing.get_context("spawn")  # a fresh process per model: no memory carried over
    rows = []
    for name in args.models.split(","):
        queue = ctx.Queue()
        child = ctx.Process(target=_child, args=(name, args.ids, args.batch_size, queue))
        child.start()
        rows.append(queue.get())
        child.join()
        print(rows[-1])
    result = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "ids": args.ids, "batch": args.batch_size, "models": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        "| model | state, MB per 1M users + 1M items | shard resident memory, MB per 1M users + 1M items |\n"
        "|---|---:|---:|\n"
        + "".join(f"| {r['model']} | {r['state_mb_per_million']:,.1f} | {r['rss_mb_per_million']:,.1f} |\n" for r in rows)
    )
    (args.out / "memory.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
