"""Prequential (test-then-train) evaluation: the protocol the worker and `streamrec evaluate` share.

For each sampled event, scored as each model stood just before learning it:
candidates are the items seen in the stream so far, minus those the query
(user, or session for session models) already interacted with. An event whose
true item the query had already seen is then not ranked but counted as
`repeat` (ranking it as the one seen item among unseen candidates would
reward models that favour seen items); with `exclude_seen=False` every item
seen so far is a candidate and repeats are ranked like other events. `rank`
is the number of other candidates scoring >= the true item (ties count
against it). Events whose query or item is new are counted as `cold_start`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.base import Batch, Model
from stream_app.core.events import EVENT_TYPES

METRICS = ("recall", "auc", "mrr", "ndcg", "precision", "f1")


def ranks(scores: np.ndarray, true_items: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each true item among its candidates, and the candidate counts.

    scores, mask: [R, n_items]; true_items: [R]. The true item must be in its mask.
    """
    r = np.arange(len(true_items))
    true_scores = scores[r, true_items]  # [R]
    beats = (scores >= true_scores[:, None]) & mask  # [R, n_items]
    n_candidates = mask.sum(axis=1)
    # A NaN true score beats nothing: rank it last, a miss, rather than first.
    return np.where(np.isnan(true_scores), n_candidates - 1, beats.sum(axis=1) - 1), n_candidates


