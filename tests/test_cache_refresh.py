"""The lookup cache catches up from the rows each commit changed, and wakes on announced commits, against a
real Redis (shards driven directly, as the worker drives them)."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from models.features import Vocab, session_key
from stream_app.core.events import encode, prepare
from stream_app.io import kafka
from stream_app.io import redis as redis_io
from stream_app.io.redis import CHANGES_KEPT, Keys, PartitionStore, connect, read_history_pairs, read_snapshot
from stream_app.serving.cache import VIEW_KINDS, ModelCache
from stream_app.serving.recommender import Recommender
from stream_app.serving.view import query_batch
from stream_app.worker.config import WorkerConfig
from stream_app.worker.shard import Shard

pytestmark = pytest.mark.integration

MODELS = ("pop", "mf", "gru", "sknn")  # item, user, session, "own" and blob tables
FIRST = np.zeros(1, np.int64)


def stream(n: int, seed: int, t0: float, users: int = 60, items: int = 80):
    """Events of `users` users over `items` items, `ts` ten seconds apart; half carry a session id."""
    rng = random.Random(seed)
    for j in range(n):
        user = rng.randrange(users)
        yield prepare({"user_id": f"u{user}", "item_id": f"i{rng.randrange(items)}",
                       "event_type": rng.choice(["click", "purchase", "favorite"]), "ts": t0 + 10 * j,
                       "context": {"device": rng.choice(["ios", "android"])},
                       **({"session_id": f"s{user}-{j // 20}"} if user % 2 else {})})


def shard_of(settings) -> Shard:
    store = PartitionStore(connect(settings.redis_url), Keys(settings.key_prefix, settings.events_topic, 0))
    shard = Shard(store, WorkerConfig(models=MODELS, batch_size=50, idle_expiry=3000.0, session_gap=600.0))
    shard.resume()
    return shard


def learn(shard: Shard, events: list, first: int, per_commit: int) -> int:
    """Learn `events` from offset `first`, committing every `per_commit` events; returns the commits made."""
    commits = 0
    for start in range(0, len(events), per_commit):
        part = events[start : start + per_commit]
        records = [kafka.Record("events", 0, first + start + j, None, encode(e)) for j, e in enumerate(part)]
        assert shard.process(kafka.Messages.of(records), lambda msg, reason: pytest.fail(reason)) == len(part)
        shard.commit()
        commits += 1
    return commits


def pairs(cooc) -> np.ndarray:
    """The (user row, item) pairs of a co-occurrence index, sorted."""
    users = np.repeat(cooc.user_rows, np.diff(cooc.user_ptr))
    return np.stack([users, cooc.user_items])


def assert_same_state(caught_up, full) -> None:
    assert caught_up.version == full.version
    assert caught_up.vocabs == full.vocabs
    assert caught_up.open_sessions == full.open_sessions
    assert not caught_up.history, "a view keeps the users' histories in its co-occurrence index only"
    for name, tables in full.models.items():
        for table, values in tables.items():
            mine = caught_up.models[name][table]
            rows, cols = max(len(mine), len(values)), max(mine.shape[1], values.shape[1])
            padded = [np.pad(a, ((0, rows - len(a)), (0, cols - a.shape[1]))) for a in (mine, values)]
            np.testing.assert_array_equal(*padded, err_msg=f"{name}.{table}")


@pytest.mark.parametrize("models", [MODELS, ("pop", "sknn")], ids=["embeddings", "co-occurrence"])
def test_a_view_caught_up_from_the_changed_rows_equals_a_full_snapshot(topics, models):
    """A view holds item, context and shared state only (users' history too where co-occurrence explains
    answers, with no embeddings served); caught up over commits, it equals a view read whole."""
    shard = shard_of(topics)
    first = list(stream(600, seed=1, t0=1.7e9))
    learn(shard, first, 0, 200)
    cache = ModelCache(topics, models, background=False, refresh_interval=0.0)
    before = cache.shard(0)
    cache.refresh()  # the other partition's (empty) view too
    full = cache.full_reloads
    assert set(before.models) == set(models)
    # later events: new users, items and sessions, and (stream time far on) expired users, items and sessions
    later = list(stream(400, seed=2, t0=1.7e9 + 20_000, users=90, items=120))
    commits = learn(shard, later, len(first), 40)
    assert commits <= CHANGES_KEPT
    view = cache.shard(0)
    assert cache.full_reloads == full, "the view was read whole, not caught up"
    assert view.version == before.version + commits
    assert len(view.featurizer.items.index) != len(before.featurizer.items.index)
    assert view.snapshot is not None
    full_read = read_snapshot(cache.client, cache.keys(0), cache.view_tables, VIEW_KINDS, cache.view_history,
                              open_sessions=False)
    assert_same_state(view.snapshot, full_read)
    for name, model in view.models.items():  # no user's or session's own rows: those are read per request
        assert not set(model.query_tables()) & set(view.snapshot.models[name]), name
    assert not view.featurizer.users.index and not view.featurizer.sessions.index
    assert (view.cooc is not None) == cache.view_history == (models != MODELS)
    user = later[-1].user_id
    fresh = ModelCache(topics, models, background=False).shard(0)
    for attr in ("items", "contexts"):  # the vocabularies updated in place of restored, as a full read restores them
        mine, full_vocab = getattr(view.featurizer, attr), getattr(fresh.featurizer, attr)
        assert mine.index == full_vocab.index, attr
        assert all(name is None for name in mine.names[len(full_vocab.names):]), attr  # freed rows at the end
        assert mine.names[: len(full_vocab.names)] == full_vocab.names, attr
    if cache.view_history:
        np.testing.assert_array_equal(pairs(view.cooccurrence()), pairs(fresh.cooccurrence()))
        assert len(view.cooccurrence().user_items) > 0
    rows = cache.query(0, user)
    batch = query_batch(view, {"device": "ios"}, later[-1].ts, rows)
    for name in models:
        np.testing.assert_allclose(view.models[name].narrowed(rows.models.get(name, {})).score(batch, FIRST),
                                   fresh.models[name].narrowed(rows.models.get(name, {})).score(batch, FIRST),
                                   rtol=1e-6, err_msg=name)


def test_histories_read_in_chunks_are_the_pairs_of_the_snapshots_histories(topics, monkeypatch):
    shard = shard_of(topics)
    learn(shard, list(stream(500, seed=4, t0=1.7e9)), 0, 250)
    client, keys = connect(topics.redis_url), Keys(topics.key_prefix, topics.events_topic, 0)
    monkeypatch.setattr(redis_io, "HISTORY_SCAN", 7)  # many HSCAN calls
    calls, hscan = [], client.hscan
    client.hscan = lambda *a, **kw: calls.append(a) or hscan(*a, **kw)
    users, items = read_history_pairs(client, keys)
    assert len(calls) > 1
    history = read_snapshot(client, keys, {}, ()).history
    assert len(history) > 7 * 3
    expected = sorted((u, int(i)) for u, h in history.items() for i in h[:, 0])
    assert sorted(zip(users.tolist(), items.tolist())) == expected


def test_a_view_too_far_behind_the_change_log_or_ahead_of_the_state_is_read_whole(topics):
    shard = shard_of(topics)
    events = list(stream(CHANGES_KEPT + 20, seed=3, t0=1.7e9))
    learn(shard, events[:10], 0, 10)
    cache = ModelCache(topics, ("pop",), background=False, refresh_interval=0.0)
    cache.shard(0)
    cache.refresh()
    full = cache.full_reloads
    learn(shard, events[10:], 10, 1)  # more commits than the log keeps
    view = cache.shard(0)
    assert cache.full_reloads == full + 1
    assert view.version == int(cache.client.get(cache.keys(0).version))
    cache.client.set(cache.keys(0).version, 3)  # the state went back (as if Redis had lost it)
    assert cache.shard(0).version == 3 and cache.full_reloads == full + 2


def test_the_background_cache_wakes_on_an_announced_commit_not_its_poll(topics):
    shard = shard_of(topics)
    events = list(stream(200, seed=4, t0=1.7e9))
    learn(shard, events[:100], 0, 100)
    cache = ModelCache(topics, ("pop",), refresh_interval=30.0, catch_up_interval=0.0)  # polling alone: 30 s
    try:
        old = cache.shard(0).version
        time.sleep(0.5)  # the refresher has subscribed
        learn(shard, events[100:], 100, 100)
        committed = time.monotonic()
        while cache.shard(0).version == old and time.monotonic() - committed < 5:
            time.sleep(0.01)
        assert cache.shard(0).version == old + 1
        assert time.monotonic() - committed < 2.0
    finally:
        cache.close()


def test_a_shard_catches_up_at_most_once_per_catch_up_interval(topics):
    """Under a busy stream a shard's catch-ups are spaced out (each costs the process CPU): a commit
    moments after the last catch-up waits for the interval, then is caught up."""
    shard = shard_of(topics)
    events = list(stream(20, seed=6, t0=1.7e9))
    learn(shard, events[:10], 0, 10)
    cache = ModelCache(topics, ("pop",), background=False, refresh_interval=0.0, catch_up_interval=1.0)
    old = cache.shard(0).version
    learn(shard, events[10:20], 10, 10)
    cache.refresh()
    assert cache.shard(0).version == old, "caught up again within the interval"
    time.sleep(1.0)
    cache.refresh()
    assert cache.shard(0).version == old + 1


def test_a_query_reads_its_users_and_sessions_rows_as_committed_not_as_the_view_holds_them(topics):
    """The request path reads the asking user's and session's own rows from Redis (one script call), so
    an answer sees her latest commit while the view is older; the rows equal a full snapshot's."""
    shard = shard_of(topics)
    events = list(stream(400, seed=5, t0=1.7e9))
    learn(shard, events[:200], 0, 200)
    cache = ModelCache(topics, MODELS, background=False, refresh_interval=3600.0)  # the view stays as it is
    view = cache.shard(0)
    new_user = prepare({"user_id": "newcomer", "item_id": "i3", "event_type": "purchase", "ts": 1.7e9 + 4000,
                        "session_id": "fresh-session"})
    learn(shard, events[200:] + [new_user], 200, 201)
    assert cache.shard(0).version == view.version, "the view moved; the test would prove nothing"
    assert view.featurizer.users.get("newcomer") < 0 and view.featurizer.session_row("fresh-session") < 0
    snap = read_snapshot(cache.client, cache.keys(0), {name: dict(m.tables) for name, m in shard.models.items()})
    checked = 0
    asked = [(e.user_id, None) for e in events[200:]] + [(None, session_key(e.session_id)) for e in events[200:] if e.session_id]
    for user, key in sorted(set(asked + [("newcomer", None), (None, session_key("fresh-session"))]), key=str):
        got = cache.query(0, user, key)
        if user is not None:
            assert got.user == snap.vocabs["user"][user]
            np.testing.assert_array_equal(got.history, snap.history[got.user])
            key = snap.open_sessions.get(user, ("",))[0]  # users without explicit session ids have one open
        assert got.session == snap.vocabs["session"].get(key, -1)
        for name, tables in shard.models.items():
            for table, kind in tables.query_tables().items():
                row = got.user if kind == "user" else got.session
                stored = snap.models[name][table]
                if 0 <= row < len(stored) and stored[row].any():
                    mine = got.models[name][table][0]
                    np.testing.assert_array_equal(mine, stored[row, : len(mine)], err_msg=f"{name}.{table}")
                    checked += 1
    assert checked > 100
    assert cache.query(0, "nobody") == cache.query(0, None, "s:nobody")
    assert cache.query(0, "nobody").user == -1 and cache.query(0, "nobody").models == {}
    rec = Recommender(cache)
    answer = rec.for_user("newcomer", 5, "mf", {}, include_seen=False)
    assert answer["items"] and all(item["reason"].get("item_id") == "i3" for item in answer["items"]), answer
    session = rec.for_session("fresh-session", 5, "gru", {}, asyncio.run(rec.session_rows("fresh-session")))
    assert session["items"] and session["items"][0]["reason"]["kind"] == "session", session
    assert "i3" not in [item["item_id"] for item in session["items"]]


