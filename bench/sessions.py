"""Session-model benchmark: prequential recall@20 / MRR@20 and learning speed.

    python -m bench.sessions [--input ratings.csv] [--batch-size 1,256] [--models pop,markov,sknn,gru] [--json]
                             [--out bench/results]

Two streams:

* `movielens`: ml-latest-small `ratings.csv` replayed in time order, every
  rating a "click", no session_id. The featurizer is given a session gap
  larger than the data's time span (`--session-gap`, default 1e12 s), so each
  user's whole history is one sequence ("per-user sequences"): MovieLens
  users rate in bursts (median gap 11 s, but 6.5% of gaps are > 30 min), and
  the default 30-minute gap would cut a user into many short sessions whose
  first events are never ranked.
* `synthetic`: sessions (with session_id) interleaved in time, each with a
  topic; the next item is the current item's planted successor with
  probability `p_next`, else a topic item (Zipf). Seeded numpy.

Every figure is prequential (the DESIGN evaluation protocol), ranked per
session with already-seen items excluded, at the stated batch size. Learning
speed (events/s of `learn` alone) is measured for the GRU at batch 256 on
the stream's own events, with one torch thread and with one per core. Writes
`sessions.json` and `sessions.md` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from models.features import Featurizer, RawEvent
from models.registry import create
from producers.readers import read_events
from stream_app.evaluation import Evaluator, run

DEFAULT_INPUT = "../shared/data/ml-latest-small/ratings.csv"
RESULTS = Path(__file__).parent / "results"


def load_ratings(path: str, limit: int | None = None) -> list:
    """MovieLens ratings as click events in time order, via the project's reader."""
    events = list(read_events(path, "movielens", sort_by_time=True))
    return events[:limit] if limit else events


def synthetic(n_events: int = 60_000, n_items: int = 2_000, n_topics: int = 20, p_next: float = 0.5,
              mean_len: float = 8.0, n_users: int = 3_000, seed: int = 0) -> list[RawEvent]:
    """Interleaved sessions with planted item -> successor transitions and a per-session topic."""
    rng = np.random.default_rng(seed)
    topic_of = rng.integers(0, n_topics, n_items)
    members = [np.flatnonzero(topic_of == t) for t in range(n_topics)]
    probs = []
    for m in members:
        p = 1.0 / np.arange(1, len(m) + 1) ** 0.8
        probs.append(p / p.sum())
    successor = rng.permutation(n_items)  # planted: item i -> successor[i]
    out: list[RawEvent] = []
    span = n_events * 2.0  # seconds; ~hundreds of sessions open at once
    s = 0
    while len(out) < n_events:
        topic = int(rng.integers(n_topics))
        length = 2 + int(rng.geometric(1.0 / (mean_len - 1)))
        user = f"u{int(rng.integers(n_users))}"
        t = float(rng.uniform(0, span))
        item = int(rng.choice(members[topic], p=probs[topic]))
        for _ in range(length):
            out.append(RawEvent(user, f"i{item}", "click", t, f"s{s}"))
            t += float(rng.exponential(30.0)) + 1.0
            if rng.random() < p_next:
                item = int(successor[item])
            else:
                item = int(rng.choice(members[topic], p=probs[topic]))
        s += 1
    out = out[:n_events]
    out.sort(key=lambda e: e.ts)
    return out


class Timed:
    """Wraps a model, adding up the seconds spent in learn and score."""

    def __init__(self, model):
        self.model = model
        self.name = model.name
        self.query = model.query
        self.learn_s = 0.0
        self.score_s = 0.0
        self.learned = 0

    def learn(self, batch):
        t = time.perf_counter()
        self.model.learn(batch)
        self.learn_s += time.perf_counter() - t
        self.learned += len(batch)

    def score(self, batch, rows):
        t = time.perf_counter()
        out = self.model.score(batch, rows)
        self.score_s += time.perf_counter() - t
        return out


