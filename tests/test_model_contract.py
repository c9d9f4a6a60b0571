"""The contract every registered model keeps, checked on a planted-pattern stream.

The stream: users belong to taste clusters, items to item clusters; a session
starts at an item of the user's cluster (popular ones more often) and mostly
walks to the next item of that cluster, so user models and session models
both have something to learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest

from models import registry
from models.base import Batch, Model
from models.features import Featurizer
from stream_app.evaluation.prequential import Evaluator, run

N_USERS, N_ITEMS, N_CLUSTERS = 150, 120, 6
FIRST = np.zeros(1, np.int64)
K = 10


@dataclass(frozen=True)
class Ev:
    user_id: str
    item_id: str
    event_type: str = "click"
    ts: float = 0.0
    session_id: str | None = None
    value: float | None = None
    context: dict[str, Any] = field(default_factory=dict)


def planted_stream(n_events: int, seed: int = 0, user_offset: int = 0, item_offset: int = 0, t0: float = 1.7e9) -> list[Ev]:
    """Sessions of users walking their own cluster's item cycle (see the module docstring)."""
    rng = np.random.default_rng(seed)
    per_cluster = N_ITEMS // N_CLUSTERS
    popularity = 1.0 / np.arange(1, per_cluster + 1)  # Zipf within a cluster
    popularity /= popularity.sum()
    user_cluster = np.arange(N_USERS) % N_CLUSTERS
    events: list[Ev] = []
    ts, session = t0, 0
    types = np.array(["click", "favorite", "purchase"])
    while len(events) < n_events:
        user = int(rng.integers(N_USERS))
        cluster = user_cluster[user]
        pos = int(rng.choice(per_cluster, p=popularity))
        for _ in range(int(rng.integers(3, 9))):
            item = cluster * per_cluster + pos
            ts += float(rng.integers(1, 60))
            events.append(Ev(
                user_id=f"u{user + user_offset}", item_id=f"i{item + item_offset}",
                event_type=str(types[rng.choice(3, p=[0.8, 0.1, 0.1])]), ts=ts, session_id=f"s{seed}-{session}",
                context={"device": ("ios", "android")[user % 2]},
            ))
            pos = (pos + 1) % per_cluster if rng.random() < 0.8 else int(rng.choice(per_cluster, p=popularity))
        session += 1
    return events[:n_events]


def batches(featurizer: Featurizer, events: list[Ev], size: int = 32) -> list[Batch]:
    return [featurizer.batch(events[s : s + size]) for s in range(0, len(events), size)]