def event_metrics(rank: np.ndarray, n_candidates: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-event hit@k, AUC, reciprocal rank and NDCG@k from ranks."""
    hit = rank < k
    return {
        "recall": hit.astype(np.float64),
        "auc": 1.0 - rank / np.maximum(n_candidates - 1, 1),
        "mrr": np.where(hit, 1.0 / (rank + 1), 0.0),
        "ndcg": np.where(hit, 1.0 / np.log2(rank + 2), 0.0),
    }


@dataclass
class Window:
    """Sums of per-event metrics over the last `size` evaluated events."""

    size: int
    k: int
    rows: deque = field(default_factory=deque)
    sums: np.ndarray = field(default_factory=lambda: np.zeros(4))

    def add(self, values: np.ndarray) -> None:  # values: [R, 4] (or [4]) recall, auc, mrr, ndcg
        values = np.atleast_2d(values)
        self.rows.extend(values)
        self.sums += values.sum(axis=0)
        excess = len(self.rows) - self.size
        if excess > 0:
            self.sums -= np.sum([self.rows.popleft() for _ in range(excess)], axis=0)

    def summary(self) -> dict[str, float]:
        return pooled([self])


def pooled(windows: list[Window]) -> dict[str, Any]:
    """Metrics over the events of several windows together (e.g. one per partition)."""
    n = sum(len(w.rows) for w in windows)
    if n == 0:
        return {"evaluated": 0}
    k = windows[0].k
    recall, auc, mrr, ndcg = (sum((w.sums for w in windows), np.zeros(4)) / n).tolist()
    precision = recall / k  # one relevant item per event
    f1 = 2 * precision * recall / (precision + recall) if recall > 0 else 0.0
    return {"recall": recall, "auc": auc, "mrr": mrr, "ndcg": ndcg, "precision": precision, "f1": f1, "evaluated": n}


@dataclass(frozen=True)
class Plan:
    """Which rows of a batch one query kind ranks, against which candidates."""

    rows: np.ndarray  # [R] rows ranked, ascending
    mask: np.ndarray  # [R, n_items] candidates of each
    sampled: int  # rows sampled
    repeat: int  # sampled rows not ranked because the query had seen the true item (exclude-seen)


class Evaluator:
    """Rolling prequential evaluation of several models on one stream.

    `step(batch, models)` evaluates the sampled events of `batch` and has the
    models learn it: each event is scored as the model stood just before
    learning it (`Model.learn_scored`). The parts, `prepare` (the candidate
    bookkeeping, once per batch) and `record`, are there for callers that time them.
    """

    def __init__(self, k: int = 20, window: int = 10_000, sample_rate: float = 1.0, exclude_seen: bool = True, seed: int = 0):
        self.k = k
        self.window = window
        self.sample_rate = sample_rate
        self.exclude_seen = exclude_seen
        self._rng = np.random.default_rng(seed)
        self._known = np.zeros(0, bool)  # [n_items] items seen in the stream so far
        self._seen: dict[str, dict[int, set[int]]] = {"user": {}, "session": {}}
        self.windows: dict[str, Window] = {}
        self.by_type: dict[tuple[str, str], Window] = {}
        self.cold_start: dict[str, int] = {}
        self.repeat: dict[str, int] = {}
        self.evaluated: dict[str, int] = {}
        self.events_seen = 0

    def _window(self, key, store: dict) -> Window:
        if key not in store:
            store[key] = Window(self.window, self.k)
        return store[key]

    def step(self, batch: Batch, models: dict[str, Model]) -> None:
        """Evaluate the sampled events of `batch`, each before the models learn it, and learn the batch."""
        step([self], batch, models)

    def prepare(self, batch: Batch, kinds: Iterable[str]) -> dict[str, Plan]:
        """Sample the rows to evaluate and, per query kind, the candidates of each ranked row;
        records the batch in the bookkeeping (call it once per batch, in stream order)."""
        n = len(batch)
        if len(self._known) < batch.n_items:
            self._known = np.concatenate([self._known, np.zeros(batch.n_items - len(self._known), bool)])
        sampled = self._rng.random(n) < self.sample_rate  # [B]
        items = batch.items
        # Row j's item is in the catalogue if it was seen before the batch or earlier in it.
        first = np.full(batch.n_items, n)
        np.minimum.at(first, items, np.arange(n))
        rankable = (sampled & (self._known[items] | (first[items] < np.arange(n)))).tolist()  # [B]
        # Bookkeeping in stream order: row j's candidates reflect exactly rows < j.
        item_list = items.tolist()
        in_batch = np.flatnonzero(first < n)  # items of the batch
        plans: dict[str, Plan] = {}
        for kind in kinds:
            queries = (batch.users if kind == "user" else batch.sessions).tolist()
            seen_by = self._seen[kind]
            chosen: list[int] = []  # rows ranked
            n_seen: list[int] = []  # how many items each one's query had seen
            seen_items: list[int] = []  # those items, one row after the other
            repeat = 0
            for j, (q, item) in enumerate(zip(queries, item_list)):
                seen = seen_by.get(q)
                if seen is None:
                    seen_by[q] = {item}
                    continue
                if rankable[j]:
                    if item not in seen:
                        chosen.append(j)
                        n_seen.append(len(seen))
                        seen_items.extend(seen)
                    elif self.exclude_seen:
                        repeat += 1
                    else:
                        chosen.append(j)
                seen.add(item)
            rows = np.array(chosen, np.int64)
            mask = np.repeat(self._known[None, :], len(rows), axis=0)  # the catalogue before the batch...
            mask[:, in_batch] |= first[in_batch][None, :] < rows[:, None]  # ... and earlier in it
            if self.exclude_seen:
                mask[np.repeat(np.arange(len(rows)), n_seen), seen_items] = False
            mask[np.arange(len(rows)), items[rows]] = True
            plans[kind] = Plan(rows, mask, int(sampled.sum()), repeat)
        self._known[items] = True
        self.events_seen += n
        return plans

    def record(self, name: str, batch: Batch, plan: Plan, scores: np.ndarray) -> None:
        """Add model `name`'s scores of the plan's rows ([R, n_items]) to its windows and counts."""
        rows = plan.rows
        self.cold_start[name] = self.cold_start.get(name, 0) + plan.sampled - plan.repeat - len(rows)
        self.repeat[name] = self.repeat.get(name, 0) + plan.repeat
        if not len(rows):
            return
        rank, n_cand = ranks(scores, batch.items[rows], plan.mask)
        per_event = event_metrics(rank, n_cand, self.k)
        values = np.stack([per_event[m] for m in ("recall", "auc", "mrr", "ndcg")], axis=1)  # [R, 4]
        self._window(name, self.windows).add(values)
        types = batch.event_types[rows]  # [R]
        for code in set(types.tolist()):
            self._window((name, EVENT_TYPES[code]), self.by_type).add(values[types == code])
        self.evaluated[name] = self.evaluated.get(name, 0) + len(rows)

    def know(self, items: np.ndarray) -> None:
        """Put `items` in the catalogue (seen in the stream elsewhere: shared items)."""
        if len(items):
            size = int(items.max()) + 1
            if len(self._known) < size:
                self._known = np.concatenate([self._known, np.zeros(size - len(self._known), bool)])
            self._known[items] = True

    def forget(self, kind: str, ids: np.ndarray) -> None:
        """Forget expired ids: a user's or session's seen items, or an item's place in the catalogue."""
        if kind == "item":
            self._known[ids[ids < len(self._known)]] = False
            return
        for q in ids.tolist():
            self._seen.get(kind, {}).pop(q, None)

    def summary(self, model: str) -> dict:
        """The rolling metrics of `model`, with a per-event-type breakdown."""
        return summary([self], model)


def step(evaluators: list[Evaluator], batch: Batch, models: dict[str, Model],
         clock: dict[str, float] | None = None) -> None:
    """`Evaluator.step` for several evaluators of one stream (other protocols, say): the models learn
    the batch once, scoring the rows any evaluator ranks. `clock`, when given, gets the seconds spent
    learning (scoring included) added to "learn", and the evaluators' own to "evaluate"."""
    start = time.perf_counter()
    learning = 0.0
    kinds = {m.query for m in models.values()}
    plans = [e.prepare(batch, kinds) for e in evaluators]
    for name, model in models.items():
        each = [p[model.query] for p in plans]
        rows = each[0].rows if len(each) == 1 else np.unique(np.concatenate([p.rows for p in each]))
        t = time.perf_counter()
        scores = model.learn_scored(batch, rows)  # [len(rows), n_items]
        learning += time.perf_counter() - t
        for evaluator, plan in zip(evaluators, each):
            evaluator.record(name, batch, plan, scores if plan.rows is rows else scores[np.searchsorted(rows, plan.rows)])
    if clock is not None:
        clock["learn"] += learning
        clock["evaluate"] += time.perf_counter() - start - learning


def run(events, models: dict[str, Model], featurizer, evaluator: Evaluator | list[Evaluator], batch_size: int = 1,
        progress=None) -> int:
    """Replay `events` through the evaluator(s) and the models in batches; returns the event count.

    `progress(n)` is called after each batch with its size.
    """
    evaluators = evaluator if isinstance(evaluator, list) else [evaluator]
    count = 0
    chunk: list = []

    def flush() -> None:
        step(evaluators, featurizer.batch(chunk), models)
        if progress is not None:
            progress(len(chunk))
        chunk.clear()

    for event in events:
        chunk.append(event)
        count += 1
        if len(chunk) >= batch_size:
            flush()
    if chunk:
        flush()
    return count


def summary(evaluators: list[Evaluator], model: str) -> dict:
    """Rolling metrics of `model` pooled over evaluators, with a per-event-type breakdown."""
    out = pooled([e.windows[model] for e in evaluators if model in e.windows])
    types = sorted({t for e in evaluators for (name, t) in e.by_type if name == model})
    out["by_event_type"] = {
        t: pooled([e.by_type[(model, t)] for e in evaluators if (model, t) in e.by_type]) for t in types
    }
    out["cold_start"] = sum(e.cold_start.get(model, 0) for e in evaluators)
    out["repeat"] = sum(e.repeat.get(model, 0) for e in evaluators)
    out["evaluated_total"] = sum(e.evaluated.get(model, 0) for e in evaluators)
    return out


def restore(evaluator: Evaluator, known_items: np.ndarray, seen_by_user: dict[int, np.ndarray]) -> None:
    """Resume bookkeeping after a restart: the catalogue and each user's seen items."""
    size = int(known_items.max()) + 1 if len(known_items) else 0
    evaluator._known = np.zeros(size, bool)
    evaluator._known[known_items] = True
    evaluator._seen["user"] = {u: set(items.tolist()) for u, items in seen_by_user.items()}
