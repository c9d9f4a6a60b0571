"""The prequential evaluator against a straightforward reference implementation of DESIGN.md's protocol."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from models.base import Batch, Model
from models.features import Featurizer
from stream_app.evaluation.prequential import Evaluator, pooled, run


class HashScores(Model):
    """Scores that depend only on (user, item), with many ties; learns nothing."""

    name = "hash"
    tables = {}

    def __init__(self, levels: int = 5, seed: int = 0):
        self.levels, self.seed = levels, seed

    def _score(self, user: int, item: int) -> float:
        return float((user * 7919 + item * 104729 + self.seed) % self.levels)

    def learn(self, batch: Batch) -> None:
        pass

    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        return np.array([[self._score(int(batch.users[r]), i) for i in range(batch.n_items)] for r in rows])

    def export_state(self):
        return {}

    def import_state(self, state):
        pass

    def drain_changes(self):
        return {}

    def forget(self, kind, ids):
        pass


def stream(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [
        SimpleNamespace(user_id=f"u{rng.integers(15)}", item_id=f"i{rng.integers(40)}",
                        event_type=["click", "favorite", "purchase"][rng.integers(3)], ts=1.0 + j,
                        session_id=None, value=None, context={})
        for j in range(n)
    ]


def reference(events, model: HashScores, k: int, exclude_seen: bool):
    """The protocol written out event by event, with plain Python loops."""
    user_ids, item_ids = {}, {}
    seen: dict[str, set[str]] = {}
    catalogue: list[str] = []
    out = []
    for e in events:
        u = user_ids.setdefault(e.user_id, len(user_ids))
        i = item_ids.setdefault(e.item_id, len(item_ids))
        if e.item_id in catalogue and e.user_id in seen and not (exclude_seen and e.item_id in seen[e.user_id]):
            candidates = [c for c in catalogue if not (exclude_seen and c in seen[e.user_id]) or c == e.item_id]
            true = model._score(u, i)
            rank = sum(1 for c in candidates if c != e.item_id and model._score(u, item_ids[c]) >= true)
            n = len(candidates)
            hit = rank < k
            out.append((e.event_type, hit, 1 - rank / max(n - 1, 1), 1 / (rank + 1) if hit else 0.0,
                        1 / math.log2(rank + 2) if hit else 0.0))
        seen.setdefault(e.user_id, set()).add(e.item_id)
        if e.item_id not in catalogue:
            catalogue.append(e.item_id)
    return out


def repeat_count(events) -> int:
    """Events whose user had already interacted with their item (and whose item is known, as it then is)."""
    seen: dict[str, set[str]] = {}
    n = 0
    for e in events:
        n += e.item_id in seen.get(e.user_id, ())
        seen.setdefault(e.user_id, set()).add(e.item_id)
    return n


@pytest.mark.parametrize("batch_size", [1, 7, 64])
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_matches_the_reference_computation(batch_size, exclude_seen):
    events = stream(400, seed=batch_size)
    model = HashScores()
    evaluator = Evaluator(k=5, window=10_000, exclude_seen=exclude_seen)
    run(events, {"hash": model}, Featurizer(time_features=False), evaluator, batch_size)
    ref = reference(events, model, 5, exclude_seen)
    got = evaluator.summary("hash")
    repeats = repeat_count(events) if exclude_seen else 0
    assert got["evaluated"] == len(ref) and got["repeat"] == repeats
    assert got["cold_start"] == len(events) - len(ref) - repeats
    for col, name in enumerate(("recall", "auc", "mrr", "ndcg"), start=1):
        assert got[name] == pytest.approx(np.mean([r[col] for r in ref]), abs=1e-12), name
    for etype, m in got["by_event_type"].items():
        rows = [r for r in ref if r[0] == etype]
        assert m["evaluated"] == len(rows)
        assert m["recall"] == pytest.approx(np.mean([r[1] for r in rows]), abs=1e-12)
    assert got["precision"] == pytest.approx(got["recall"] / 5)


def test_ties_count_against_the_true_item():
    class Constant(HashScores):
        def _score(self, user, item):
            return 1.0

    evaluator = Evaluator(k=20, window=1000)
    run(stream(300, seed=3), {"c": Constant()}, Featurizer(time_features=False), evaluator, 1)
    s = evaluator.summary("c")
    assert s["evaluated"] > 0
    assert s["auc"] == 0.0 and s["mrr"] < 0.05  # a model that scores everything alike gets nothing


def test_the_window_keeps_only_the_last_events():
    evaluator = Evaluator(k=1, window=3)
    window = evaluator._window("m", evaluator.windows)
    for hit in (1.0, 1.0, 0.0, 0.0, 0.0):
        window.add(np.array([hit, hit, hit, hit]))
    assert pooled([window])["recall"] == 0.0 and pooled([window])["evaluated"] == 3


def test_sampling_evaluates_about_the_requested_share():
    evaluator = Evaluator(k=5, window=10_000, sample_rate=0.25)
    events = stream(2000, seed=9)
    run(events, {"hash": HashScores()}, Featurizer(time_features=False), evaluator, 50)
    s = evaluator.summary("hash")
    assert 0.15 * len(events) < s["evaluated"] + s["cold_start"] + s["repeat"] < 0.35 * len(events)


def test_a_nan_score_for_the_true_item_is_a_miss():
    from stream_app.evaluation.prequential import ranks

    scores = np.array([[0.5, np.nan, 0.1], [np.nan, np.nan, np.nan]])
    mask = np.ones_like(scores, bool)
    rank, n = ranks(scores, np.array([1, 0]), mask)
    assert rank.tolist() == [2, 2] and n.tolist() == [3, 3]


def test_an_infinite_session_gap_keeps_each_user_in_one_session():
    f = Featurizer(session_gap=math.inf)
    events = [SimpleNamespace(user_id=u, item_id="i", event_type="click", ts=t, session_id=None, value=None, context={})
              for u, t in (("a", 1.0), ("b", 2.0), ("a", 1e9))]
    sessions = f.batch(events).sessions.tolist()
    assert sessions[0] == sessions[2] != sessions[1]


class RepeatOnly(HashScores):
    """Scores a user's already-seen items 1 and every other item 0: it can only predict repeats."""

    sequential = True  # so each event is scored with the events before it learned, at any batch size

    def __init__(self):
        super().__init__()
        self.seen: dict[int, set[int]] = {}

    def learn(self, batch: Batch) -> None:
        for u, i in zip(batch.users.tolist(), batch.items.tolist()):
            self.seen.setdefault(u, set()).add(i)

    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), batch.n_items))
        for r, j in enumerate(rows.tolist()):
            out[r, sorted(self.seen.get(int(batch.users[j]), ()))] = 1.0
        return out


