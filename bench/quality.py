"""Prequential quality of the models, beside popularity and River's `reco` models.

    python -m bench.quality [--input ratings.csv] [--batch-size 1,256] [--models pop,mf,...] [--json OUT]

Two streams: MovieLens (every rating a `click` event, value = rating, no
context; the Featurizer adds hour and day of week), replayed in timestamp
order (stable sort), and the project's synthetic stream (`producers.synthetic`,
sessions with device effects and re-views). Each runs through
`stream_app.evaluation.run` under both protocols in one pass: seen items
excluded (repeats not ranked) and included (repeats ranked). River's models
(MovieLens only: they learn the rating as target) rank every item by
`predict_one`, which is slow, so they (and, for comparison, every other
model) are also evaluated on a sample of about `--river-sample` events in a
second run. The speed part times `MF.learn` alone (its defaults, 64 factors)
against River `FunkMF.learn_one` (64 factors) on the same events, and `learn`
alone of every model evaluated in full at batch 1 and 256.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
from river import optim, reco

from bench.streams import MOVIELENS, PROTOCOLS, movielens, synthetic
from models.base import Batch, Model, TableKind
from models.dnn import DNN
from models.features import Featurizer
from models.mf import MF
from models.popularity import Popularity
from stream_app.core.events import Event
from stream_app.evaluation.prequential import Evaluator, run


class RiverRanker(Model):
    """A River `reco` model behind the Model interface: learns ratings, ranks every item by `predict_one`."""

    query = "user"
    sequential = True  # learn_one, event by event
    tables: ClassVar[dict[str, TableKind]] = {}

    name = "river"

    def __init__(self, river_model: reco.base.Ranker):
        self.model = river_model

    def learn(self, batch: Batch) -> None:
        for u, i, y in zip(batch.users.tolist(), batch.items.tolist(), batch.values.tolist()):
            self.model.learn_one(user=u, item=i, y=y)

    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        predict = self.model.predict_one
        scores = np.array([[predict(u, i) for i in range(batch.n_items)] for u in batch.users[rows].tolist()])
        return np.nan_to_num(scores, nan=-np.inf)  # a diverged model ranks nothing

    def export_state(self) -> dict[str, np.ndarray]:
        raise NotImplementedError("a benchmark wrapper")

    def import_state(self, state: dict[str, np.ndarray]) -> None:
        raise NotImplementedError("a benchmark wrapper")

    def drain_changes(self) -> dict[str, np.ndarray | None]:
        return {}

    def forget(self, kind: TableKind, ids: np.ndarray) -> None:
        raise NotImplementedError("a benchmark wrapper")


MODELS: dict[str, Callable[[], Model]] = {
    "pop": Popularity,
    "pop-timectx": lambda: Popularity(time_context=True),
    "mf": MF,
    "mf-popneg": lambda: MF(popular_share=0.1),
    "dnn": DNN,
    # FunkMF's default SGD(0.1) diverges to NaN on these ratings; 0.05 does not.
    "river-funk": lambda: RiverRanker(reco.FunkMF(optimizer=optim.SGD(0.05), seed=0)),
    "river-biased": lambda: RiverRanker(reco.BiasedMF(seed=0)),
}


def evaluate(events: list[Event], names: list[str], batch_size: int, sample_rate: float = 1.0) -> list[dict]:
    """Prequential metrics of the named models under both protocols, replayed together at `batch_size`."""
    models = {name: MODELS[name]() for name in names}
    evaluators = {p: Evaluator(k=20, window=10**9, sample_rate=sample_rate, exclude_seen=ex) for p, ex in PROTOCOLS.items()}
    start = time.perf_counter()
    run(events, models, Featurizer(), list(evaluators.values()), batch_size=batch_size)
    seconds = time.perf_counter() - start
    out = []
    for protocol, evaluator in evaluators.items():
        for name in names:
            s = evaluator.summary(name)
            figures = {k: s.get(k) for k in ("recall", "auc", "mrr", "evaluated", "cold_start", "repeat")}
            out.append({"model": name, "protocol": protocol, **figures,
                        "batch": batch_size, "sampled": sample_rate < 1.0, "run_seconds": round(seconds, 1)})
    return out


def learn_speed(events: list[Event], batch_size: int = 256, repeats: int = 5) -> dict[str, float]:
    """Events/s of `MF.learn` (its defaults, 64 factors) and of River `FunkMF.learn_one` (64 factors)
    over `events`, each the best of `repeats` passes from a fresh model, the two alternated (the machine
    may be shared)."""
    featurizer = Featurizer()
    batches = [featurizer.batch(events[s : s + batch_size]) for s in range(0, len(events), batch_size)]
    pairs = [(b.users.tolist(), b.items.tolist(), b.values.tolist()) for b in batches]
    MF(dim=64).learn(batches[0])  # compile (or load the cache) outside the clock

    def mf_pass() -> float:
        mf = MF(dim=64)
        start = time.perf_counter()
        for batch in batches:
            mf.learn(batch)
        return time.perf_counter() - start

    def river_pass() -> float:
        funk = reco.FunkMF(n_factors=64, optimizer=optim.SGD(0.05), seed=0)
        start = time.perf_counter()
        for users, items, values in pairs:
            for u, i, y in zip(users, items, values):
                funk.learn_one(user=u, item=i, y=y)
        return time.perf_counter() - start

    # Alternate the two, so that both see the same moments of a shared machine.
    mf_times, river_times = zip(*[(mf_pass(), river_pass()) for _ in range(repeats)])
    mf_rate, river_rate = len(events) / min(mf_times), len(events) / min(river_times)
    return {"batch": batch_size, "mf_events_per_s": mf_rate, "river_funk_events_per_s": river_rate, "ratio": mf_rate / river_rate}


def learn_rates(events: list[Event], names: list[str], batch_sizes: tuple[int, ...] = (1, 256), limit: int = 20_000,
                repeats: int = 3) -> list[dict]:
    """Events/s of `learn` alone for each named model (shipped defaults) over the first `limit` events, at
    each batch size: the best of `repeats` passes from a fresh model, the models alternated."""
    out = []
    for batch_size in batch_sizes:
        featurizer = Featurizer()
        batches = [featurizer.batch(events[s : s + batch_size]) for s in range(0, min(limit, len(events)), batch_size)]
        n_events = sum(len(b) for b in batches)
        for name in names:
            MODELS[name]().learn(batches[0])  # compile (or load the cache) outside the clock

        def one_pass(name: str, batches: list[Batch] = batches) -> float:
            model = MODELS[name]()
            start = time.perf_counter()
            for batch in batches:
                model.learn(batch)
            return time.perf_counter() - start

        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(repeats):
            for name in names:
                times[name].append(one_pass(name))
        out += [{"model": name, "batch": batch_size, "events": n_events, "events_per_s": n_events / min(times[name])}
                for name in names]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=str(MOVIELENS), help="MovieLens ratings.csv")
    parser.add_argument("--batch-size", default="1,256", help="comma-separated batch sizes")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--river-sample", type=int, default=2000, help="events evaluated in the sampled run")
    parser.add_argument("--synthetic-events", type=int, default=60_000, help="events of the synthetic stream")
    parser.add_argument("--no-speed", action="store_true", help="skip the learning-speed comparison")
    parser.add_argument("--json", metavar="OUT", default=str(Path(__file__).parent / "results" / "quality.json"),
                        help="write the results as JSON here")
    args = parser.parse_args(argv)

    events = movielens(args.input)
    streams = {"movielens": events, "synthetic": synthetic(args.synthetic_events)}
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = set(names) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    full = [n for n in names if not n.startswith("river-")]
    results: list[dict] = []
    for batch_size in [int(b) for b in args.batch_size.split(",")]:
        for stream, stream_events in streams.items():
            if full:
                results += [{"stream": stream, **r} for r in evaluate(stream_events, full, batch_size)]
        if len(full) < len(names):
            rate = min(1.0, args.river_sample / len(events))
            results += [{"stream": "movielens", **r} for r in evaluate(events, names, batch_size, rate)]

    print(f"\nMovieLens: {len(events)} events from {args.input}; synthetic: {len(streams['synthetic'])} events; k=20\n")
    print("| stream | protocol | model | batch | sampled | recall@20 | AUC | MRR@20 | evaluated | cold start | repeat | run s |")
    print("|---|---|---|---:|:---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['stream']} | {r['protocol']} | {r['model']} | {r['batch']} | {'yes' if r['sampled'] else 'no'} "
              f"| {r['recall']:.4f} | {r['auc']:.4f} | {r['mrr']:.4f} | {r['evaluated']} | {r['cold_start']} "
              f"| {r['repeat']} | {r['run_seconds']} |")
    out: dict = {"input": str(args.input), "events": len(events), "k": 20, "results": results}
    if not args.no_speed:
        speed = learn_speed(events)
        out["speed"] = speed
        print(f"\nlearning alone, batch {speed['batch']}: MF {speed['mf_events_per_s']:,.0f} events/s, "
              f"River FunkMF {speed['river_funk_events_per_s']:,.0f} events/s, ratio {speed['ratio']:.1f}x")
        out["learn_rates"] = rates = learn_rates(events, full)
        print("\n| model | batch | learning events/s (MovieLens, first 20,000 events) |\n|---|---:|---:|")
        for r in rates:
            print(f"| {r['model']} | {r['batch']} | {r['events_per_s']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