def copy_state(model: Model) -> dict[str, np.ndarray]:
    return {name: np.array(value, copy=True) for name, value in model.export_state().items()}


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float32 rounding (threaded torch kernels may sum in another order)."""
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def stream() -> tuple[list[Batch], Batch]:
    """Coded training batches and a later probe batch (all ids already known)."""
    featurizer = Featurizer()
    coded = batches(featurizer, planted_stream(3000, seed=1))
    probe = featurizer.batch(planted_stream(64, seed=2, t0=1.7e9 + 10**6))
    return coded, probe


NAMES = sorted(registry.MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_learns_the_planted_pattern(name: str) -> None:
    events = planted_stream(6000, seed=3)
    evaluator = Evaluator(k=K, window=10**9)
    models = {"pop": registry.create("pop", seed=0), name: registry.create(name, seed=0)}
    run(events, models, Featurizer(), evaluator, batch_size=16)
    recall = {n: evaluator.summary(n)["recall"] for n in models}
    if name == "pop":
        # Zipf within clusters: popularity beats a random ranking of ~N_ITEMS candidates.
        assert recall["pop"] > 2 * K / N_ITEMS, recall
    else:
        assert recall[name] > recall["pop"] + 0.15, recall


@pytest.mark.parametrize("name", NAMES)
def test_state_keys_and_changes(name: str, stream) -> None:
    coded, _ = stream
    model = registry.create(name, seed=0)
    for batch in coded[:5]:
        model.learn(batch)
    state = model.export_state()
    assert set(state) == set(model.tables)
    changes = model.drain_changes()
    assert set(changes) <= set(model.tables)
    for table, rows in changes.items():
        if rows is not None and len(rows):
            assert model.tables[table] != "blob"
            assert rows.min() >= 0 and rows.max() < len(state[table])


@pytest.mark.parametrize("name", NAMES)
def test_export_import_round_trip(name: str, stream) -> None:
    coded, probe = stream
    rows = np.arange(len(probe))
    model = registry.create(name, seed=0)
    for batch in coded[:60]:
        model.learn(batch)
    clone = registry.create(name, seed=0)
    clone.import_state(copy_state(model))
    assert_same(clone.score(probe, rows), model.score(probe, rows))
    for batch in coded[60:]:  # learning on from the imported state stays identical too
        model.learn(batch)
        clone.learn(batch)
    assert_same(clone.score(probe, rows), model.score(probe, rows))


@pytest.mark.parametrize("name", NAMES)
def test_nothing_changed_after_import(name: str, stream) -> None:
    """State just loaded from the store is what the store holds: no row counts as changed."""
    coded, _ = stream
    model = registry.create(name, seed=0)
    for batch in coded[:5]:
        model.learn(batch)
    clone = registry.create(name, seed=0)
    clone.import_state(copy_state(model))
    for table, rows in clone.drain_changes().items():
        if model.tables[table] != "blob":
            assert len(rows) == 0, table


@pytest.mark.parametrize("name", NAMES)
def test_import_of_shorter_tables(name: str, stream) -> None:
    coded, probe = stream
    model = registry.create(name, seed=0)
    model.learn(coded[0])
    clone = registry.create(name, seed=0)
    clone.import_state(copy_state(model))  # fewer users and items than the later batches need
    for batch in coded[1:20]:
        clone.learn(batch)
    scores = clone.score(probe, np.arange(len(probe)))
    assert scores.shape == (len(probe), probe.n_items) and np.isfinite(scores).all()


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result(name: str, stream) -> None:
    coded, probe = stream
    a, b = registry.create(name, seed=7), registry.create(name, seed=7)
    for batch in coded[:40]:
        a.learn(batch)
        b.learn(batch)
    rows = np.arange(len(probe))
    assert_same(a.score(probe, rows), b.score(probe, rows))


@pytest.mark.parametrize("name", NAMES)
def test_unseen_ids(name: str) -> None:
    featurizer = Featurizer()
    model = registry.create(name, seed=0)
    for batch in batches(featurizer, planted_stream(1000, seed=4)):
        model.learn(batch)
    fresh = featurizer.batch(planted_stream(40, seed=5, user_offset=10_000, item_offset=10_000, t0=1.8e9))
    rows = np.arange(len(fresh))
    scores = model.score(fresh, rows)
    assert scores.shape == (len(fresh), fresh.n_items) and np.isfinite(scores).all()
    model.learn(fresh)
    lookup = featurizer.query("nobody", {"device": "fridge"}, 1.8e9)
    scores = model.score(lookup, np.array([0]))
    assert scores.shape == (1, lookup.n_items) and np.isfinite(scores).all()


@pytest.mark.parametrize("name", NAMES)
def test_forget(name: str) -> None:
    featurizer = Featurizer()
    model = registry.create(name, seed=0)
    old = planted_stream(1500, seed=6, t0=1.0e9)
    for batch in batches(featurizer, old):
        model.learn(batch)
    # Users u0..u49 and items i0..i59 come back later; the rest go idle and expire.
    later = [e for e in planted_stream(800, seed=7, t0=2.0e9) if int(e.user_id[1:]) < 50 and int(e.item_id[1:]) < 60]
    for batch in batches(featurizer, later):
        model.learn(batch)
    cutoff = 1.5e9
    expired = {
        "user": featurizer.users.expire(cutoff), "item": featurizer.items.expire(cutoff),
        "session": featurizer.sessions.expire(cutoff), "context": featurizer.contexts.expire(cutoff),
    }
    assert len(expired["user"]) and len(expired["item"])
    for kind, ids in expired.items():
        model.forget(kind, ids)
    # A forgotten user is answered like a user never seen.
    gone = int(expired["user"][0])
    probe = featurizer.query(None, {}, 2.1e9)
    columns = [getattr(probe, f) for f in ("items", "sessions", "event_types", "weights", "ts", "values", "context")]
    as_gone = Batch(np.array([gone]), *columns, probe.n_users, probe.n_items, probe.n_sessions, probe.n_context)
    assert_same(model.score(as_gone, np.array([0])), model.score(probe, np.array([0])))
    # Freed rows are handed out again and learn like new ids.
    newcomers = planted_stream(300, seed=8, user_offset=20_000, item_offset=20_000, t0=2.2e9)
    coded = featurizer.batch(newcomers)
    assert set(expired["user"].tolist()) & set(coded.users.tolist())
    model.learn(coded)
    scores = model.score(coded, np.arange(len(coded)))
    assert np.isfinite(scores).all()


def scored_rows(batch: Batch, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.flatnonzero(rng.random(len(batch)) < 0.3)


@pytest.fixture
def one_torch_thread():
    """Threaded torch kernels sum in a run-dependent order; with one thread the GRU repeats bit for bit."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", NAMES)
