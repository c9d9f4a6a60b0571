"""One shard's serving state, read-only and prepared for lookups (`ShardView`).

A view holds what every lookup of a partition shares: its item and context vocabularies and every
served model as rebuilt from Redis without any user's or session's rows (a request reads its own and
scores with the models narrowed to them, `Model.narrowed`); `prepare` precomputes, once per view,
what a lookup needs that does not depend on the request (see `stream_app.serving.scorers`). Views
are built by `stream_app.serving.cache.ModelCache` and never change once shared.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from models.base import Batch, Model
from models.features import Featurizer
from models.kernels import fitted_scores
from stream_app.io.redis import QueryRows, Snapshot
from stream_app.serving.scorers import (
    AnnIndex,
    Cooccurrence,
    EmbeddingScorer,
    PopScorer,
    scorer_for,
    similarity_matrix,
    top_k,
)

_FIRST_ROW = np.zeros(1, np.int64)
REMEMBERED_ANSWERS = 1024  # answers to queries of nobody a view keeps (the oldest forgotten first) ...
REMEMBERED_ITEMS = 8192  # ... and their items in all (k goes up to 1,000; a blend item's reason is 8 dicts)


@dataclass
class ShardView:
    """A consistent, read-only snapshot of what every lookup of one partition shares, prepared for lookups:
    item and context-value state (a user's and a session's own rows are read per request, see
    `ModelCache.query`), and where co-occurrence explains answers its index of the users' histories.

    Everything a request needs that does not depend on the request is computed once, when the view
    is built (in the cache's refresher thread): per-model scorers, normalised similarity vectors
    and the co-occurrence index. And what depends only on the view and the request's context, the
    answers to queries of nobody (users and sessions the shard does not know), is kept once answered
    (`remember`): a new user's next lookup in the same context costs no ranking.
    """

    partition: int
    version: int
    loaded_at: float  # monotonic
    featurizer: Featurizer
    item_names: list[str | None]
    valid_items: np.ndarray  # [n_items] bool: row currently mapped to an item id
    models: dict[str, Model]
    snapshot: Snapshot | None = field(default=None, repr=False)  # what it was built from: the base of the next
    scorers: dict[str, PopScorer | EmbeddingScorer] = field(default_factory=dict, repr=False)
    ann: dict[str, tuple[AnnIndex | None, AnnIndex | None]] = field(default_factory=dict, repr=False)
    cooc: Cooccurrence | None = field(default=None, repr=False)  # built when first asked for, unless given
    _vectors: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)
    _answers: dict[tuple, list[dict]] = field(default_factory=dict, repr=False)
    _answered_items: int = field(default=0, repr=False)  # items of the answers kept
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def n_items(self) -> int:
        return len(self.item_names)

    def prepare(self) -> ShardView:
        """Precompute scorers, similarity vectors and co-occurrence (call before the view is shared)."""
        # One query per model now, so that tables a model grows lazily to the vocabulary's size
        # grow here and not under concurrent requests.
        warm = self.featurizer.query(None, {}, time.time())
        for model in self.models.values():
            model.score(warm, _FIRST_ROW)
            model.freeze()  # read-only from here: it may keep what later queries share
        for name, model in self.models.items():
            scorer = scorer_for(model, self.n_items, self.valid_items)
            if scorer is not None:
                self.scorers[name] = scorer
            self.item_vectors(name)
        if self.vector_model() is None:  # answers are explained by co-occurrence
            self.cooccurrence()
        return self

    def popularity_model(self) -> str | None:
        """The first served model that ranks by popularity alone: the answer where a model has no state."""
        return next((name for name, s in self.scorers.items() if isinstance(s, PopScorer)), None)

    def popularity_scorer(self) -> PopScorer | None:
        """The scorer of `popularity_model()`, None when no served model ranks by popularity alone."""
        name = self.popularity_model()
        scorer = self.scorers.get(name) if name is not None else None
        return scorer if isinstance(scorer, PopScorer) else None

    def cooccurrence(self) -> Cooccurrence:
        with self._lock:
            if self.cooc is None:  # no history was read: an index of no users
                self.cooc = Cooccurrence.of_pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), self.n_items)
            return self.cooc

    def item_vectors(self, name: str) -> np.ndarray | None:
        """L2-normalised similarity vectors of model `name` ([n_items, d]) or None when it has none."""
        if name in self._vectors:  # entries are only ever added
            return self._vectors[name]
        with self._lock:
            if name not in self._vectors:
                self._vectors[name] = similarity_matrix(self.models.get(name), self.n_items)
            return self._vectors[name]

    def vector_model(self, preferred: str | None = None) -> str | None:
        """A served model with similarity vectors, `preferred` first."""
        names = ([preferred] if preferred else []) + [n for n in self.models if n != preferred]
        for name in names:
            if name in self.models and self.item_vectors(name) is not None:
                return name
        return None

    def remembered(self, key: tuple | None) -> list[dict] | None:
        """The items of the answer kept under `key` (None: none kept, or no key: not a query of nobody)."""
        return self._answers.get(key) if key is not None else None

    def remember(self, key: tuple, items: list[dict]) -> None:
        """Keep an answer's items (never changed afterwards) under `key`: what the answer to a query of
        nobody depends on besides this view (`stream_app.serving.recommender`). At most
        `REMEMBERED_ANSWERS` answers of `REMEMBERED_ITEMS` items in all are kept, the oldest forgotten
        first, so requests with odd contexts and large k cannot grow the memo."""
        if len(items) > REMEMBERED_ITEMS:
            return
        with self._lock:
            if key in self._answers:
                self._answered_items -= len(self._answers.pop(key))
            while self._answers and (len(self._answers) >= REMEMBERED_ANSWERS
                                     or self._answered_items + len(items) > REMEMBERED_ITEMS):
                self._answered_items -= len(self._answers.pop(next(iter(self._answers))))
            self._answers[key] = items
            self._answered_items += len(items)

    # ---- ranking

    def rank(self, name: str, model: Model, batch: Batch, k: int, exclude: np.ndarray | None = None,
             raw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(top-k rows best first, their scores) of `model` for the one-row query `batch`.

        Uses `raw` when given (the model's scores of every item, computed already), else the prepared
        scorer when there is one (through the ANN index for an embedding model that has one), else
        `model.score`."""
        scorer = None if raw is not None else self.scorers.get(name)
        if isinstance(scorer, EmbeddingScorer):
            q, known = scorer.query(batch, model)
            index = self.ann.get(name, (None, None))[0]
            if known and index is not None:
                return self._rank_candidates(scorer, index, q, k, exclude)
            if known:
                scores = scorer.vectors @ q + scorer.bias
            elif scorer.fallback is not None:
                scores = scorer.fallback.scores(batch)
            else:
                scores = self._generic(model, batch)
        elif isinstance(scorer, PopScorer):
            scores = scorer.scores(batch)
        else:
            scores = self._generic(model, batch, raw)
        if exclude is not None and len(exclude):
            scores[exclude[(exclude >= 0) & (exclude < len(scores))]] = -np.inf
        idx = top_k(scores, k)
        return idx, scores[idx]

    def _rank_candidates(self, scorer: EmbeddingScorer, index: AnnIndex, q: np.ndarray, k: int,
                         exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k among the index's candidates for q, scored exactly with this view's vectors."""
        extra = 0 if exclude is None else len(exclude)
        cand = index.candidates(np.append(q, np.float32(1.0)), 4 * k + extra + 16, self.n_items)
        cand_scores = scorer.vectors[cand] @ q + scorer.bias[cand]
        if exclude is not None and len(exclude):
            cand_scores[np.isin(cand, exclude)] = -np.inf
        order = top_k(cand_scores, k)
        return cand[order], cand_scores[order]

    def _generic(self, model: Model, batch: Batch, raw: np.ndarray | None = None) -> np.ndarray:
        """`model.score` (or `raw`) fitted to this view's items, rows of no item and non-finite scores at -inf."""
        scores = np.empty(self.n_items, np.float32)
        fitted_scores(model.score(batch, _FIRST_ROW)[0] if raw is None else raw, self.valid_items, scores)
        return scores

    def similar_rows(self, name: str, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cosine) of the k items closest to `row` in model `name`'s similarity space (not row itself)."""
        vectors = self.item_vectors(name)
        if vectors is None:
            raise ValueError(f"model {name} has no similarity vectors (ask `vector_model` first)")
        index = self.ann.get(name, (None, None))[1]
        if index is not None:
            cand = index.candidates(vectors[row], 4 * k + 16, self.n_items)
            sims = vectors[cand] @ vectors[row]
            sims[~self.valid_items[cand] | (cand == row)] = -np.inf
            order = top_k(sims, k)
            return cand[order], sims[order]
        sims = vectors @ vectors[row]
        sims[~self.valid_items] = -np.inf
        sims[row] = -np.inf
        idx = top_k(sims, k)
        return idx, sims[idx]


def query_batch(view: ShardView, context: dict[str, str], ts: float, rows: QueryRows | None = None) -> Batch:
    """The one-row query in `context` at `ts`: of nobody, or of the user and session `rows` were read for,
    renumbered to row 0 as the models narrowed to those rows (`Model.narrowed`) expect."""
    if rows is None:
        return view.featurizer.query(None, context, ts)
    return view.featurizer.query_of(0 if rows.user >= 0 else -1, 0 if rows.session >= 0 else -1, context, ts, 1, 1)
