"""The blend: better than its members where they are complementary, and learning only from the past."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from models.blend import Blend
from models.features import Featurizer
from models.registry import create
from stream_app.evaluation.prequential import Evaluator, run
from tests.test_model_contract import batches, narrowed_queries, planted_stream

K = 10


def test_beats_complementary_members() -> None:
    """On the planted stream, Markov knows each session's next item of its cluster's cycle but not the
    user's cluster after a jump; the two-tower DNN knows the cluster but not the cycle's order."""
    events = planted_stream(6000, seed=3)
    evaluator = Evaluator(k=K, window=10**9)
    models = {"markov": create("markov", seed=0), "dnn": create("dnn", seed=0),
              "blend": Blend(members=("markov", "dnn"), seed=0)}
    run(events, models, Featurizer(), evaluator, batch_size=16)
    recall = {n: evaluator.summary(n)["recall"] for n in models}
    assert recall["blend"] > max(recall["markov"], recall["dnn"]) + 0.03, recall


def test_scores_and_steps_see_only_earlier_events() -> None:
    """Row j's score, and the weights after row j, do not depend on the items of later rows."""
    featurizer = Featurizer()
    coded = batches(featurizer, planted_stream(1200, seed=1))
    a, b = Blend(members=("markov", "dnn"), seed=0), Blend(members=("markov", "dnn"), seed=0)
    for batch in coded[:-1]:
        a.learn(batch)
        b.learn(batch)
    last = coded[-1]
    j = len(last) // 2
    items = last.items.copy()
    items[j + 1 :] = items[j + 1 :][::-1]  # another future after row j
    other = replace(last, items=items)
    rows = np.array([j])
    np.testing.assert_array_equal(a.learn_scored(last.take(slice(0, j + 1)), rows),
                                  b.learn_scored(other.take(slice(0, j + 1)), rows))
    np.testing.assert_array_equal(a.export_state()["base"], b.export_state()["base"])
    a.learn(last.take(slice(j + 1, None)))
    b.learn(other.take(slice(j + 1, None)))
    assert not np.array_equal(a.export_state()["base"], b.export_state()["base"])  # now the futures differ


def test_weights_learn_from_outcomes() -> None:
    """Weights move from their start, and the reason's parts add up to the blend's score."""
    featurizer = Featurizer()
    model = Blend(members=("markov", "dnn"), seed=0)
    start = model.export_state()["base"].copy()
    for batch in batches(featurizer, planted_stream(2000, seed=1)):
        model.learn(batch)
    assert not np.allclose(model.export_state()["base"], start)
    probe = featurizer.batch(planted_stream(1, seed=2, t0=1.8e9))
    items = np.arange(5)
    scores, weights, z = model.explain(probe)
    # members that score by item vectors sum each score in another order there (`Model.score_each`)
    np.testing.assert_allclose(scores, model.score(probe, np.zeros(1, np.int64))[0], rtol=1e-5)
    parts = model.contributions(weights, z, items)
    assert weights.shape == (4,) and parts.shape == (5, 2)
    np.testing.assert_allclose(parts.sum(axis=1), scores[items])


def test_answers_explained_together_are_each_explained_alone() -> None:
    """`Blend.explain_each` (requests that wait together, each member scoring them in one pass) gives each
    query the scores, weights and features its copy gives alone."""
    featurizer = Featurizer()
    coded = batches(featurizer, planted_stream(1500, seed=1))
    model = Blend(members=("markov", "dnn", "gru"), seed=0)
    for batch in coded[:-1]:
        model.learn(batch)
    queries = narrowed_queries(model, coded[-1], featurizer.batch(planted_stream(32, seed=2, t0=1.8e9)))
    together = Blend.explain_each(queries)  # type: ignore[arg-type]
    items = np.arange(5)
    for (copy, batch), (scores, weights, z) in zip(queries, together):
        want, want_w, want_z = copy.explain(batch)  # type: ignore[attr-defined]
        np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(weights, want_w)
        np.testing.assert_allclose(z.at(items), want_z.at(items), rtol=1e-5, atol=1e-6)
    assert len({round(float(s[0]), 4) for s, _, _ in together}) > 1  # the answers differ