def test_scoring_while_learning_changes_nothing_learned(name: str, stream, one_torch_thread) -> None:
    coded, _ = stream
    scored, plain = registry.create(name, seed=0), registry.create(name, seed=0)
    for n, batch in enumerate(coded[:40]):
        scores = scored.learn_scored(batch, scored_rows(batch, n))
        assert scores.shape == (len(scored_rows(batch, n)), batch.n_items)
        plain.learn(batch)
    a, b = scored.export_state(), plain.export_state()
    for table in a:
        assert np.array_equal(a[table], b[table], equal_nan=True), table


@pytest.mark.parametrize("name", NAMES)
def test_each_row_is_scored_just_before_it_is_learned(name: str, stream) -> None:
    """A sequential model scores row j as if the batch had been cut just before j; a batch model as it
    stood before the batch."""
    coded, _ = stream
    model, reference = registry.create(name, seed=0), registry.create(name, seed=0)
    for batch in coded[:10]:
        model.learn(batch)
        reference.learn(batch)
    for n, batch in enumerate(coded[10:20]):
        rows = scored_rows(batch, n)
        got = model.learn_scored(batch, rows)
        if not reference.sequential:
            assert_same(got, reference.score(batch, rows))
            reference.learn(batch)
            continue
        start = 0
        for r, j in enumerate(rows.tolist()):
            if j > start:
                reference.learn(batch.take(slice(start, j)))
            assert_same(got[r], reference.score(batch.take(slice(j, j + 1)), np.zeros(1, np.int64))[0])
            start = j
        if start < len(batch):
            reference.learn(batch.take(slice(start, None)))


@pytest.mark.parametrize("name", NAMES)
def test_a_replica_absorbing_what_another_learned_holds_its_item_rows(name: str, stream) -> None:
    """Shared items (worker/items.py): a model's changes to its shared item tables, its rows less those of
    a new model grown by `reserve_items`, absorbed by another new model, give that model the same rows."""
    model = registry.create(name, seed=0)
    if not model.shared:
        pytest.skip(f"{name} keeps no shared item tables")
    coded, _ = stream
    for batch in coded[:20]:
        model.learn(batch)
    n = coded[19].n_items
    fresh = registry.create(name, seed=0)
    fresh.reserve_items(n)
    start, learned = copy_state(fresh), copy_state(model)
    replica = registry.create(name, seed=0)
    replica.reserve_items(n)
    for table, how in model.shared.items():
        now = np.asarray(learned[table], np.float64)
        before = np.zeros_like(now)
        given = np.asarray(start[table], np.float64)
        before[: len(given), : given.shape[1]] = given[: len(now), : now.shape[1]]
        delta = now - before
        rows = np.flatnonzero(delta.any(axis=1))
        assert len(rows), f"{table}: nothing learned"
        replica.absorb(table, rows, delta[rows], model.decay_scale(table) if how == "decayed" else None)
    got = replica.export_state()
    for table in model.shared:
        mine = np.asarray(got[table], np.float64)
        theirs = np.asarray(learned[table], np.float64)
        width = theirs.shape[1]
        assert_same(mine[: len(theirs), :width], theirs)


def query_rows(model: Model, state: dict[str, np.ndarray], user: int, session: int) -> dict[str, np.ndarray]:
    """The rows of one query's user and session in every user and session table, as a server reads them."""
    out = {}
    for table, kind in model.query_tables().items():
        row, values = (user if kind == "user" else session), np.asarray(state[table])
        if 0 <= row < len(values):
            out[table] = values[row : row + 1]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_a_model_narrowed_to_one_query_scores_it_as_the_whole_model(name: str, stream) -> None:
    """What a server answers from (`Model.narrowed`): only the asking user's and session's rows, renumbered
    from 0, and every other table shared. It scores the query as the model holding every user does, and
    leaves that model as it was."""
    coded, probe = stream
    model = registry.create(name, seed=0)
    for batch in coded[:60]:
        model.learn(batch)
    if not model.query_tables():
        pytest.skip(f"{name} keeps no user or session rows")
    queries = []
    known = [coded[60].take(slice(j, j + 1)) for j in range(0, len(coded[60]), 2)]  # users and sessions learned
    for one in known + [probe.take(slice(j, j + 1)) for j in range(0, len(probe), 4)]:
        for user, session in ((int(one.users[0]), int(one.sessions[0])), (-1, int(one.sessions[0])),
                              (int(one.users[0]), -1)):
            whole = replace(one, users=np.array([user]), sessions=np.array([session]))
            queries.append((one, user, session, model.score(whole, FIRST)))
    state = copy_state(model)  # after the whole model's scoring, which may grow tables to the vocabulary
    checked = 0
    for one, user, session, expected in queries:
        rows = query_rows(model, state, user, session)
        narrow = replace(one, users=np.array([0 if user >= 0 else -1]),
                         sessions=np.array([0 if session >= 0 else -1]), n_users=1, n_sessions=1)
        assert_same(model.narrowed(rows).score(narrow, FIRST), expected)
        checked += bool(rows)
    assert checked, "no query had rows"
    after = model.export_state()
    for table, values in state.items():
        np.testing.assert_array_equal(np.asarray(after[table]), values, err_msg=f"{table} changed")


