"""A seeded synthetic event stream with planted, checkable structure.

    config = SyntheticConfig(n_users=500, n_items=300)
    for event in generate(config, n_events=10_000, seed=7): ...
    truth = make_world(config, seed=7)     # the structure the stream was drawn from

The same (config, n_events, seed) gives the identical stream, event ids and
timestamps included (`event_id` = `syn<seed>-<index>`, `ts` starts at
`config.start_ts`, a fixed epoch, and never decreases). A prefix of a longer
stream equals the shorter stream: `n_events` only says where to stop
(`None` = never).

What is planted (all of it in `World`):

* **Taste clusters.** Every user belongs to one of `n_clusters` clusters and
  every item to one. A fresh pick (the first item of a session, or a step that
  does not follow a transition) takes an item of the user's cluster with
  probability `p_user_cluster`, of the session device's cluster with
  `p_device_cluster`, else of a uniformly random cluster; inside a cluster,
  items are drawn by a fixed popularity weight (Pareto) among the items that
  exist already.
* **Sessions.** `concurrent_sessions` sessions run interleaved; each belongs
  to one user, has a `session_id`, one device and a geometric number of clicks
  (mean `session_clicks_mean`). After a click on item j, the next click follows
  j's transition row (`World.successors[j]`, `n_successors` items of j's
  cluster with weights `successor_weights`) with probability `p_transition`.
* **Context.** `context = {"device": ..., "location": ...}`. A user has a main
  device (used by a session with probability `p_main_device`, else a random
  one) and a fixed location. Each device prefers its own item cluster
  (`World.device_cluster`), see the fresh pick. Location has no planted effect:
  a control a context-aware model should learn to ignore.
* **Re-views.** A click re-views an item the session already clicked (one of
  them, uniformly) with probability `p_review`, as real clickstreams do (a
  fifth or so of their events); it is then no fresh pick and no transition.
* **Funnel.** Every click may be followed in the same session by a
  `favorite` of the same item (probability `p_favorite`) and a favorite by a
  `purchase` (probability `p_purchase_given_favorite`). Purchases carry
  `value` = the item's price.
* **New items.** The first `initial_items` items exist from the start; then
  one more appears every `new_item_every` events (`World.item_birth[j]` is the
  event index from which item j can be drawn), until all `n_items` exist.
* **Time.** Gaps between events are exponential with mean `mean_gap_s`
  seconds (`ts` rounded to milliseconds). A click's funnel events are queued
  in its session and come at that session's next turns, before its next
  click.

Ids: users `u<index>`, items `i<index>`, sessions `s<seed>-<number>`;
`World.user_index` / `World.item_index` map them back.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from stream_app.core.errors import ConfigError
from stream_app.core.events import Event

__all__ = ["SyntheticConfig", "World", "make_world", "generate", "EPOCH"]

EPOCH = 1_700_000_000.0  # 2023-11-14T22:13:20Z, the default start of every synthetic stream


@dataclass(frozen=True)
class SyntheticConfig:
    """The knobs of the synthetic stream; see the module doc for what each one plants."""

    n_users: int = 2000
    n_items: int = 1000
    n_clusters: int = 10
    p_user_cluster: float = 0.6
    p_device_cluster: float = 0.25
    devices: tuple[str, ...] = ("ios", "android", "web")
    p_main_device: float = 0.8
    locations: tuple[str, ...] = ("us", "gb", "de", "fr", "in", "br", "jp")
    concurrent_sessions: int = 64
    session_clicks_mean: float = 6.0
    p_transition: float = 0.6
    n_successors: int = 3
    successor_weights: tuple[float, ...] = (0.6, 0.3, 0.1)
    p_review: float = 0.2
    p_favorite: float = 0.2
    p_purchase_given_favorite: float = 0.3
    initial_items: int = 600
    new_item_every: int = 100
    item_popularity_alpha: float = 1.5
    user_activity_alpha: float = 2.0
    mean_gap_s: float = 2.0
    start_ts: float = EPOCH

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"synthetic config: {what}")

        need(self.n_users >= 1 and self.n_items >= 1, "n_users and n_items must be at least 1")
        need(1 <= self.n_clusters <= self.n_items, "n_clusters must be between 1 and n_items")
        need(self.n_clusters <= self.initial_items <= self.n_items,
             "initial_items must be between n_clusters and n_items (every cluster starts with an item)")
        for name in ("p_user_cluster", "p_device_cluster", "p_main_device", "p_transition", "p_review", "p_favorite",
                     "p_purchase_given_favorite"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name} must be a probability in [0, 1]")
        need(self.p_user_cluster + self.p_device_cluster <= 1.0, "p_user_cluster + p_device_cluster must be <= 1")
        need(len(self.devices) >= 1 and len(self.locations) >= 1, "devices and locations must not be empty")
        need(1 <= self.concurrent_sessions <= self.n_users, "concurrent_sessions must be between 1 and n_users")
        need(self.session_clicks_mean >= 1.0, "session_clicks_mean must be at least 1")
        need(self.n_successors >= 1 and len(self.successor_weights) == self.n_successors
             and all(w > 0 for w in self.successor_weights),
             "successor_weights must hold n_successors positive weights")
        need(self.new_item_every >= 1, "new_item_every must be at least 1")
        need(self.mean_gap_s >= 0 and math.isfinite(self.start_ts), "mean_gap_s must be >= 0, start_ts finite")
        need(self.item_popularity_alpha > 0 and self.user_activity_alpha > 0, "the Pareto alphas must be > 0")


@dataclass(frozen=True)
class World:
    """The ground truth a synthetic stream is drawn from (indexes, not ids)."""

    config: SyntheticConfig
    seed: int
    user_cluster: tuple[int, ...]  # [n_users]
    user_device: tuple[str, ...]  # main device of each user
    user_location: tuple[str, ...]
    user_activity: tuple[float, ...]  # relative rate of starting sessions
    item_cluster: tuple[int, ...]  # [n_items]
    item_birth: tuple[int, ...]  # event index from which the item exists
    item_popularity: tuple[float, ...]  # weight inside its cluster
    item_price: tuple[float, ...]
    successors: tuple[tuple[int, ...], ...]  # [n_items][n_successors], same cluster as the item
    device_cluster: dict[str, int]  # the item cluster each device prefers

    def user_id(self, u: int) -> str:
        return f"u{u}"

    def item_id(self, j: int) -> str:
        return f"i{j}"

    def user_index(self, user_id: str) -> int:
        return int(user_id[1:])

    def item_index(self, item_id: str) -> int:
        return int(item_id[1:])

    def cluster_items(self, c: int) -> list[int]:
        """The items of cluster c, in order of appearance."""
        return [j for j in range(len(self.item_cluster)) if self.item_cluster[j] == c]


def make_world(config: SyntheticConfig, seed: int) -> World:
    """The planted structure for (config, seed); `generate` draws from exactly this."""
    rng = random.Random(f"streamrec-synthetic-world:{seed}")
    c = config.n_clusters
    # The first n_clusters items cover every cluster, so each cluster has an item from the start.
    first = list(range(c))
    rng.shuffle(first)
    rest = [j % c for j in range(config.n_items - c)]
    rng.shuffle(rest)
    item_cluster = tuple(first + rest)
    item_birth = tuple(
        0 if j < config.initial_items else (j - config.initial_items + 1) * config.new_item_every
        for j in range(config.n_items)
    )
    members: list[list[int]] = [[] for _ in range(c)]
    for j, cl in enumerate(item_cluster):
        members[cl].append(j)
    successors = []
    for j in range(config.n_items):
        pool = [x for x in members[item_cluster[j]] if x != j] or [j]
        k = config.n_successors
        successors.append(tuple(rng.sample(pool, k) if len(pool) >= k else [rng.choice(pool) for _ in range(k)]))
    if len(config.devices) <= c:
        dev_clusters = rng.sample(range(c), len(config.devices))
    else:
        dev_clusters = [rng.randrange(c) for _ in config.devices]
    return World(
        config=config,
        seed=seed,
        user_cluster=tuple(rng.randrange(c) for _ in range(config.n_users)),
        user_device=tuple(rng.choice(config.devices) for _ in range(config.n_users)),
        user_location=tuple(rng.choice(config.locations) for _ in range(config.n_users)),
        user_activity=tuple(rng.paretovariate(config.user_activity_alpha) for _ in range(config.n_users)),
        item_cluster=item_cluster,
        item_birth=item_birth,
        item_popularity=tuple(rng.paretovariate(config.item_popularity_alpha) for _ in range(config.n_items)),
        item_price=tuple(round(rng.lognormvariate(3.0, 0.8), 2) for _ in range(config.n_items)),
        successors=tuple(successors),
        device_cluster=dict(zip(config.devices, dev_clusters)),
    )


@dataclass
class _Session:
    sid: str
    user: int
    device: str
    clicks_left: int
    last_item: int = -1
    pending: deque = field(default_factory=deque)  # funnel events waiting for this session's next turns
    clicked: list[int] = field(default_factory=list)  # items clicked so far, first click first


class _Sampler:
    """Draws items of a cluster by popularity among the items born so far."""

    def __init__(self, world: World) -> None:
        c = world.config.n_clusters
        self.items: list[list[int]] = [[] for _ in range(c)]
        self.births: list[list[int]] = [[] for _ in range(c)]
        self.cum: list[list[float]] = [[] for _ in range(c)]
        for j in range(len(world.item_cluster)):  # ascending j = ascending birth
            cl = world.item_cluster[j]
            self.items[cl].append(j)
            self.births[cl].append(world.item_birth[j])
            total = (self.cum[cl][-1] if self.cum[cl] else 0.0) + world.item_popularity[j]
            self.cum[cl].append(total)

    def draw(self, rng: random.Random, cluster: int, now: int) -> int:
        n = bisect.bisect_right(self.births[cluster], now)  # items born at or before event `now`
        cum = self.cum[cluster]
        return self.items[cluster][bisect.bisect_right(cum, rng.random() * cum[n - 1], 0, n - 1)]


def generate(config: SyntheticConfig, n_events: int | None, seed: int, world: World | None = None) -> Iterator[Event]:
    """`n_events` events (None: endless) of the stream for (config, seed); see the module doc."""
    if n_events is not None and n_events < 0:
        raise ConfigError(f"n_events must be >= 0 (got {n_events})")
    world = world if world is not None else make_world(config, seed)
    rng = random.Random(f"streamrec-synthetic-stream:{seed}")
    sampler = _Sampler(world)
    n_clusters = config.n_clusters
    user_cum = list(itertools.accumulate(world.user_activity))
    p_end = 1.0 / config.session_clicks_mean  # geometric session length with this mean
    succ_cum = list(itertools.accumulate(config.successor_weights))
    active_users: set[int] = set()
    session_numbers = itertools.count()

    def new_session() -> _Session:
        for _ in range(100):  # one session per user at a time, as far as the activity draw allows
            u = bisect.bisect_right(user_cum, rng.random() * user_cum[-1])
            u = min(u, config.n_users - 1)
            if u not in active_users:
                break
        active_users.add(u)
        device = world.user_device[u] if rng.random() < config.p_main_device else rng.choice(config.devices)
        clicks = 1
        while rng.random() > p_end:
            clicks += 1
        return _Session(f"s{seed}-{next(session_numbers)}", u, device, clicks, pending=deque())

    def fresh_item(s: _Session, index: int) -> int:
        r = rng.random()
        if r < config.p_user_cluster:
            cluster = world.user_cluster[s.user]
        elif r < config.p_user_cluster + config.p_device_cluster:
            cluster = world.device_cluster[s.device]
        else:
            cluster = rng.randrange(n_clusters)
        return sampler.draw(rng, cluster, index)

    sessions = [new_session() for _ in range(config.concurrent_sessions)]
    ts = config.start_ts
    index = 0
    while n_events is None or index < n_events:
        slot = rng.randrange(len(sessions))
        s = sessions[slot]
        if s.pending:
            event_type, item, value = s.pending.popleft()
        else:
            item = -1
            if s.clicked and config.p_review > 0 and rng.random() < config.p_review:
                item = s.clicked[rng.randrange(len(s.clicked))]
            elif s.last_item >= 0 and rng.random() < config.p_transition:
                nxt = world.successors[s.last_item][bisect.bisect_right(succ_cum, rng.random() * succ_cum[-1])]
                if world.item_birth[nxt] <= index:
                    item = nxt
            if item < 0:
                item = fresh_item(s, index)
            event_type, value = "click", None
            if item not in s.clicked:
                s.clicked.append(item)
            s.last_item = item
            s.clicks_left -= 1
            if rng.random() < config.p_favorite:
                s.pending.append(("favorite", item, None))
                if rng.random() < config.p_purchase_given_favorite:
                    s.pending.append(("purchase", item, world.item_price[item]))
        if config.mean_gap_s > 0:
            ts += rng.expovariate(1.0 / config.mean_gap_s)
        u = s.user
        yield Event(
            event_id=f"syn{seed}-{index}",
            user_id=f"u{u}",
            item_id=f"i{item}",
            event_type=event_type,
            ts=round(ts, 3),
            session_id=s.sid,
            value=value,
            context={"device": s.device, "location": world.user_location[u]},
        )
        index += 1
        if s.clicks_left <= 0 and not s.pending:
            active_users.discard(u)
            sessions[slot] = new_session()
