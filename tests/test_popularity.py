"""Popularity: context counts, decay (however far time jumps), and forgetting expired context values."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from models.decay import MAX_LAG, DecayClock
from models.features import Featurizer
from models.popularity import Popularity


def event(user, item, device, ts):
    return SimpleNamespace(user_id=user, item_id=item, event_type="click", ts=ts, session_id=None, value=None,
                           context={"device": device})


def test_context_shifts_the_ranking_and_a_forgotten_context_value_no_longer_does():
    f, pop = Featurizer(), Popularity()
    pop.learn(f.batch([event("u1", "a", "ios", 1.0)] * 3 + [event("u2", "b", "web", 2.0)] * 4))
    ios = pop.score(f.query(None, {"device": "ios"}, 3.0), np.array([0]))[0]
    plain = pop.score(f.query(None, {}, 3.0), np.array([0]))[0]
    a, b = f.items.get("a"), f.items.get("b")
    assert ios[a] > ios[b] and plain[b] > plain[a]
    pop.forget("context", np.array([f.contexts.get("device=ios")]))
    after = pop.score(f.query(None, {"device": "ios"}, 3.0), np.array([0]))[0]
    np.testing.assert_allclose(after, plain)
    assert len(pop.drain_changes()["ctx_count"]) == 2  # every row is rewritten to Redis


def test_older_events_weigh_less_after_a_half_life():
    f, pop = Featurizer(time_features=False), Popularity(half_life=10.0)
    pop.learn(f.batch([event("u", "old", "x", 0.0)] * 2 + [event("u", "new", "x", 20.0)]))
    scores = pop.score(f.query(None, {}, 20.0), np.array([0]))[0]
    old, new = scores[f.items.get("old")], scores[f.items.get("new")]
    assert np.isclose(new / old, 2.0)  # 2 events two half-lives ago = 0.5 of one event now


def test_context_table_is_only_as_wide_as_the_context_values_it_counts():
    f, pop = Featurizer(), Popularity()  # hour and day are context values too, but popularity counts only device
    pop.learn(f.batch([event("u", "a", "ios", 1.0), event("u", "b", "web", 2.0)]))
    width = max(f.contexts.get("device=ios"), f.contexts.get("device=web")) + 1
    for hour in range(1, 48):  # new hours and days take the context rows after the devices
        pop.learn(f.batch([event("u", "a", "ios", 3600.0 * hour)]))
    assert len(f.contexts) >= width + 20
    assert pop.export_state()["ctx_count"].shape[1] == width
    plain = Popularity()
    plain.learn(f.batch([SimpleNamespace(**{**vars(event("u", "a", "ios", 5.0)), "context": {}})]))
    assert plain.export_state()["ctx_count"].shape[1] == 1  # nothing counted: one empty column


# ---- time jumps: weights stay finite and non-zero, the newest events rank ---------------------

NOW = 1.79e9  # 2026
JUMPS = {  # (the stream's time, where it jumps to)
    "seconds to milliseconds": (1.7e9, 1.7e12),
    "seconds to 1e300": (1.7e9, 1e300),
    "a 1997 replay, then now": (8.6e8, NOW),
    "the most negative ts to the largest": (-1.7e308, 1.7e308),
}


def learn(pop: Popularity, f: Featurizer, items: str, ts: float) -> None:
    pop.learn(f.batch([event("u", item, "x", ts + j) for j, item in enumerate(items)]))


def ranking(pop: Popularity, f: Featurizer, ts: float) -> list[str]:
    scores = pop.score(f.query(None, {}, ts), np.array([0]))[0]
    assert np.isfinite(scores).all()
    return [f.items.names[i] for i in np.argsort(-scores, kind="stable")]


def through_redis(pop: Popularity) -> Popularity:
    """A copy made from the state as Redis keeps it: row tables as float32, blobs as they are."""
    state = {t: v if Popularity.tables[t] == "blob" else np.asarray(v, np.float32) for t, v in pop.export_state().items()}
    clone = Popularity(half_life=pop.half_life)
    clone.import_state(state)
    return clone


@pytest.mark.parametrize("jump", JUMPS.values(), ids=list(JUMPS))
def test_a_jump_in_time_forward_then_back_leaves_the_newest_events_ranked_first(jump):
    before, after = jump
    f, pop = Featurizer(time_features=False), Popularity()
    learn(pop, f, "aaaaaaaaab", before)  # a long history of a (and one b)
    learn(pop, f, "bbbc", after)  # then time jumps: a few events are all that count
    assert ranking(pop, f, after)[:2] == ranking(through_redis(pop), f, after)[:2] == ["b", "c"]
    count = pop.export_state()["count"][:, 0]
    b = f.items.get("b")
    assert np.isfinite(count).all() and 0 < count[b] < np.inf
    # ... and back (a replay started again, or the jump was a wrong ts): these events count in full
    learn(pop, f, "ddddd", before + 100.0)
    for model in (pop, through_redis(pop)):
        count = model.export_state()["count"][:, 0]
        assert ranking(model, f, before + 100.0)[:2] == ["d", "b"]
        assert np.isfinite(count).all() and count[f.items.get("d")] > 0 and count[b] > 0


def test_the_clock_moves_forward_without_overflow_and_back_without_underflow():
    clock, half_life = DecayClock(10.0), 10.0
    assert clock.advance(np.array([0.0, 5.0])) is None and clock.t0 == 0.0
    weights, rescale = clock.weights(np.array([100.0, 600.0]))  # 60 half-lives later: still in range
    assert rescale is None and weights[0] == 2.0**10 and weights[1] == 2.0**60
    weights, rescale = clock.weights(np.array([1e300]))
    assert rescale == 0.0 and clock.t0 == 1e300 and weights[0] == 1.0  # what came before weighs nothing now
    # a whole batch more than MAX_LAG half-lives back: time went back; the counts carry over
    weights, rescale = clock.weights(np.array([1.0, 2.0]))
    assert rescale is None and clock.t0 == 2.0 and weights.tolist() == [2.0**-0.1, 1.0]
    # a late event weighs its age; one more than MAX_LAG half-lives late, no less than 2 ** -MAX_LAG
    weights, rescale = clock.weights(np.array([2.0 - 3 * half_life, 2.0, -1e300]))
    assert rescale is None and clock.t0 == 2.0
    assert weights.tolist() == [1 / 8, 1.0, 2.0**-MAX_LAG]
    weights, rescale = clock.weights(np.array([1.7e308]))
    assert rescale == 0.0 and clock.t0 == 1.7e308 and weights[0] == 1.0
    clone = DecayClock(half_life)
    clone.load(clock.export())
    assert clone.t0 == clock.t0
    with clock.held():  # learn_scored moves the clock once per batch, then learns it in parts
        assert clock.advance(np.array([-1.7e308])) is None and clock.t0 == 1.7e308


def test_learning_is_the_same_scored_or_not_across_a_jump_back():
    """learn_scored learns a batch in parts, at the clock of the whole batch: the state is learn's."""
    f = Featurizer(time_features=False)
    scored, plain = Popularity(), Popularity()
    first = f.batch([event("u", i, "x", 1e12 + j) for j, i in enumerate("aab")])
    back = f.batch([event("u", i, "x", ts) for i, ts in (("c", 1.7e9 - 1e9), ("b", 1.7e9), ("c", 1.7e9 - 2e9))])
    for model in (scored, plain):
        model.learn(first)
    scored.learn_scored(back, np.array([1, 2]))
    plain.learn(back)
    for table, value in plain.export_state().items():
        assert np.array_equal(scored.export_state()[table], value), table
