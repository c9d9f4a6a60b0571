"""Caser: a planted pattern only a window of several items reveals, lookups by session alone, and
the item vectors serving ranks with."""

from __future__ import annotations

import numpy as np
import pytest

from models.features import Featurizer, RawEvent
from models.registry import create

N_ITEMS = 30


def skip_stream(n_events: int = 6000, seed: int = 0) -> tuple[list[RawEvent], np.ndarray]:
    """Sessions whose next item is `succ` of the item before last, the last one drawn at random: the
    last item says nothing of the next, the one before it everything (a "skip" pattern)."""
    rng = np.random.default_rng(seed)
    succ = rng.permutation(N_ITEMS)
    events: list[RawEvent] = []
    s, t = 0, 0.0
    while len(events) < n_events:
        seq = [int(rng.integers(N_ITEMS)), int(rng.integers(N_ITEMS))]
        while len(seq) < int(rng.integers(6, 10)):
            seq.append(int(succ[seq[-2]]) if rng.random() < 0.9 else int(rng.integers(N_ITEMS)))
        for item in seq:
            t += 1.0
            events.append(RawEvent(f"u{s % 40}", f"i{item}", "click", t, f"s{s}"))
        s += 1
    return events[:n_events], succ


def train(name: str, events: list[RawEvent]):
    model, feat = create(name, seed=1), Featurizer(time_features=False)
    for i in range(0, len(events), 32):
        model.learn(feat.batch(events[i : i + 32]))
    return model, feat


@pytest.fixture(scope="module")
def trained():
    events, succ = skip_stream()
    return (*train("caser", events), events, succ)


def hits_after(model, feat, succ, rng) -> float:
    """How often succ[a] is in the top 5 after a fresh session a, b (b at random)."""
    hits = 0
    for a in range(N_ITEMS):
        b = int(rng.integers(N_ITEMS))
        batch = feat.batch([RawEvent("probe", f"i{item}", "click", 1e6, f"p{a}") for item in (a, b, 0)])
        scores = model.score(batch, np.array([2]))[0]  # row 2's window: the rows before it
        top = np.argsort(-scores, kind="stable")[:5]
        hits += int(feat.items.get(f"i{succ[a]}") in top)
    return hits / N_ITEMS


def test_the_window_finds_what_the_last_item_cannot(trained):
    model, feat, events, succ = trained
    caser = hits_after(model, feat, succ, np.random.default_rng(5))
    markov = hits_after(*train("markov", events)[:2], succ, np.random.default_rng(5))
    assert caser >= 0.8, caser
    assert markov < 0.4, markov  # first order: the pattern is invisible to it


def test_a_session_lookup_reads_the_sessions_window(trained):
    """A lookup by session alone (no user) ranks from the session's last items."""
    model, feat, events, succ = trained
    hits = n = 0
    for session in {e.session_id for e in events[-400:]}:
        lookup = feat.query(None, {}, 1e6, session_id=session)
        assert lookup.users[0] == -1 and lookup.sessions[0] >= 0
        window = model.session_items(int(lookup.sessions[0]))
        assert len(window) == model.window
        scores = model.score(lookup, np.array([0]))[0]
        want = feat.items.get(f"i{succ[int(feat.items.names[window[-2]][1:])]}")
        hits += int(want in np.argsort(-scores, kind="stable")[:5])
        n += 1
    assert hits / n >= 0.7, (hits, n)


def test_serving_vectors_give_the_scores(trained):
    """What a server precomputes (item vectors, query vectors) ranks exactly as `score`."""
    model, feat, events, _ = trained
    batch = feat.batch(events[:50])
    rows = np.arange(0, 50, 3)
    vectors, bias = model.item_vectors()
    q, known = model.query_vectors(batch, rows)
    assert known.all()
    np.testing.assert_allclose(q @ vectors[: batch.n_items].T + bias[: batch.n_items], model.score(batch, rows),
                               rtol=1e-5, atol=1e-5)


def test_a_restarted_shard_has_the_model_it_committed(topics):
    """The windows, rows and layers reach Redis in the commit: a shard resuming after a crash (or
    kill -9) from the last commit continues with the model as it was then, bit for bit."""
    from stream_app.core.events import encode, prepare
    from stream_app.io import kafka
    from tests.test_worker import committed_then_resumed

    stream, _ = skip_stream(964, seed=2)
    records = [kafka.Record(topics.events_topic, 0, j, None, encode(prepare(
        {"user_id": e.user_id, "item_id": e.item_id, "event_type": e.event_type, "ts": 1.7e9 + e.ts,
         "session_id": e.session_id}))) for j, e in enumerate(stream)]
    live, restarted = committed_then_resumed(topics, "caser", records[:900], 300)
    before, after = live.models["caser"].export_state(), restarted.models["caser"].export_state()
    assert set(after) == set(before)
    for table, value in before.items():
        np.testing.assert_array_equal(after[table], value, err_msg=table)
    for shard in (live, restarted):  # and both learn on alike
        assert shard.process(kafka.Messages.of(records[900:]), lambda msg, reason: pytest.fail(reason)) == 64
    for table, value in live.models["caser"].export_state().items():
        np.testing.assert_array_equal(restarted.models["caser"].export_state()[table], value, err_msg=table)


def test_the_api_answers_a_user_from_her_window(topics):
    """Worker to Redis to the lookup API: a user's answer ranks what her last items predict."""
    from stream_app.core.events import encode, prepare
    from stream_app.io import kafka
    from stream_app.serving.cache import ModelCache
    from stream_app.serving.recommender import Recommender
    from stream_app.worker.config import WorkerConfig
    from stream_app.worker.worker import Worker

    stream, succ = skip_stream(3000, seed=3)
    with kafka.Sender(kafka.target(topics)) as sender:
        for e in stream:
            event = prepare({"user_id": e.user_id, "item_id": e.item_id, "event_type": "click", "ts": 1.7e9 + e.ts,
                             "session_id": e.session_id})
            sender.send(topics.events_topic, encode(event), key=event.user_id.encode())
    Worker(topics, WorkerConfig(models=("caser",))).run(max_idle=3)
    cache = ModelCache(topics, ("caser",), background=False)
    cache.refresh()
    hits = 0
    users = sorted({e.user_id for e in stream})
    for user in users:
        answer = Recommender(cache).for_user(user, 5, "caser", {}, include_seen=True)
        before_last = [e.item_id for e in stream if e.user_id == user][-2]
        hits += f"i{succ[int(before_last[1:])]}" in {i["item_id"] for i in answer["items"]}
    assert hits / len(users) >= 0.7, (hits, len(users))