def narrowed_queries(model: Model, learned: Batch, probe: Batch) -> list[tuple[Model, Batch]]:
    """Copies of `model` narrowed each to one query (users and sessions of `learned`, unknown ones, and the
    events of `probe`), with their one-row queries, as a server holds them for requests that wait together."""
    state = copy_state(model)
    out = []
    known = [learned.take(slice(j, j + 1)) for j in range(0, len(learned), 3)]
    for one in known + [probe.take(slice(j, j + 1)) for j in range(0, len(probe), 8)]:
        for user, session in ((int(one.users[0]), int(one.sessions[0])), (-1, int(one.sessions[0])),
                              (int(one.users[0]), -1)):
            narrow = replace(one, users=np.array([0 if user >= 0 else -1]),
                             sessions=np.array([0 if session >= 0 else -1]), n_users=1, n_sessions=1)
            out.append((model.narrowed(query_rows(model, state, user, session)), narrow))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_queries_scored_together_score_as_each_alone(name: str, stream) -> None:
    """`Model.score_each` (requests that wait together share the passes over the item rows) gives each
    query what its copy gives alone, in the order asked."""
    coded, probe = stream
    model = registry.create(name, seed=0)
    for batch in coded[:60]:
        model.learn(batch)
    queries = narrowed_queries(model, coded[60], probe)
    alone = [copy.score(batch, FIRST)[0] for copy, batch in queries]
    together = type(model).score_each(queries)
    assert len(together) == len(queries)
    for got, want in zip(together, alone):
        assert_same(got, want)
    assert any(not np.allclose(alone[0], a) for a in alone)  # the answers differ: a mixed-up order would show


ALIKE_WITHOUT_SESSION = {"gru", "markov", "sknn"}  # session models that score from item tables alone then


@pytest.mark.parametrize("name", NAMES)
def test_queries_it_calls_alike_score_alike(name: str, stream) -> None:
    """`Model.alike`: the one-row queries a model says it scores alike (a frozen blend keeps the first one's
    scores for the others) get the same scores, whatever their users, contexts and times."""
    coded, probe = stream
    model = registry.create(name, seed=0)
    for batch in coded[:60]:
        model.learn(batch)
    queries = narrowed_queries(model, coded[60], probe)
    alike = [(copy, batch) for copy, batch in queries if copy.alike(batch)]
    assert bool(alike) == (name in ALIKE_WITHOUT_SESSION), f"{name} says alike for {len(alike)} queries"
    if not alike:
        pytest.skip(f"{name} scores no query alike")
    assert all(batch.sessions[0] < 0 for _, batch in alike)
    assert len({(int(b.context[0].sum()), float(b.ts[0]), int(b.users[0])) for _, b in alike}) > 1
    want = alike[0][0].score(alike[0][1], FIRST)[0]
    for copy, batch in alike[1:]:
        assert_same(copy.score(batch, FIRST)[0], want)
    others = [copy.score(batch, FIRST)[0] for copy, batch in queries if not copy.alike(batch)]
    assert any(not np.allclose(o, want) for o in others)  # the others differ: the test can fail


def test_narrowing_is_needed_so_the_test_can_fail(stream) -> None:
    """Row 0 of the whole model is another user: scored without narrowing, MF answers differently."""
    coded, probe = stream
    model = registry.create("mf", seed=0)
    for batch in coded[:60]:
        model.learn(batch)
    one = probe.take(slice(0, 1))
    assert int(one.users[0]) != 0
    renumbered = replace(one, users=np.array([0]), n_users=1)
    assert not np.allclose(model.score(renumbered, FIRST), model.score(one, FIRST))