def repeat_stream(n: int, seed: int):
    """Each user keeps to 4 items (fewer than k), shared with neighbouring users, so most events re-view;
    60 items in all (more than k)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(30, size=n)
    return [SimpleNamespace(user_id=f"u{u}", item_id=f"i{2 * u + rng.integers(4)}", event_type="click",
                            ts=1.0 + j, session_id=None, value=None, context={}) for j, u in enumerate(users.tolist())]


@pytest.mark.parametrize("batch_size", [1, 16])
def test_repeat_only_scoring_gets_nothing_under_exclude_seen(batch_size):
    events = repeat_stream(600, seed=1)
    evaluator = Evaluator(k=20, window=10_000)
    run(events, {"r": RepeatOnly()}, Featurizer(time_features=False), evaluator, batch_size)
    s = evaluator.summary("r")
    assert s["repeat"] == repeat_count(events) > 100  # the stream is full of repeats ...
    assert s["evaluated"] > 20 and s["recall"] == 0.0  # ... and scoring them high earns nothing


@pytest.mark.parametrize("batch_size", [1, 16])
def test_repeat_only_scoring_gets_the_repeat_share_under_include_seen(batch_size):
    events = repeat_stream(600, seed=2)
    evaluator = Evaluator(k=20, window=10_000, exclude_seen=False)
    run(events, {"r": RepeatOnly()}, Featurizer(time_features=False), evaluator, batch_size)
    s = evaluator.summary("r")
    # every known user and known item is ranked; a user sees at most 4 items, fewer than k: every repeat is a hit
    ranked = [e for j, e in enumerate(events)
              if any(p.user_id == e.user_id for p in events[:j]) and any(p.item_id == e.item_id for p in events[:j])]
    assert s["repeat"] == 0 and s["evaluated"] == len(ranked)
    assert s["recall"] == pytest.approx(repeat_count(events) / len(ranked), abs=1e-12)


def test_repeat_counts_on_a_hand_made_stream():
    rows = [("a", "x"), ("a", "x"), ("b", "x"), ("a", "y"), ("b", "x"), ("a", "x"), ("c", "y"), ("b", "y")]
    events = [SimpleNamespace(user_id=u, item_id=i, event_type="click", ts=float(t), session_id=None, value=None,
                              context={}) for t, (u, i) in enumerate(rows)]
    for batch_size in (1, 3, 8):
        evaluator = Evaluator(k=5, window=100)
        run(events, {"h": HashScores()}, Featurizer(time_features=False), evaluator, batch_size)
        s = evaluator.summary("h")
        # cold: a-x, b-x, c-y (new users) and a-y (y new to the stream); repeats: a-x twice, b-x; ranked: b-y
        assert (s["cold_start"], s["repeat"], s["evaluated"]) == (4, 3, 1), batch_size


def test_several_protocols_in_one_pass_match_separate_passes():
    events = repeat_stream(500, seed=4)
    together = [Evaluator(k=5, window=10_000), Evaluator(k=5, window=10_000, exclude_seen=False)]
    run(events, {"r": RepeatOnly(), "h": HashScores()}, Featurizer(time_features=False), together, 16)
    for evaluator in together:
        alone = Evaluator(k=5, window=10_000, exclude_seen=evaluator.exclude_seen)
        run(events, {"r": RepeatOnly(), "h": HashScores()}, Featurizer(time_features=False), alone, 16)
        for name in ("r", "h"):
            assert evaluator.summary(name) == alone.summary(name)
