"""The lookup API's answers, computed from the model cache (no HTTP in here).

A user's state lives in the shard (Kafka partition) its user_id hashes to, so a
user lookup reads her rows there (one Redis round trip) and ranks with that shard's
view; a session is looked for in the shard it was last found in, then in the others in turn
(the request does not name its user); similar items in every view.
Unknown users, sessions and items get context-aware popularity, never an error.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

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
SESSION_PARTITIONS = 32_768  # sessions whose shard a server remembers (least recently found forgotten first)


class Recommender:
    """The endpoints' logic over a `ModelCache`."""

    def __init__(self, cache: ModelCache):
        self.cache = cache
        self.models = cache.model_names
        self.query_kind = {name: type(create(name)).query for name in self.models}
        self._session_partition: OrderedDict[str, int] = OrderedDict()

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
        user, whose partition holds the session: the partition it was found in last comes first (one round
        trip for a live session's later lookups), then the others in turn."""
        last = self._session_partition.get(session_id)
        for partition in ([last] if last is not None else []) + [p for p in range(self.cache.partitions) if p != last]:
            rows = await self.cache.aquery(partition, None, session_key(session_id))
            if rows.session >= 0:
                self._session_partition[session_id] = partition
                self._session_partition.move_to_end(session_id)
                if len(self._session_partition) > SESSION_PARTITIONS:
                    self._session_partition.popitem(last=False)
                return partition, rows
        self._session_partition.pop(session_id, None)
        return None

    def for_user(self, user_id: str, k: int, model: str, context: dict[str, str], include_seen: bool,
                 rows: QueryRows | None = None) -> dict:
        """Top-k for a user in context, leaving out her recent items unless `include_seen`. Her own rows
        (and her open session's) as `user_rows` read them (read here when not given); the items' state
        comes from the shard's view."""
        partition = self.cache.partition_of_user(user_id)
        view = self.cache.shard(partition)
        rows = rows or self.cache.query(partition, user_id)
        history = rows.history if rows.history is not None and len(rows.history) else None
        used, m = self._pick(view, model)
        items: list[dict] = []
        if m is not None:
            m = m.narrowed(rows.models.get(used, {}))
            batch = query_batch(view, context, time.time(), rows)
            exclude = history[:, 0] if history is not None and not include_seen else None
            idx, scores, explained = self._rank(view, used, m, batch, k, exclude)
            reasons = (similar_to_history(view, used, idx, history, context) if history is not None
                       else [popular(context)] * len(idx))
            reasons = with_blend(m, explained, idx, reasons)
            names = view.item_names
            items = [{"item_id": names[i], "score": s, "reason": r}
                     for i, s, r in zip(idx.tolist(), scores.tolist(), reasons)]
        return {"user_id": user_id, "model": model, "model_version": view.version, "partition": partition,
                "items": items}

    def for_session(self, session_id: str, k: int, model: str, context: dict[str, str],
                    found: tuple[int, QueryRows] | None) -> dict:
        """Top-k next items for a session (popularity in context for an unknown session or a user model),
        from its rows as `session_rows` found them (None: no partition knows it)."""
        views = self.cache.views()
        rows = found[1] if found is not None else None
        view = (self.cache.shard(found[0]) if found is not None
                else max(views, key=lambda v: (int(v.valid_items.sum()), -v.partition)))
        used, m = self._pick(view, model)
        items: list[dict] = []
        if m is not None:
            exclude = None
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
            idx, scores, explained = self._rank(view, used, m, batch, k, exclude)
            if exclude is not None and len(exclude):  # the session item closest to each answer
                reasons = [{**r, "kind": "session", "session_id": session_id} if r["kind"] == "similar_to" else r
                           for r in similar_to_history(view, used, idx, session_history(exclude), context)]
            else:
                reasons = [reason] * len(idx)
            reasons = with_blend(m, explained, idx, reasons)
            items = [{"item_id": view.item_names[i], "score": s, "reason": r}
                     for i, s, r in zip(idx.tolist(), scores.tolist(), reasons)]
        return {"user_id": None, "session_id": session_id, "model": model, "model_version": view.version,
                "partition": view.partition, "items": items}

    @staticmethod
    def _rank(view: ShardView, name: str, model: Model, batch: Batch, k: int, exclude: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, Features] | None]:
        """`view.rank`, and for a blend the weights and features its reasons are made of (one pass)."""
        if not isinstance(model, Blend):
            return (*view.rank(name, model, batch, k, exclude), None)
        raw, weights, z = model.explain(batch)
        return (*view.rank(name, model, batch, k, exclude, raw=raw), (weights, z))

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