def test_the_read_script_refuses_table_names_it_cannot_hold() -> None:
    """The request path's script holds its tables' names as Lua strings: a name with a quote (or anything
    but letters, digits, '_', '.' and ':') is refused when the reader is made, never written in."""
    reader = redis_io.QueryReader({"mf": {"user": "user"}, "gru": {"session": "session"}})
    assert "'mf:user'" in reader._source and "'gru:session'" in reader._source
    with pytest.raises(ValueError, match="cannot be written into the read script"):
        redis_io.QueryReader({"mf": {"us'er": "user"}})


def test_the_request_path_reads_on_asyncio_and_its_client_can_be_closed_and_made_anew(topics):
    """`aquery` (the API's, on its event loop) reads what `query` reads; after `aclose` (an app's shutdown)
    a new event loop gets a new client, the script included."""
    shard = shard_of(topics)
    events = list(stream(100, seed=7, t0=1.7e9))
    learn(shard, events, 0, 100)
    cache = ModelCache(topics, MODELS, background=False)
    user = events[-1].user_id

    async def ask():
        try:
            return await cache.aquery(0, user)
        finally:
            await cache.aclose()

    expected = cache.query(0, user)
    for got in (asyncio.run(ask()), asyncio.run(ask())):
        assert (got.user, got.session) == (expected.user, expected.session) and got.user >= 0
        np.testing.assert_array_equal(got.history, expected.history)
        assert got.models.keys() == expected.models.keys() and got.models["mf"]


