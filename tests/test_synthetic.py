"""The synthetic stream: deterministic per seed, and its planted structure is measurably there."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import pytest

from producers.synthetic import EPOCH, SyntheticConfig, generate, make_world
from stream_app.core.errors import ConfigError
from stream_app.core.events import decode, encode

CONFIG = SyntheticConfig(n_users=400, n_items=300, n_clusters=6, initial_items=150, new_item_every=100)
N = 30_000


@pytest.fixture(scope="module")
def stream() -> list:
    return list(generate(CONFIG, N, seed=11))


@pytest.fixture(scope="module")
def world():
    return make_world(CONFIG, seed=11)


def test_same_seed_same_stream(stream: list) -> None:
    again = list(generate(CONFIG, N, seed=11))
    assert [encode(e) for e in again] == [encode(e) for e in stream]


def test_prefix_of_a_longer_stream_and_endless_stream(stream: list) -> None:
    assert list(generate(CONFIG, 500, seed=11)) == stream[:500]
    assert list(itertools.islice(generate(CONFIG, None, seed=11), 500)) == stream[:500]


def test_different_seeds_differ(stream: list) -> None:
    other = list(generate(CONFIG, 1000, seed=12))
    assert [(e.user_id, e.item_id) for e in other] != [(e.user_id, e.item_id) for e in stream[:1000]]
    assert make_world(CONFIG, 12).user_cluster != make_world(CONFIG, 11).user_cluster


def test_events_are_valid_time_ordered_and_unique(stream: list) -> None:
    assert stream[0].ts >= EPOCH and stream[0].ts < EPOCH + 60
    assert all(a.ts <= b.ts for a, b in zip(stream, stream[1:]))
    assert len({e.event_id for e in stream}) == N
    for e in stream[:2000]:
        assert decode(encode(e)) == e
        assert e.session_id and set(e.context) == {"device", "location"}


def test_users_concentrate_on_their_cluster(stream: list, world) -> None:
    clicks = [e for e in stream if e.event_type == "click"]
    own = sum(world.item_cluster[world.item_index(e.item_id)] == world.user_cluster[world.user_index(e.user_id)]
              for e in clicks) / len(clicks)
    chance = 1 / CONFIG.n_clusters
    assert own > CONFIG.p_user_cluster > 3 * chance, own


def test_transitions_followed_above_chance(stream: list, world) -> None:
    last: dict[str, int] = {}
    followed = pairs = chance = 0
    for e in stream:
        if e.event_type != "click":
            continue
        j = world.item_index(e.item_id)
        prev = last.get(e.session_id)
        if prev is not None:
            pairs += 1
            followed += j in world.successors[prev]
            cluster_size = len(world.cluster_items(world.item_cluster[prev]))
            chance += CONFIG.n_successors / cluster_size
        last[e.session_id] = j
    assert pairs > 10_000
    rate, chance_rate = followed / pairs, chance / pairs
    expected = (1 - CONFIG.p_review) * CONFIG.p_transition  # a re-view is no transition
    assert rate > 0.8 * expected and rate > 5 * chance_rate, (rate, chance_rate)


def test_clicks_re_view_the_session_items_at_the_planted_rate(stream: list) -> None:
    clicked: dict[str, set[str]] = defaultdict(set)
    later = again = 0  # clicks after a session's first, and those of an item the session clicked before
    for e in stream:
        if e.event_type != "click":
            continue
        if clicked[e.session_id]:
            later += 1
            again += e.item_id in clicked[e.session_id]
        clicked[e.session_id].add(e.item_id)
    # planted re-views, plus the few transitions and fresh picks that land on a session item by chance
    assert CONFIG.p_review <= again / later < CONFIG.p_review + 0.1, again / later


def test_device_shifts_the_item_distribution(stream: list, world) -> None:
    per_device: dict[str, Counter] = defaultdict(Counter)
    for e in stream:
        if e.event_type == "click":
            per_device[e.context["device"]][world.item_cluster[world.item_index(e.item_id)]] += 1
    assert set(per_device) == set(CONFIG.devices)
    for device, cluster in world.device_cluster.items():
        share_here = per_device[device][cluster] / sum(per_device[device].values())
        others = [d for d in CONFIG.devices if d != device]
        share_elsewhere = sum(per_device[d][cluster] for d in others) / sum(
            sum(per_device[d].values()) for d in others)
        assert share_here > share_elsewhere + 0.1, (device, share_here, share_elsewhere)


def test_location_has_no_planted_effect_but_is_per_user(stream: list, world) -> None:
    for e in stream[:2000]:
        assert e.context["location"] == world.user_location[world.user_index(e.user_id)]


def test_funnel_ratios_near_config(stream: list, world) -> None:
    kinds = Counter(e.event_type for e in stream)
    assert kinds["favorite"] / kinds["click"] == pytest.approx(CONFIG.p_favorite, abs=0.02)
    assert kinds["purchase"] / kinds["favorite"] == pytest.approx(CONFIG.p_purchase_given_favorite, abs=0.03)
    # Each favorite follows a click of the same item in its session; purchases carry the price.
    clicked: set[tuple[str, str]] = set()
    for e in stream:
        if e.event_type == "click":
            clicked.add((e.session_id, e.item_id))
        else:
            assert (e.session_id, e.item_id) in clicked
        if e.event_type == "purchase":
            assert e.value == world.item_price[world.item_index(e.item_id)]
        else:
            assert e.value is None


def test_new_items_appear_over_time(stream: list, world) -> None:
    first_seen: dict[int, int] = {}
    for n, e in enumerate(stream):
        first_seen.setdefault(world.item_index(e.item_id), n)
    assert all(n >= world.item_birth[j] for j, n in first_seen.items())  # never before birth
    late = [j for j in first_seen if world.item_birth[j] > 0]
    assert len(late) > 100  # born during the stream, and drawn
    quarters = [len({e.item_id for e in stream[: N * q // 4]}) for q in (1, 2, 3, 4)]
    born_by_first_quarter = sum(b <= N // 4 for b in world.item_birth)
    assert quarters == sorted(quarters) and quarters[0] <= born_by_first_quarter < quarters[-1], quarters
    assert quarters[-1] - quarters[0] > 50, quarters
    assert all(world.item_index(e.item_id) < CONFIG.initial_items for e in stream[:100])


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="p_user_cluster"):
        SyntheticConfig(p_user_cluster=0.9, p_device_cluster=0.2)
    with pytest.raises(ConfigError, match="initial_items"):
        SyntheticConfig(n_items=10, initial_items=20)
    with pytest.raises(ConfigError, match="n_events"):
        list(generate(CONFIG, -1, 0))
