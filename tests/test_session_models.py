"""Session models (gru, markov, sknn): planted transitions, restart continuity,
vocabulary growth, and hidden states that include earlier rows of the batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.features import Featurizer, RawEvent
from models.registry import create

torch.set_num_threads(1)

SESSION_MODELS = ("gru", "markov", "sknn", "caser")


def planted_stream(n_events: int = 4000, n_items: int = 40, p_next: float = 0.9, seed: int = 0):
    """Interleaved sessions; the next item is `succ[item]` with probability p_next.

    Returns the events (time order) and `succ`."""
    rng = np.random.default_rng(seed)
    succ = rng.permutation(n_items)
    events: list[RawEvent] = []
    s = 0
    while len(events) < n_events:
        t = float(rng.uniform(0, n_events))
        item = int(rng.integers(n_items))
        for _ in range(int(rng.integers(3, 9))):
            events.append(RawEvent(f"u{s % 50}", f"i{item}", "click", t, f"s{s}"))
            t += float(rng.uniform(1, 5))
            item = int(succ[item]) if rng.random() < p_next else int(rng.integers(n_items))
        s += 1
    events = sorted(events[:n_events], key=lambda e: e.ts)
    return events, succ


def train(name: str, events, batch_size: int = 32, **params):
    model = create(name, seed=3, **params)
    feat = Featurizer()
    for i in range(0, len(events), batch_size):
        model.learn(feat.batch(events[i : i + batch_size]))
    return model, feat


@pytest.fixture(scope="module")
def stream():
    return planted_stream()


@pytest.mark.parametrize("name", ["gru", "markov", "caser"])
def test_planted_next_item_in_top5(name, stream):
    events, succ = stream
    model, feat = train(name, events)
    hits = 0
    n_items = len(succ)
    for a in range(n_items):
        # a fresh session: its first item is `a`; row 1's state includes row 0
        b = feat.batch([RawEvent("q", f"i{a}", "click", 1e6 + a, f"probe{a}"),
                        RawEvent("q", f"i{succ[a]}", "click", 1e6 + a + 1, f"probe{a}")])
        scores = model.score(b, np.array([1]))[0]
        want = feat.items.get(f"i{succ[a]}")
        top5 = np.argsort(-scores, kind="stable")[:5]
        hits += int(want in top5)
    assert hits / n_items >= 0.8, f"{name}: planted successor in top 5 for {hits}/{n_items}"


@pytest.mark.parametrize("name", SESSION_MODELS)
def test_restart_continuity(name, stream):
    events, _ = stream
    head, tail = events[:2000], events[2000:2300]
    model, feat = train(name, head)
    state = {k: np.array(v, copy=True) for k, v in model.export_state().items()}
    assert set(state) == set(type(model).tables)
    restored = create(name, seed=3)
    restored.import_state(state)
    for k, v in restored.export_state().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    # both continue on the same events and must agree exactly
    for i in range(0, len(tail), 50):
        b = feat.batch(tail[i : i + 50])
        rows = np.arange(len(b))
        np.testing.assert_array_equal(model.score(b, rows), restored.score(b, rows))
        model.learn(b)
        restored.learn(b)
    last = tail[-1]
    q = feat.batch([RawEvent(last.user_id, last.item_id, "click", last.ts + 1, last.session_id)])
    top_a = np.argsort(-model.score(q, np.array([0]))[0], kind="stable")[:10]
    top_b = np.argsort(-restored.score(q, np.array([0]))[0], kind="stable")[:10]
    np.testing.assert_array_equal(top_a, top_b)


@pytest.mark.parametrize("name", SESSION_MODELS)
def test_vocabulary_growth_keeps_scores(name, stream):
    events, _ = stream
    model, feat = train(name, events[:1500])
    probe = events[1500:1520]
    b = feat.batch(probe)
    n = b.n_items
    rows = np.arange(len(b))
    before = model.score(b, rows)
    state = {k: np.array(v, copy=True) for k, v in model.export_state().items()}
    # the same rows, now with 25 more items in the vocabulary
    for j in range(25):
        feat.items.add(f"new{j}")
    grown = feat.batch([])
    bigger = dataclasses.replace(b, n_items=grown.n_items)
    after = model.score(bigger, rows)
    assert after.shape == (len(b), n + 25)
    np.testing.assert_array_equal(after[:, :n], before)
    for k, kind in type(model).tables.items():  # earlier rows (and optimiser state) untouched
        if kind == "item":
            np.testing.assert_array_equal(model.export_state()[k][:n], state[k][:n], err_msg=k)
    model.learn(bigger)  # and learning goes on with the grown vocabulary
    assert np.isfinite(model.score(bigger, rows)).all()


def test_gru_state_includes_earlier_rows_of_batch(stream):
    events, _ = stream
    model, feat = train("gru", events[:1500])
    b = feat.batch(events[1500:1564])
    rows = np.arange(len(b))
    got = model.score(b, rows)
    # a fresh, step-by-step run of torch's GRU cell with the model's weights
    w_ih, w_hh, b_ih, b_hh = (torch.from_numpy(a) for a in model._dense)
    cell = torch.nn.GRUCell(model.embedding, model.hidden)
    with torch.no_grad():
        cell.weight_ih.copy_(w_ih)
        cell.weight_hh.copy_(w_hh)
        cell.bias_ih.copy_(b_ih)
        cell.bias_hh.copy_(b_hh)
    state = model.export_state()
    emb, out, bias = state["item_emb"], state["item_out"], state["item_bias"][:, 0]
    kept = state["session"][:, 1 : state["session"].shape[1] - 2 * model.hidden]  # last items + 1, newest last
    h: dict[int, torch.Tensor] = {}
    seen: dict[int, list[int]] = {}
    repeats = 0
    for j in rows:
        s, i = int(b.sessions[j]), int(b.items[j])
        if s not in h:
            h[s] = torch.from_numpy(model.hidden_state(s))[None, :]
            seen[s] = [int(x) - 1 for x in kept[s] if x > 0] if s < len(kept) else []
        else:
            repeats += 1
        mean = emb[seen[s][-model.mean_items :]].mean(0) if seen[s] else np.zeros(model.embedding)
        want = (h[s][0].numpy() @ out[: b.n_items].T + mean @ emb[: b.n_items].T + bias[: b.n_items])
        np.testing.assert_allclose(got[j], want, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            h[s] = cell(torch.from_numpy(emb[i])[None, :], h[s])
        seen[s].append(i)
    assert repeats > 0  # the batch did have sessions with several rows


def test_gru_drain_changes_and_lru():
    events, _ = planted_stream(n_events=300, seed=1)
    model = create("gru", max_sessions=5, seed=0)
    feat = Featurizer()
    b = feat.batch(events[:100])
    model.learn(b)
    changes = model.drain_changes()
    assert set(changes) == set(type(model).tables)
    assert set(changes["session"].tolist()) == set(b.sessions.tolist())
    assert changes["weights"] is None
    held = model.export_state()["session"][:, 0] > 0
    assert held.sum() > 5  # states beyond max_sessions stay until their last change is stored
    step = feat.batch(events[100:101])
    model.learn(step)  # ... which the drain above stands for
    live = model.export_state()["session"][:, 0] > 0
    assert live.sum() == 5  # only the 5 most recently used sessions keep a state
    dropped = np.flatnonzero(held[: len(live)] & ~live)
    assert set(model.evicted("session", np.arange(len(live))).tolist()) == set(dropped.tolist())
    assert model.drain_changes()["session"].tolist() == step.sessions.tolist()


@pytest.mark.parametrize("name", SESSION_MODELS)
def test_forget_and_lookup_rows(name, stream):
    events, _ = stream
    model, feat = train(name, events[:600])
    q = feat.query(None, {}, 1e9, session_id=events[10].session_id)  # item -1: a lookup
    scores = model.score(q, np.array([0]))
    assert scores.shape == (1, q.n_items) and np.isfinite(scores).all()
    model.forget("session", np.array([q.sessions[0]]))
    model.forget("item", np.array([0, 1]))
    model.learn(feat.batch(events[600:700]))
    assert np.isfinite(model.score(q, np.array([0]))).all()


@pytest.mark.parametrize("name", SESSION_MODELS)
def test_restore_from_float32_rows_with_gaps(name, stream):
    """What a Redis restore gives: float32 rows, zeros for rows never written (e.g. expired)."""
    events, _ = stream
    model, feat = train(name, events[:1000])
    state = model.export_state()
    lossy = {}
    for table, kind in type(model).tables.items():
        v = np.asarray(state[table])
        if kind != "blob":
            v = v.astype(np.float32).copy()
            if kind == "session":
                v[::2] = 0.0  # half the sessions were never written / expired
        lossy[table] = v
    restored = create(name, seed=3)
    restored.import_state(lossy)
    b = feat.batch(events[1000:1100])
    rows = np.arange(len(b))
    assert np.isfinite(restored.score(b, rows)).all()
    restored.learn(b)
    # session 0's row is all zeros: it has no state, so it scores like an unknown session
    other = create(name, seed=3)
    other.import_state(lossy)
    fresh = feat.query(None, {}, 1e9)
    zeroed = dataclasses.replace(fresh, sessions=np.array([0]))
    np.testing.assert_allclose(other.score(zeroed, np.array([0])), other.score(fresh, np.array([0])), rtol=1e-6)


def test_gru_import_starts_the_item_rows_a_state_lacks_as_new_ids(stream):
    """The GRU's item rows from a state: each as stored where the state holds it, else as a new id's (an
    item whose embedding and accumulator rows are zeros, never written, or beyond the stored rows)."""
    events, _ = stream
    model, _ = train("gru", events[:1000])
    state = {t: np.asarray(v) for t, v in model.export_state().items()}
    n = len(state["item_out"])
    lacking = dict(state, item_emb=state["item_emb"][: n - 5].copy(), item_acc=state["item_acc"].copy())
    lacking["item_emb"][3], lacking["item_acc"][3] = 0.0, 0.0  # item 3 never written
    restored = create("gru", seed=3)
    restored.import_state(lacking)
    new = create("gru", seed=3)
    new.reserve_items(n)  # every row a new id's
    got, fresh = restored.export_state(), new.export_state()
    stored = np.setdiff1d(np.arange(n - 5), [3])
    np.testing.assert_array_equal(got["item_emb"][stored], state["item_emb"][stored])
    np.testing.assert_array_equal(got["item_out"][stored], state["item_out"][stored])
    for table in ("item_emb", "item_out"):
        np.testing.assert_array_equal(got[table][3], fresh[table][3])
    np.testing.assert_array_equal(got["item_emb"][n - 5 :], fresh["item_emb"][n - 5 :])
    np.testing.assert_array_equal(got["item_out"][n - 5 :], state["item_out"][n - 5 :])  # stored: kept
    assert not np.array_equal(fresh["item_emb"][n - 5 :], state["item_emb"][n - 5 :])


def test_sknn_rebuilds_after_an_import_the_item_index_it_kept_while_learning(stream):
    """The item -> recent slots index rebuilt after an import (sorted at once, when first needed) is the one
    learning kept up event by event, order and per-item cap included, with slots recycled round the ring;
    a copy `narrowed` for one query that builds it builds it for the model it was copied from."""
    events, _ = stream
    model, _ = train("sknn", events[:2000], sessions_per_item=7, max_sessions=120)
    restored = create("sknn", seed=3, sessions_per_item=7, max_sessions=120)
    restored.import_state(model.export_state())
    assert restored._index_box[0] is None, "built before it was needed"
    copy = restored.narrowed({})
    kept = {i: list(v) for i, v in model._index.items() if v}
    assert kept and max(map(len, kept.values())) == 7
    assert {i: list(v) for i, v in copy._index.items()} == kept
    assert restored._index_box[0] is copy._index


# ---- time jumps (see also test_popularity.py) ---------------------------------------------------

JUMPS = {  # (the stream's time, where it jumps to)
    "seconds to milliseconds": (1.7e9, 1.7e12),
    "seconds to 1e300": (1.7e9, 1e300),
    "a 1997 replay, then now": (8.6e8, 1.79e9),
    "the most negative ts to the largest": (-1.7e308, 1.7e308),
}


def sessions(feat: Featurizer, tag: str, pairs: str, ts: float):
    """One two-event session per pair of item names ("ax" is a, then x), a second apart."""
    return feat.batch([RawEvent("u", f"i{item}", "click", ts + 2 * j + k, f"{tag}{j}")
                       for j, pair in enumerate(pairs.split()) for k, item in enumerate(pair)])


def after_a(model, feat: Featurizer, ts: float) -> list[str]:
    """Items ranked to follow `a` in a fresh session."""
    b = feat.batch([RawEvent("q", "ia", "click", ts, "probe"), RawEvent("q", "ia", "click", ts, "probe")])
    scores = model.score(b, np.array([1]))[0]
    assert np.isfinite(scores).all()
    return [feat.items.names[i] for i in np.argsort(-scores, kind="stable")]


def through_redis(model):
    """A copy made from the state as Redis keeps it: row tables as float32, blobs as they are."""
    state = {t: v if type(model).tables[t] == "blob" else np.asarray(v, np.float32) for t, v in model.export_state().items()}
    clone = create(model.name, seed=3, half_life=model.half_life)
    clone.import_state(state)
    return clone


@pytest.mark.parametrize("jump", JUMPS.values(), ids=list(JUMPS))
def test_markov_follows_the_newest_transitions_across_a_jump_in_time(jump):
    before, after = jump
    feat, model = Featurizer(time_features=False), create("markov", seed=3, half_life=30 * 86400.0)
    model.learn(sessions(feat, "old", "ax " * 10, before))
    model.learn(sessions(feat, "new", "ay ay ay", after))  # time jumps: these few transitions are what counts
    assert after_a(model, feat, after)[0] == after_a(through_redis(model), feat, after)[0] == "iy"
    a, y = feat.items.get("ia"), feat.items.get("iy")
    counts = model.export_state()["succ_count"][a]
    assert np.isfinite(counts).all() and counts[model.export_state()["succ"][a] == y + 1][0] > 0
    # ... and back (a replay started again, or the jump was a wrong ts): these count in full
    model.learn(sessions(feat, "back", "az " * 5, before + 100.0))
    for m in (model, through_redis(model)):
        assert after_a(m, feat, before + 100.0)[:2] == ["iz", "iy"]
        assert np.isfinite(m.export_state()["succ_count"]).all()


def test_sknn_has_no_clock_so_jumps_in_time_change_nothing():
    steady, jumping = create("sknn", seed=3), create("sknn", seed=3)
    f1, f2 = Featurizer(time_features=False), Featurizer(time_features=False)
    for j, (tag, pairs) in enumerate((("old", "ax " * 10), ("new", "ay ay ay"), ("back", "az " * 5))):
        steady.learn(sessions(f1, tag, pairs, 1.7e9 + 100 * j))
        jumping.learn(sessions(f2, tag, pairs, (1.7e9, 1e300, -1.7e308)[j]))
    assert after_a(steady, f1, 1.7e9 + 300) == after_a(jumping, f2, 1.7e308)
    for table, value in steady.export_state().items():
        assert np.array_equal(jumping.export_state()[table], value), table


def test_sknn_ended_sessions_stay_neighbours_until_their_slot_comes_round():
    """The worker expires a session's rows after the session gap; sknn's neighbours are past sessions,
    so an ended session keeps voting until `max_sessions` newer sessions took its slot."""
    model, feat = create("sknn", seed=3, max_sessions=3), Featurizer(time_features=False)
    model.learn(sessions(feat, "old", "ax", 1.7e9))
    model.forget("session", np.array([feat.sessions.get("old0")]))  # as the worker's expiry does
    model.learn(sessions(feat, "other", "y", 1.7e9 + 5))  # as popular as x, in no session with a
    ranked = after_a(model, feat, 1.7e9 + 10)
    assert ranked.index("ix") < ranked.index("iy")
    model.learn(sessions(feat, "new", "by bz", 1.7e9 + 20))  # the third session since old0 takes its slot
    ranked = after_a(model, feat, 1.7e9 + 30)
    assert ranked.index("ix") > ranked.index("iy")  # y is now more popular, and x has no neighbour left
    assert (model.export_state()["items"][:, 0] > 0).sum() == 3  # three slots, every one in use