def test_a_vocabulary_updated_with_changes_equals_one_restored_from_the_changed_mapping():
    rng = random.Random(9)
    for _ in range(200):
        mapping = {f"n{j}": row for j, row in enumerate(rng.sample(range(40), rng.randrange(30)))}
        changed, changes = dict(mapping), {}
        for name in rng.sample(sorted(mapping), rng.randrange(len(mapping) + 1)):  # some leave ...
            del changed[name]
            changes[name] = None
        free = sorted(set(range(60)) - set(changed.values()))
        for j in range(rng.randrange(10)):  # ... and new ones take free rows, those they left included
            row = free.pop(rng.randrange(len(free)))
            changed[f"new{j}"] = changes[f"new{j}"] = row
        base, restored = Vocab(), Vocab()
        base.restore(mapping)
        restored.restore(changed)
        updated = base.updated(dict(rng.sample(sorted(changes.items()), len(changes))))  # in any order
        assert updated.index == restored.index
        n = len(restored.names)
        assert updated.names[:n] == restored.names and not any(updated.names[n:])
        assert [r for r in updated._free if r < n] == restored._free


_LOOKUPS_SCRIPT = """
import sys
import numba
import numpy as np
from models import registry
from models.blend import Blend
from models.features import Featurizer
from models.kernels import top_items
from stream_app.core.settings import Settings
from stream_app.serving.cache import ModelCache
from tests.test_model_contract import batches, narrowed_queries, planted_stream

def compiled():
    return {f"{name}.{attr}": len(obj.signatures) for name, mod in list(sys.modules.items())
            if name.startswith("models.") for attr, obj in vars(mod).items()
            if isinstance(obj, numba.core.dispatcher.Dispatcher)}

names = sorted(registry.MODELS)
featurizer = Featurizer()
coded = batches(featurizer, planted_stream(600, seed=1))
probe = featurizer.batch(planted_stream(16, seed=2, t0=1.8e9))
learned = {}
for name in names:
    model = registry.create(name, seed=0)
    for batch in coded[:-1]:
        model.learn(batch)
    model.freeze()
    learned[name] = model
if sys.argv[1] == "warm":
    ModelCache(Settings(), names, background=False).compile_models()
before = compiled()
for name, model in learned.items():  # as `Recommender._ranked` scores lookups that wait together
    queries = narrowed_queries(model, coded[-1], probe)
    if isinstance(model, Blend):
        scores = []
        for raw, _, z in Blend.explain_each(queries):
            z.at(np.arange(3))  # the reasons' features of an answer's items
            scores.append(raw)
    else:
        scores = type(model).score_each(queries)
    for s in scores:
        top_items(s, 20)
print({k: (before.get(k, 0), n) for k, n in compiled().items() if n != before.get(k, 0)})  # grown
"""


