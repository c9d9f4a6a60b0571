"""The lookup API's answers, computed from the model cache (no HTTP in here).

A user's state lives in the shard (Kafka partition) its user_id hashes to, so a
user lookup reads her rows there (one Redis round trip) and ranks with that shard's
view; a session is looked for in the shard it was last found in, then in all the others at once
(the request does not name its user); similar items in every view.
Unknown users, sessions and items get context-aware popularity, never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from models.base import Batch, Model
from models.blend import Blend, Features
from models.features import session_key
from models.registry import create
from stream_app.io.redis import QueryRows
from stream_app.serving.cache import ModelCache
from stream_app.serving.params import ApiError
from stream_app.serving.reasons import popular, session_history, similar_to_history, with_blend
from stream_app.serving.scorers import top_k
from stream_app.serving.view import ShardView, query_batch

# An answer candidate: (item id, score, reason).
Candidate = tuple[str, float, dict]
# A lookup ranked: (top-k rows best first, their scores, for a blend its weights and features).
Ranked = tuple[np.ndarray, np.ndarray, tuple[np.ndarray, Features] | None]
SESSION_PARTITIONS = 32_768  # sessions whose shard a server remembers (least recently found forgotten first)


@dataclass
class _Lookup:
    """One lookup between reading its rows and answering: what `Recommender._ranked` ranks (the model
    narrowed to the lookup's rows, its one-row query), the answer's fields besides its items (`head`)
    and how its items are made from that ranking (`items`)."""

    view: ShardView
    used: str  # the model that answers (the requested one, or the shard's popularity)
    model: Model | None  # None: the shard has no model to answer with
    batch: Batch | None
    k: int
    exclude: np.ndarray | None
    head: dict
    items: Callable[[Ranked], list[dict]]
    key: tuple | None = None  # a query of nobody: its items' key in the view's memo (`ShardView.remember`)
    answered: list[dict] | None = None  # the items the view remembered for it (then it is not ranked)

    @property
    def scored_together(self) -> bool:
        """Whether its model scores every item with `model.score` here (no prepared scorer, or a blend):
        what lookups waiting together share (`Recommender._ranked`)."""
        return self.model is not None and (isinstance(self.model, Blend) or self.view.scorers.get(self.used) is None)

    def query(self) -> tuple[Model, Batch]:
        assert self.model is not None and self.batch is not None, "a lookup without a model is not ranked"
        return self.model, self.batch

    def rank(self, raw: np.ndarray | None = None, explained: tuple[np.ndarray, Features] | None = None) -> Ranked:
        """`view.rank` (from `raw`, its model's scores of every item, when given) and `explained`."""
        model, batch = self.query()
        return (*self.view.rank(self.used, model, batch, self.k, self.exclude, raw=raw), explained)

    def fresh(self, ranked: Ranked) -> list[dict]:
        """Its items made from `ranked`, which the view remembers for a query of nobody."""
        items = self.items(ranked)
        if self.key is not None:
            self.view.remember(self.key, items)
        return items


class _Together:
    """Runs `run` once over the lookups that wait together. A lookup submitted waits for those still on
    their way (`coming`: reading their rows from Redis), at most `wait` seconds; then up to `most` of
    them share one call, and their answers go out before the next `most` are run (in a burst, the first
    lookups do not wait for the last)."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], wait: float = 0.001, most: int = 4):
        self._run = run
        self._wait = wait
        self._most = most
        self._coming = 0
        self._waiting: list[tuple[Any, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._soon = False

    @contextlib.contextmanager
    def coming(self) -> Iterator[None]:
        """A lookup on its way to `submit` (or to failing): a flush waits for it."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1
            self._schedule()

    async def submit(self, item: Any) -> Any:
        """`run`'s result for `item` (an exception it gave for `item` is raised here)."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if not self._waiting or self._soon:
            return
        loop = asyncio.get_running_loop()
        if self._coming == 0:  # nobody else on the way: as soon as the loop has run what is ready
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._soon = True
            loop.call_soon(self._flush)
        elif self._timer is None:
            self._timer = loop.call_later(self._wait, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._soon = None, False
        waiting, self._waiting = self._waiting[: self._most], self._waiting[self._most :]
        try:
            results = self._run([item for item, _ in waiting])
        except Exception as exc:  # noqa: BLE001 - `run` answers each item; should it fail whole, no caller hangs
            results = [exc] * len(waiting)
        for (_, future), result in zip(waiting, results):
            if future.cancelled():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        if self._waiting:  # after the answers just given (their tasks were queued first)
            self._soon = True
            asyncio.get_running_loop().call_soon(self._flush)


def _attempt(fn: Callable[[], Any]) -> Any:
    """fn(), or the exception it raised (for `_ranked`, which answers each lookup on its own)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - handed to the one lookup it belongs to
        return exc


def _result(ranked: Any) -> Any:
    if isinstance(ranked, Exception):
        raise ranked
    return ranked


def _nobody_key(kind: str, used: str, k: int, context: dict[str, str], batch: Batch) -> tuple:
    """What the answer to a query of nobody (no user, session or history the shard knows) depends on
    besides the view: the model, k, the request's context (its reasons echo it) and the context values
    the query was made of (time-of-day ones included). Scoring reads no clock beyond those."""
    return kind, used, k, tuple(sorted(context.items())), batch.context[0].tobytes()


def _items(view: ShardView, idx: np.ndarray, scores: np.ndarray, reasons: list[dict]) -> list[dict]:
    names = view.item_names
    return [{"item_id": names[i], "score": s, "reason": r} for i, s, r in zip(idx.tolist(), scores.tolist(), reasons)]


class Recommender:
    """The endpoints' logic over a `ModelCache`."""

    def __init__(self, cache: ModelCache):
        self.cache = cache
        self.models = cache.model_names
        self.query_kind = {name: type(create(name)).query for name in self.models}
        self._session_partition: OrderedDict[str, int] = OrderedDict()
        self._together = _Together(self._ranked)

    def model(self, requested: str | None, query: str) -> str:
        """The model to answer with: `requested`, else the first served one ranking for `query` (user/session)."""
        if requested is None:
            matching = [n for n in self.models if self.query_kind[n] == query]
            return (matching or list(self.models))[0]
        if requested not in self.models:
            raise ApiError(400, f"unknown model {requested!r}; this server serves: {', '.join(self.models)}",
                           models=list(self.models))
        return requested

    # ---- /recommendations

    async def user_rows(self, user_id: str) -> QueryRows:
        """A user's own rows (and her open session's), read without holding the event loop."""
        return await self.cache.aquery(self.cache.partition_of_user(user_id), user_id)

    async def session_rows(self, session_id: str) -> tuple[int, QueryRows] | None:
        """(partition, rows) of a session, None when no partition knows it. The request does not name its
        user, whose partition holds the session: the partition it was found in last is asked first (one
        round trip for a live session's later lookups), then every other one at once (one more round trip
        however many partitions there are), the lowest that knows it winning."""
        key = session_key(session_id)
        last = self._session_partition.get(session_id)
        if last is not None:
            rows = await self.cache.aquery(last, None, key)
            if rows.session >= 0:
                return self._found(session_id, last, rows)
        others = [p for p in range(self.cache.partitions) if p != last]
        for partition, rows in zip(others, await asyncio.gather(*(self.cache.aquery(p, None, key) for p in others))):
            if rows.session >= 0:
                return self._found(session_id, partition, rows)
        self._session_partition.pop(session_id, None)
        return None

    def _found(self, session_id: str, partition: int, rows: QueryRows) -> tuple[int, QueryRows]:
        """Remember the partition a session was found in (the most recent `SESSION_PARTITIONS` sessions)."""
        self._session_partition[session_id] = partition
        self._session_partition.move_to_end(session_id)
        if len(self._session_partition) > SESSION_PARTITIONS:
            self._session_partition.popitem(last=False)
        return partition, rows

    def for_user(self, user_id: str, k: int, model: str, context: dict[str, str], include_seen: bool,
                 rows: QueryRows | None = None) -> dict:
        """Top-k for a user in context, leaving out her recent items unless `include_seen`. Her own rows
        (and her open session's) as `user_rows` read them (read here when not given); the items' state
        comes from the shard's view."""
        lookup = self._user_lookup(user_id, k, model, context, include_seen, rows)
        return self._answer_now(lookup)

    async def answer_user(self, user_id: str, k: int, model: str, context: dict[str, str], include_seen: bool) -> dict:
        """`for_user` from her rows read now (`user_rows`), ranked together with the lookups that wait with it."""
        with self._together.coming():
            lookup = self._user_lookup(user_id, k, model, context, include_seen, await self.user_rows(user_id))
        return await self._answer_soon(lookup)

    def for_session(self, session_id: str, k: int, model: str, context: dict[str, str],
                    found: tuple[int, QueryRows] | None) -> dict:
        """Top-k next items for a session (popularity in context for an unknown session or a user model),
        from its rows as `session_rows` found them (None: no partition knows it)."""
        lookup = self._session_lookup(session_id, k, model, context, found)
        return self._answer_now(lookup)

    async def answer_session(self, session_id: str, k: int, model: str, context: dict[str, str]) -> dict:
        """`for_session` from its rows found now (`session_rows`), ranked together with the lookups that
        wait with it."""
        with self._together.coming():
            lookup = self._session_lookup(session_id, k, model, context, await self.session_rows(session_id))
        return await self._answer_soon(lookup)

    def _answer_now(self, lookup: _Lookup) -> dict:
        """The lookup's answer, ranked alone unless the view remembers it."""
        items = lookup.answered if lookup.answered is not None else lookup.fresh(self._rank_now(lookup))
        return {**lookup.head, "items": items}

    async def _answer_soon(self, lookup: _Lookup) -> dict:
        """The lookup's answer, ranked with those that wait with it unless the view remembers it."""
        items = lookup.answered if lookup.answered is not None else lookup.fresh(await self._rank_soon(lookup))
        return {**lookup.head, "items": items}

    async def _rank_soon(self, lookup: _Lookup) -> Ranked:
        """The lookup ranked, together with those that wait with it when its model scores every item."""
        if lookup.scored_together:
            return await self._together.submit(lookup)
        return self._rank_now(lookup)

    def _rank_now(self, lookup: _Lookup) -> Ranked:
        """The lookup ranked alone (its failure raised here)."""
        return _result(self._ranked([lookup])[0])

    def _user_lookup(self, user_id: str, k: int, model: str, context: dict[str, str], include_seen: bool,
                     rows: QueryRows | None) -> _Lookup:
        partition = self.cache.partition_of_user(user_id)
        view = self.cache.shard(partition)
        rows = rows or self.cache.query(partition, user_id)
        history = rows.history if rows.history is not None and len(rows.history) else None
        used, m = self._pick(view, model)
        head = {"user_id": user_id, "model": model, "model_version": view.version, "partition": partition}
        if m is None:
            return _Lookup(view, used, None, None, k, None, head, lambda ranked: [])
        batch = query_batch(view, context, time.time(), rows)
        exclude = history[:, 0] if history is not None and not include_seen else None
        nobody = rows.user < 0 and rows.session < 0 and history is None
        key = _nobody_key("user", used, k, context, batch) if nobody else None
        answered = view.remembered(key)
        if answered is None:  # to be ranked: the model narrowed to the query's rows
            m = m.narrowed(rows.models.get(used, {}))
        narrowed = m

        def items(ranked: Ranked) -> list[dict]:
            idx, scores, explained = ranked
            reasons = (similar_to_history(view, used, idx, history, context) if history is not None
                       else [popular(context)] * len(idx))
            return _items(view, idx, scores, with_blend(narrowed, explained, idx, reasons))

        return _Lookup(view, used, m, batch, k, exclude, head, items, key, answered)

    def _session_lookup(self, session_id: str, k: int, model: str, context: dict[str, str],
                        found: tuple[int, QueryRows] | None) -> _Lookup:
        views = self.cache.views()
        rows = found[1] if found is not None else None
        view = (self.cache.shard(found[0]) if found is not None
                else max(views, key=lambda v: (int(v.valid_items.sum()), -v.partition)))
        used, m = self._pick(view, model)
        head = {"user_id": None, "session_id": session_id, "model": model, "model_version": view.version,
                "partition": view.partition}
        if m is None:
            return _Lookup(view, used, None, None, k, None, head, lambda ranked: [])
        exclude, key = None, None
        if m.query == "session" and rows is not None:
            m = m.narrowed(rows.models.get(used, {}))
            batch = query_batch(view, context, time.time(), rows)
            reason: dict = {"kind": "session", "session_id": session_id}
            exclude = m.session_items(0)  # next items: not the ones already in it
        else:  # a user model (or an unknown session): what is popular in this context
            batch = query_batch(view, context, time.time())
            reason = popular(context)
            if m.query != "session":
                reason["note"] = f"{used} ranks for users, not sessions; answered by popularity in context"
            key = _nobody_key("session", used, k, context, batch)
        narrowed = m

        def items(ranked: Ranked) -> list[dict]:
            idx, scores, explained = ranked
            if exclude is not None and len(exclude):  # the session item closest to each answer
                reasons = [{**r, "kind": "session", "session_id": session_id} if r["kind"] == "similar_to" else r
                           for r in similar_to_history(view, used, idx, session_history(exclude), context)]
            else:
                reasons = [reason] * len(idx)
            return _items(view, idx, scores, with_blend(narrowed, explained, idx, reasons))

        return _Lookup(view, used, m, batch, k, exclude, head, items, key, view.remembered(key))

    @staticmethod
    def _ranked(lookups: list[_Lookup]) -> list[Ranked | Exception]:
        """`view.rank` of each lookup, and for a blend the weights and features its reasons are made of.
        Lookups of one view's model that `view.rank` would score with `model.score` (no prepared scorer),
        and blends, are scored together: `Model.score_each` and `Blend.explain_each` read each member's
        item rows once for all of them. A group that fails is ranked again lookup by lookup, so that one
        bad query fails alone."""
        out: list[Ranked | Exception | None] = [None] * len(lookups)
        together: dict[tuple[int, str], list[int]] = {}
        for i, lk in enumerate(lookups):
            if lk.model is None:
                out[i] = (np.zeros(0, np.int64), np.zeros(0), None)
            elif lk.scored_together:
                together.setdefault((id(lk.view), lk.used), []).append(i)
            else:
                out[i] = _attempt(lk.rank)
        for group in together.values():
            ranked = _attempt(functools.partial(Recommender._scored, [lookups[i] for i in group]))
            if isinstance(ranked, Exception) and len(group) > 1:
                for i in group:
                    one = _attempt(functools.partial(Recommender._scored, [lookups[i]]))
                    out[i] = one if isinstance(one, Exception) else one[0]
            else:
                for j, i in enumerate(group):
                    out[i] = ranked if isinstance(ranked, Exception) else ranked[j]
        return out  # type: ignore[return-value]

    @staticmethod
    def _scored(lookups: list[_Lookup]) -> list[Ranked]:
        """Lookups of one view's model, scored together (see `_ranked`), then ranked one by one."""
        queries = [lk.query() for lk in lookups]
        first = queries[0][0]
        if isinstance(first, Blend):
            explained = Blend.explain_each([(cast(Blend, m), b) for m, b in queries])
            return [lk.rank(raw, (w, z)) for lk, (raw, w, z) in zip(lookups, explained)]
        return [lk.rank(raw) for lk, raw in zip(lookups, type(first).score_each(queries))]

    @staticmethod
    def _pick(view: ShardView, model: str) -> tuple[str, Model | None]:
        """The requested model of this shard, else its popularity model (a shard without the model's state yet)."""
        if model in view.models:
            return model, view.models[model]
        fallback = view.popularity_model()
        if fallback is not None:
            return fallback, view.models[fallback]
        return model, None

    # ---- /items/{id}/similar

    def similar(self, item_id: str, k: int, model: str | None) -> dict:
        """Items like `item_id`, best over every shard that knows it (popular items when none does)."""
        merged: dict[str, tuple[float, dict]] = {}
        versions: dict[str, int] = {}
        used: set[str] = set()
        found = False
        for view in self.cache.views():
            versions[str(view.partition)] = view.version
            row = view.featurizer.items.get(item_id)
            if row < 0 or row >= view.n_items:
                continue
            found = True
            source, candidates = self._similar_in(view, row, item_id, k, model)
            used.add(source)
            for name, score, reason in candidates:
                if name not in merged or score > merged[name][0]:
                    merged[name] = (score, reason)
        if not found:  # unknown item: popular overall
            self._popular_everywhere(k, model, merged)
            used.add("popularity")
        best = sorted(merged.items(), key=lambda kv: -kv[1][0])[:k]
        return {"item_id": item_id, "known": found, "model": ",".join(sorted(used)), "model_version": versions,
                "items": [{"item_id": n, "score": _num(s), "reason": r} for n, (s, r) in best]}

    def _similar_in(self, view: ShardView, row: int, item_id: str, k: int, model: str | None
                    ) -> tuple[str, list[Candidate]]:
        """(what answered, candidates) in one shard: similarity vectors when a model has them, else
        co-occurrence with the item's own contexts' popularity breaking ties."""
        vm = view.vector_model(model)
        if vm is not None:
            reason = {"kind": "embedding", "model": vm, "item_id": item_id}
            rows, sims = view.similar_rows(vm, row, k)
            return vm, [(view.item_names[i], sim, reason) for i, sim in zip(rows.tolist(), sims.tolist())]
        co = view.cooccurrence().similar(row)
        ctx_scores, ctx = self._context_popularity(view, row)
        scores = co + 1e-3 * ctx_scores / max(float(ctx_scores.max(initial=0.0)), 1e-12)
        scores[~view.valid_items] = -np.inf
        scores[row] = -np.inf
        out = []
        for i in top_k(scores, k):
            reason = {"kind": "co_occurrence", "item_id": item_id} if co[i] > 0 else popular(ctx)
            out.append((view.item_names[i], float(scores[i]), reason))
        return "co_occurrence", out

    def _popular_everywhere(self, k: int, model: str | None, merged: dict[str, tuple[float, dict]]) -> None:
        """Add each shard's top-k without context to `merged`, scores summed over shards."""
        for view in self.cache.views():
            used_name, m = self._pick(view, model or self.models[0])
            if m is None:
                continue
            rows, scores = view.rank(used_name, m, query_batch(view, {}, time.time()), k)
            for i, score in zip(rows.tolist(), scores.tolist()):
                name = view.item_names[i]
                old = merged.get(name, (0.0, None))[0]
                merged[name] = (old + score, popular({}))

    @staticmethod
    def _context_popularity(view: ShardView, row: int) -> tuple[np.ndarray, dict[str, str]]:
        """Popularity in the item's own top contexts (from the popularity model's per-context counts)."""
        scorer = view.popularity_scorer()
        if scorer is None or row >= len(scorer.ctx_count):
            return np.zeros(view.n_items), {}
        profile = scorer.ctx_count[row]
        cols = [int(c) for c in np.argsort(-profile)[:3] if profile[c] > 0]
        context: dict[str, str] = {}
        for c in cols:
            pair = view.featurizer.event_context(c)
            if pair is not None:
                context.setdefault(*pair)
        batch = query_batch(view, context, time.time())
        return np.nan_to_num(scorer.scores(batch).astype(np.float64), neginf=0.0), context


def _num(x: float) -> float | None:
    """A JSON-safe score: None for a non-finite one."""
    x = float(x)
    return x if math.isfinite(x) else None
