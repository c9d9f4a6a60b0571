"""Popularity: context counts, decay, and forgetting expired context values."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

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