@pytest.mark.parametrize("warm", [True, False])
def test_lookups_that_wait_together_compile_nothing_after_the_warm_up(warm):
    """`ModelCache.compile_models` runs each model's paths that lookups take, the batched ones included
    (`Model.score_each`, `Blend.explain_each`, top-k), so that no lookup waits for numba. A new interpreter
    (this one's numba is warm already) learns every model, freezes it, warms up, then scores narrowed copies
    of it together: no compiled function gains a signature. Without the warm-up some do (the test can fail)."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _LOOKUPS_SCRIPT, "warm" if warm else "cold"], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    grown = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert (grown == {}) == warm, grown


def test_a_catch_up_reads_thousands_of_rows_of_a_table_as_hmget_does(topics):
    """A catch-up hands Redis the changed rows of a table as one comma-joined argument (`_HMGET_ROWS`): the
    same values as HMGET, missing rows as None, past the script's chunks of 4,000 fields."""
    from stream_app.io.redis import _HMGET_ROWS

    client = connect(topics.redis_url)
    key = f"{topics.key_prefix}:rows"
    client.hset(key, mapping={str(i): np.float32(i).tobytes() for i in range(0, 9001, 3)})
    fields = [str(i) for i in range(9001)]  # two of three missing
    got = client.eval(_HMGET_ROWS, 1, key, ",".join(fields))
    assert len(got) == 9001 and got == client.hmget(key, fields)
    assert got[9000] == np.float32(9000).tobytes() and got[8999] is None
