"""Session-model benchmark: prequential recall@20 / MRR@20 and learning speed.

    python -m bench.sessions [--input ratings.csv] [--batch-size 1,256] [--models pop,markov,sknn,gru,caser]
                             [--json] [--out bench/results] [--merge]

Two streams:

* `movielens`: ml-latest-small `ratings.csv` replayed in time order, every
  rating a "click", no session_id. The featurizer is given a session gap
  larger than the data's time span (`--session-gap`, default 1e12 s), so each
  user's whole history is one sequence ("per-user sequences"): MovieLens
  users rate in bursts (median gap 11 s, but 6.5% of gaps are > 30 min), and
  the default 30-minute gap would cut a user into many short sessions whose
  first events are never ranked.
* `synthetic`: the project's synthetic stream (`producers.synthetic`,
  default config, seed 0): interleaved sessions with a `session_id`, planted
  item transitions, device effects, and re-views (a fifth of the clicks
  re-view an item of their session; favorites and purchases repeat a click).

Every figure is prequential (`stream_app.evaluation`), ranked per
session at the stated batch size, under both protocols in one pass: seen
items excluded (repeats counted, not ranked) and included (repeats ranked,
as in the session-based literature). Learning
speed (events/s of `learn` alone, on the stream's own events) is measured
for the GRU and Caser (compiled loops, one thread) and the blend (its members
learning too) at batch 1 and 256.
Writes `sessions.json`
and `sessions.md` to `--out`; `--merge` keeps the figures already there of
models and streams not run this time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.streams import MOVIELENS, PROTOCOLS, movielens, synthetic
from models.features import Featurizer
from models.registry import create
from stream_app.evaluation.prequential import Evaluator, run

RESULTS = Path(__file__).parent / "results"
SPEED = {"gru_speed": "GRU", "caser_speed": "Caser", "blend_speed": "Blend (its members included)"}  # section -> model
SPEED_EVENTS = {"blend": 10_000}  # events timed, where not the default of `learn_speed`


def evaluate(events, names, batch_size, session_gap, params=None, progress=False) -> dict[str, dict[str, dict]]:
    """Prequential recall@20/MRR@20 of each model on `events` at `batch_size`, per protocol."""
    params = params or {}
    out: dict[str, dict[str, dict]] = {p: {} for p in PROTOCOLS}
    for name in names:
        evaluators = {p: Evaluator(k=20, window=10**9, exclude_seen=ex) for p, ex in PROTOCOLS.items()}
        feat = Featurizer(session_gap=session_gap)
        t = time.perf_counter()
        done = [0]

        def tick(n, name=name, t=t, done=done):
            done[0] += n
            if progress and done[0] % 10_000 < n:
                print(f"  {name} b={batch_size}: {done[0]} events {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)

        run(events, {name: create(name, **params.get(name, {}))}, feat, list(evaluators.values()), batch_size=batch_size,
            progress=tick)
        seconds = time.perf_counter() - t
        for protocol, ev in evaluators.items():
            s = ev.summary(name)
            out[protocol][name] = {
                "recall": s.get("recall", 0.0), "mrr": s.get("mrr", 0.0), "auc": s.get("auc", 0.0),
                "evaluated": s.get("evaluated", 0), "repeat": s["repeat"], "batch": batch_size, "seconds": seconds,
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
    ap.add_argument("--input", default=str(MOVIELENS), help="MovieLens ratings.csv")
    ap.add_argument("--batch-size", default="1,256", help="comma-separated batch sizes")
    ap.add_argument("--models", default="pop,markov,sknn,gru,caser")
    ap.add_argument("--streams", default="movielens,synthetic")
    ap.add_argument("--limit", type=int, default=None, help="only the first N events of each stream")
    ap.add_argument("--session-gap", type=float, default=1e12, help="seconds; MovieLens per-user sequences")
    ap.add_argument("--synthetic-events", type=int, default=60_000)
    ap.add_argument("--params", default="{}", help='JSON {"gru": {"hidden": 100, ...}}')
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for sessions.json and sessions.md")
    ap.add_argument("--merge", action="store_true", help="add to the figures already in --out")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    sizes = [int(b) for b in args.batch_size.split(",")]
    params = json.loads(args.params)
    streams = {}
    for s in args.streams.split(","):
        if s == "movielens":
            streams[s] = (movielens(args.input, args.limit), args.session_gap)
        elif s == "synthetic":
            streams[s] = (synthetic(args.limit or args.synthetic_events), 1800.0)
    result: dict = {"quality": {}}
    for sname, (events, gap) in streams.items():
        for b in sizes:
            for protocol, by_model in evaluate(events, names, b, gap, params, args.progress).items():
                for name, r in by_model.items():
                    result["quality"].setdefault(sname, {}).setdefault(protocol, {}).setdefault(name, {})[str(b)] = r
                    if not args.json:
                        print(f"{sname:10s} {protocol:12s} {name:7s} batch={b:4d} recall@20={r['recall']:.4f} "
                              f"mrr@20={r['mrr']:.4f} evaluated={r['evaluated']} repeat={r['repeat']} {r['seconds']:.0f}s",
                              flush=True)
        for name in ("gru", "caser", "blend"):
            if name in names:
                limit = SPEED_EVENTS.get(name, 30_000)
                by_batch = {str(b): learn_speed(events, name, b, gap, params.get(name), limit) for b in (1, 256)}
                result.setdefault(f"{name}_speed", {})[sname] = by_batch
                if not args.json:
                    print(f"{sname:10s} {name} learn speed: " + ", ".join(f"{eps:,.0f} events/s at batch {b}"
                                                                   for b, eps in by_batch.items()), flush=True)
    if args.merge and (args.out / "sessions.json").exists():
        result = merged(json.loads((args.out / "sessions.json").read_text()), result)
    if args.json:
        print(json.dumps(result, indent=1))
    write(result, args.out)
    return 0


def merged(old: dict, new: dict) -> dict:
    """`old` figures with `new` ones laid over them, per stream, protocol, model and section."""
    out = json.loads(json.dumps(old))
    for sname, protocols in new["quality"].items():
        for protocol, models in protocols.items():
            for name, by_batch in models.items():
                out["quality"].setdefault(sname, {}).setdefault(protocol, {}).setdefault(name, {}).update(by_batch)
    out.pop("speed", None)  # the torch GRU's speed by threads, before its compiled loop
    for section in SPEED:
        out.setdefault(section, {}).update(new.get(section, {}))
    return out


def write(result: dict, out: Path) -> None:
    """sessions.json, and sessions.md: recall@20 / MRR@20 per stream, model and batch size, and learning speeds."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sessions.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Session models: prequential recall@20 / MRR@20 (python -m bench.sessions)", "",
             "Protocols: *exclude-seen* ranks each event against the items its session has not seen, and counts",
             "repeats (the session had seen the true item) without ranking them; *include-seen* ranks every event",
             "against every item seen so far.", ""]
    for sname, protocols in result["quality"].items():
        for protocol, models in protocols.items():
            sizes = sorted({int(b) for r in models.values() for b in r})
            repeats = {r[str(b)]["repeat"] for r in models.values() for b in sizes if str(b) in r}
            lines += [f"## {sname}, {protocol}" + (f" ({max(repeats):,} repeats not ranked)" if max(repeats, default=0) else ""),
                      "", "| model | " + " | ".join(f"recall@20, batch {b} | MRR@20, batch {b}" for b in sizes) + " |",
                      "|---|" + "---:|" * (2 * len(sizes))]
            for name, by_batch in models.items():
                cells = [f"{by_batch[str(b)]['recall']:.4f} | {by_batch[str(b)]['mrr']:.4f}" if str(b) in by_batch
                         else "- | -" for b in sizes]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
        for section, model in SPEED.items():
            by_batch = result.get(section, {}).get(sname)
            if by_batch:
                rates = ", ".join(f"{eps:,.0f} events/s at batch {b}" for b, eps in by_batch.items())
                lines += [f"{model} learning alone on {sname} (one thread): {rates}.", ""]
    (out / "sessions.md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