def test_a_frozen_blend_answers_alike_queries_from_what_it_kept() -> None:
    """A server's blend (`freeze`) answers as before; a member's part of a query that member scores alike
    (the GRU's, the Markov chain's without a session) is computed once and kept: after the GRU's item
    biases change under it, those answers stay as they were while the others change."""
    featurizer = Featurizer()
    coded = batches(featurizer, planted_stream(1500, seed=1))
    model = Blend(members=("markov", "dnn", "gru"), seed=0)
    for batch in coded[:-1]:
        model.learn(batch)
    probe = featurizer.batch(planted_stream(32, seed=2, t0=1.8e9))
    before = Blend.explain_each(narrowed_queries(model, coded[-1], probe))  # type: ignore[arg-type]
    model.freeze()
    queries = narrowed_queries(model, coded[-1], probe)
    frozen = Blend.explain_each(queries)  # type: ignore[arg-type]
    for (want, _, want_z), (got, _, got_z) in zip(before, frozen):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_z.at(np.arange(5)), want_z.at(np.arange(5)), rtol=1e-5, atol=1e-6)
    alike = [batch.sessions[0] < 0 for _, batch in queries]
    assert any(alike) and not all(alike)
    n = probe.n_items
    model.absorb("gru.item_bias", np.arange(0, n, 2), np.full((len(range(0, n, 2)), 1), 3.0))  # against the promise
    after = Blend.explain_each(narrowed_queries(model, coded[-1], probe))  # type: ignore[arg-type]
    for same, (want, _, _), (got, _, _) in zip(alike, frozen, after):
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6) == same


def _records(topic: str, n: int) -> list:
    from stream_app.core.events import encode, prepare
    from stream_app.io import kafka

    # a second apart: no session ends within the stream
    return [kafka.Record(topic, 0, j, None, encode(prepare(
        {"user_id": e.user_id, "item_id": e.item_id, "event_type": e.event_type, "ts": 1.7e9 + j,
         "session_id": e.session_id, "context": e.context}))) for j, e in enumerate(planted_stream(n, seed=4))]


@pytest.mark.integration
def test_a_restarted_shard_has_the_blend_it_committed(topics):
    """Members' rows and the blend's weights reach Redis in the commit: a shard resuming from the last
    commit (after a crash or kill -9) goes on with the blend as it was then, bit for bit."""
    from stream_app.io import kafka
    from tests.test_worker import committed_then_resumed

    records = _records(topics.events_topic, 700)
    live, restarted = committed_then_resumed(topics, "blend", records[:600], 200)
    before, after = live.models["blend"].export_state(), restarted.models["blend"].export_state()
    assert set(after) == set(before) and {"base", "gru.meta", "markov.succ"} <= set(after)
    def same(a: dict, b: dict, **tolerance) -> None:
        """Equal as the store keeps them: float32."""
        for table, value in b.items():
            got = np.asarray(a[table], np.float32)
            np.testing.assert_allclose(got, np.asarray(value, np.float32), err_msg=table, **tolerance)

    same(after, before, rtol=0, atol=0)
    for shard in (live, restarted):  # and both learn on alike (members' float64 counts came back as float32)
        assert shard.process(kafka.Messages.of(records[600:]), lambda msg, reason: pytest.fail(reason)) == 100
    same(restarted.models["blend"].export_state(), live.models["blend"].export_state(), rtol=1e-3, atol=1e-5)


