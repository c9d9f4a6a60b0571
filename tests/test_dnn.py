"""The `dnn` two-tower model answers from the query's context and from the user's recent items."""

from __future__ import annotations

import numpy as np

from models.dnn import DNN
from models.features import Featurizer, RawEvent

N_USERS, PER_GROUP = 60, 20


def device_stream(n_events: int, seed: int = 0) -> list[RawEvent]:
    """Users switch devices at random; what they click depends on the device only (ios: items 0..19,
    android: items 20..39), so the user alone says nothing."""
    rng = np.random.default_rng(seed)
    events = []
    for e in range(n_events):
        device = int(rng.integers(2))
        item = device * PER_GROUP + int(rng.integers(PER_GROUP))
        events.append(RawEvent(f"u{rng.integers(N_USERS)}", f"i{item}", "click", 1.7e9 + 10 * e,
                               context={"device": ("ios", "android")[device]}))
    return events


def top_groups(model: DNN, featurizer: Featurizer, user: str, context: dict, k: int = 10) -> np.ndarray:
    """The item groups (item index // PER_GROUP) of the model's top k for a lookup."""
    query = featurizer.query(user, context, 1.8e9)
    scores = model.score(query, np.array([0]))[0]
    names = [featurizer.items.names[i] for i in np.argsort(-scores)[:k]]
    return np.array([int(str(name)[1:]) // PER_GROUP for name in names])


def learn(model: DNN, featurizer: Featurizer, events: list[RawEvent], size: int = 32) -> None:
    for start in range(0, len(events), size):
        model.learn(featurizer.batch(events[start : start + size]))


def test_the_device_decides_the_ranking() -> None:
    featurizer, model = Featurizer(time_features=False), DNN(seed=0)
    learn(model, featurizer, device_stream(4000))
    for device, group in (("ios", 0), ("android", 1)):
        groups = top_groups(model, featurizer, "u3", {"device": device})
        assert (groups == group).mean() >= 0.9, (device, groups)


def test_recent_items_move_the_ranking() -> None:
    """Users u0..u29 click group 0, the others group 1; then u0 clicks five group-1 items: its
    recent items pull its ranking to group 1, while u1's stays on group 0."""
    rng = np.random.default_rng(1)
    featurizer, model = Featurizer(time_features=False), DNN(seed=0)
    users = rng.integers(N_USERS, size=4000)
    learn(model, featurizer, [RawEvent(f"u{u}", f"i{(u >= N_USERS // 2) * PER_GROUP + rng.integers(PER_GROUP)}", "click",
                                       1.7e9 + e) for e, u in enumerate(users)])
    assert (top_groups(model, featurizer, "u0", {}) == 0).all()
    moved = [f"i{PER_GROUP + j}" for j in range(5)]
    learn(model, featurizer, [RawEvent("u0", item, "click", 1.8e9 + j) for j, item in enumerate(moved)], size=1)
    assert (top_groups(model, featurizer, "u0", {}) == 1).mean() >= 0.5
    assert (top_groups(model, featurizer, "u1", {}) == 0).all()
    window = model.export_state()["user_recent"][featurizer.users.get("u0")]  # items + 1, oldest first
    assert window[-5:].tolist() == [featurizer.items.get(item) + 1 for item in moved]