def evaluate(events, names, batch_size, session_gap, params=None, progress=False) -> dict[str, dict]:
    """Prequential recall@20/MRR@20 of each model on `events` at `batch_size`."""
    params = params or {}
    out = {}
    for name in names:
        model = Timed(create(name, **params.get(name, {})))
        ev = Evaluator(k=20, window=10**9)
        feat = Featurizer(session_gap=session_gap)
        t = time.perf_counter()
        done = [0]

        def tick(n, name=name, t=t):
            done[0] += n
            if progress and done[0] % 10_000 < n:
                print(f"  {name} b={batch_size}: {done[0]} events {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)

        run(events, {name: model}, feat, ev, batch_size=batch_size, progress=tick)
        s = ev.summary(name)
        out[name] = {
            "recall": s.get("recall", 0.0), "mrr": s.get("mrr", 0.0), "auc": s.get("auc", 0.0),
            "evaluated": s.get("evaluated", 0), "batch": batch_size,
            "seconds": time.perf_counter() - t, "learn_s": model.learn_s, "score_s": model.score_s,
            "learn_events_per_s": model.learned / model.learn_s if model.learn_s else None,
        }
    return out


def learn_speed(events, name: str, batch_size: int, session_gap: float, params=None, limit: int = 30_000) -> float:
    """Events/s of `learn` alone (batches pre-coded), over the first `limit` events."""
    feat = Featurizer(session_gap=session_gap)
    events = events[:limit]
    batches = [feat.batch(events[i : i + batch_size]) for i in range(0, len(events), batch_size)]
    model = create(name, **(params or {}))
    t = time.perf_counter()
    for b in batches:
        model.learn(b)
    return len(events) / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=DEFAULT_INPUT, help="MovieLens ratings.csv")
    ap.add_argument("--batch-size", default="1,256", help="comma-separated batch sizes")
    ap.add_argument("--models", default="pop,markov,sknn,gru")
    ap.add_argument("--streams", default="movielens,synthetic")
    ap.add_argument("--limit", type=int, default=None, help="only the first N events of each stream")
    ap.add_argument("--session-gap", type=float, default=1e12, help="seconds; MovieLens per-user sequences")
    ap.add_argument("--synthetic-events", type=int, default=60_000)
    ap.add_argument("--params", default="{}", help='JSON {"gru": {"hidden": 100, ...}}')
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for sessions.json and sessions.md")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    sizes = [int(b) for b in args.batch_size.split(",")]
    params = json.loads(args.params)
    streams = {}
    for s in args.streams.split(","):
        if s == "movielens":
            streams[s] = (load_ratings(args.input, args.limit), args.session_gap)
        elif s == "synthetic":
            streams[s] = (synthetic(args.limit or args.synthetic_events), 1800.0)
    result: dict = {"quality": {}, "speed": {}}
    for sname, (events, gap) in streams.items():
        for b in sizes:
            for name, r in evaluate(events, names, b, gap, params, args.progress).items():
                result["quality"].setdefault(sname, {}).setdefault(name, {})[str(b)] = r
                if not args.json:
                    print(f"{sname:10s} {name:7s} batch={b:4d} recall@20={r['recall']:.4f} mrr@20={r['mrr']:.4f} "
                          f"evaluated={r['evaluated']} {r['seconds']:.0f}s", flush=True)
        if "gru" in names:
            by_threads = {}
            for threads in sorted({1, os.cpu_count() or 1}):  # one core (a worker process per core), all cores
                torch.set_num_threads(threads)
                by_threads[str(threads)] = learn_speed(events, "gru", 256, gap, params.get("gru"))
                if not args.json:
                    print(f"{sname:10s} gru learn speed at batch 256, {threads} torch thread(s): "
                          f"{by_threads[str(threads)]:,.0f} events/s", flush=True)
            torch.set_num_threads(1)
            result["speed"][sname] = {"model": "gru", "batch": 256, "learn_events_per_s_by_threads": by_threads}
    if args.json:
        print(json.dumps(result, indent=1))
    write(result, args.out)
    return 0


def write(result: dict, out: Path) -> None:
    """sessions.json, and sessions.md: recall@20 / MRR@20 per stream, model and batch size, and GRU speed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sessions.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Session models: prequential recall@20 / MRR@20 (python -m bench.sessions)", ""]
    for sname, models in result["quality"].items():
        sizes = sorted({int(b) for r in models.values() for b in r})
        lines += [f"## {sname}", "", "| model | " + " | ".join(f"recall@20, batch {b} | MRR@20, batch {b}" for b in sizes) + " |",
                  "|---|" + "---:|" * (2 * len(sizes))]
        for name, by_batch in models.items():
            cells = [f"{by_batch[str(b)]['recall']:.4f} | {by_batch[str(b)]['mrr']:.4f}" if str(b) in by_batch else "- | -"
                     for b in sizes]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        speed = result["speed"].get(sname)
        if speed:
            rates = ", ".join(f"{eps:,.0f} events/s with {t} torch thread(s)"
                              for t, eps in speed["learn_events_per_s_by_threads"].items())
            lines += ["", f"GRU learning alone at batch {speed['batch']}: {rates}."]
        lines.append("")
    (out / "sessions.md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