@pytest.mark.integration
def test_worker_publishes_blend_metrics_and_answers_name_the_members(topics, tmp_path):
    """`streamrec worker --models blend` learns and publishes blend's metric records; the lookup API's
    answers carry a reason naming each member with its weights."""
    from stream_app.core.events import prepare
    from stream_app.serving.cache import ModelCache
    from stream_app.serving.recommender import Recommender
    from tests.test_worker import _worker_process, produce, read_topic

    stream = planted_stream(1500, seed=5)
    produce(topics, [prepare({"user_id": e.user_id, "item_id": e.item_id, "event_type": e.event_type, "ts": e.ts,
                              "session_id": e.session_id, "context": e.context}) for e in stream])
    proc = _worker_process(topics, tmp_path / "worker.log", "--models", "pop,blend", "--max-idle", "3")
    try:
        assert proc.wait(timeout=300) == 0, (tmp_path / "worker.log").read_text()[-2000:]
    finally:
        proc.kill()
    records = [r for r in read_topic(topics, topics.metrics_topic) if r["model"] == "blend"]
    assert records and records[-1]["evaluated"] > 0 and 0.0 < records[-1]["recall"] <= 1.0
    cache = ModelCache(topics, ("pop", "blend"), background=False)
    cache.refresh()
    recommender = Recommender(cache)
    found = asyncio.run(recommender.session_rows(stream[-1].session_id))
    for answer in (recommender.for_session(stream[-1].session_id, 5, "blend", {"device": "ios"}, found),
                   recommender.for_user(stream[-1].user_id, 5, "blend", {}, include_seen=False)):
        assert len(answer["items"]) == 5
        for item in answer["items"]:
            members = item["reason"]["blend"]
            assert [m["model"] for m in sorted(members, key=lambda m: m["model"])] == sorted(Blend().members)
            assert item["score"] == pytest.approx(sum(m["part"] for m in members), rel=1e-4, abs=1e-4)


def _reference_features(scores: np.ndarray, eps: float, top: int) -> np.ndarray:
    """The features as the module docstring defines them, in plain numpy (float64 throughout)."""
    s = np.nan_to_num(scores.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    m, n = s.shape
    for r in range(m):
        if s[r].min() >= 0:
            s[r] = np.log(s[r] + eps * max(s[r].mean(), 1e-12))
    s -= s.mean(axis=1, keepdims=True)
    std = s.std(axis=1, keepdims=True)
    z = s / np.where(std > 0, std, 1.0)
    ranks = np.zeros_like(z)
    for r in range(m):
        best = np.lexsort((np.arange(n), -z[r]))[:top]  # best first, ties to the lower item
        ranks[r, best] = 10.0 / (10.0 + np.arange(len(best)))
    return np.concatenate([z, ranks])


@pytest.mark.parametrize("seed", range(6))
def test_features_match_a_reference_computation(seed: int) -> None:
    """z-scores (logged for members that never score below 0) and reciprocal ranks, with ties, non-finite
    scores, constant members and catalogues shorter than `top`."""
    rng = np.random.default_rng(seed)
    n = (5, 60, 3000)[seed % 3]
    scores = (rng.random((5, n)) * 8).astype(np.float32)
    scores[0] -= 4  # a member with negative scores: no log
    scores[1] = np.round(scores[1])  # many ties
    scores[2, : n // 3] = np.nan
    scores[3, ::7] = np.inf
    scores[4] = 2.5  # one score for every item
    blend = Blend(members=("markov", "dnn", "mf", "pop", "sknn"), top=40)
    got = blend._features(list(scores)).at(np.arange(n))
    want = _reference_features(scores, blend.eps, blend.top)
    z = want[:5]
    np.testing.assert_allclose(got[:5], z, atol=2e-5)  # the log is taken in float32
    for r in range(5):  # where float32 rounding reorders near-equal z-scores, ranks may swap between them
        exact = np.abs(np.subtract.outer(z[r], z[r])) > 1e-4
        np.fill_diagonal(exact, True)
        assert np.isclose(np.sort(got[5 + r]), np.sort(want[5 + r])).all()
        if exact.all() or r == 1:
            np.testing.assert_array_equal(got[5 + r], want[5 + r])


def test_similarity_vectors_are_the_first_members_that_has_them() -> None:
    """Markov has none, so the blend's answers are explained by MF's item embeddings."""
    featurizer = Featurizer()
    blend = Blend(members=("markov", "mf"), seed=0)
    for batch in batches(featurizer, planted_stream(600, seed=2)):
        blend.learn(batch)
    assert blend.parts["markov"].similarity_vectors() is None
    vectors = blend.similarity_vectors()
    assert vectors is not None and len(vectors) > 0
    np.testing.assert_array_equal(vectors, blend.parts["mf"].similarity_vectors())
    assert Blend(members=("markov", "pop")).similarity_vectors() is None
