"""What a lookup ranks with, prepared once per shard view from the model contract (`models.base.Model`).

A served model is scored in one of three ways, chosen from what it declares:

- `item_vectors()` given: `EmbeddingScorer`, q . V[i] + b[i] with q from `query_vectors`, and the
  model's `popularity()` where it does not know the query;
- else `popularity()` given: the model ranks by popularity, `PopScorer`;
- else no scorer: the view calls `model.score`.

`AnnIndex` narrows an embedding model's candidates on large catalogues, `Cooccurrence` is the
user x item incidence that explains answers and finds similar items without embeddings, and
`top_k` picks the answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from models.base import Batch, Model, PopularityState
from models.kernels import top_items

_FIRST_ROW = np.array([0])


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite scores, best first, ties to the lower index (`top_items`)."""
    if len(scores) == 0 or k <= 0:
        return np.zeros(0, np.int64)
    return top_items(scores, min(k, len(scores)))


def fit_rows(table: np.ndarray, n: int) -> np.ndarray:
    """`table` cut or zero-padded to n rows (2-D): model tables may lag the vocabulary or run ahead of it."""
    table = np.asarray(table)
    if table.ndim == 1:
        table = table[:, None]
    if len(table) >= n:
        return table[:n]
    out = np.zeros((n, max(table.shape[1], 1)), table.dtype)
    out[: len(table), : table.shape[1]] = table
    return out


class PopScorer:
    """A `PopularityState` ranking for one query row, with everything that does not depend on the query precomputed.

    score(i) = base(i) + weight * mean over the query's usable context values c of share_c(i);
    `base` already holds -inf for rows that map to no item.
    """

    def __init__(self, count: np.ndarray, ctx_count: np.ndarray, context_weight: float, valid: np.ndarray,
                 context_of: Callable[[Batch], np.ndarray] | None = None):
        self.context_of = context_of  # batch -> the context columns the model scores with (default: all)
        self.ctx_count = np.asarray(ctx_count)  # [rows the model has, n_context] as the model keeps them
        n = len(valid)
        count = fit_rows(count, n)[:, 0].astype(np.float64)
        total = count.sum()
        base = (count / total if total > 0 else count).astype(np.float32)
        base[~valid] = -np.inf
        self.base = base
        ctx = fit_rows(ctx_count, n)  # [n, n_context]
        col_total = ctx.sum(axis=0, dtype=np.float64)
        self.usable = col_total > 0  # [n_context]
        self.weight = float(context_weight)
        inverse = np.divide(1.0, col_total, out=np.zeros_like(col_total), where=self.usable)
        # [n_context, n]: a context's column is a row; one transposed copy, then scaled in place
        self.share_t = np.ascontiguousarray(ctx.T, np.float32)
        self.share_t *= inverse.astype(np.float32)[:, None]

    @classmethod
    def from_state(cls, state: PopularityState, valid: np.ndarray) -> PopScorer:
        return cls(state.count, state.ctx_count, state.context_weight, valid, state.context_columns)

    @classmethod
    def of(cls, model: Model | None, valid: np.ndarray) -> PopScorer | None:
        """For the popularity a model ranks by or falls back to (`Model.popularity`), None when it has none."""
        state = model.popularity() if model is not None else None
        return None if state is None else cls.from_state(state, valid)

    def scores(self, batch: Batch) -> np.ndarray:
        """float32 [n_items] for the one-row query `batch`."""
        out = self.base.copy()
        if self.weight:
            context_row = (self.context_of(batch) if self.context_of is not None else batch.context)[0]
            cols = context_row[(context_row >= 0) & (context_row < len(self.usable))]
            cols = cols[self.usable[cols]]
            if len(cols) == 1:
                out += self.weight * self.share_t[cols[0]]
            elif len(cols):
                out += (self.weight / len(cols)) * self.share_t[cols].sum(axis=0)
        return out


@dataclass
class EmbeddingScorer:
    """score(q, i) = q . V[i] + b[i] for a model with `item_vectors`, q from its `query_vectors`.

    `vectors` are the item vectors ([n, d] float32, C-contiguous), `bias` holds -inf for rows that
    map to no item. Where the model does not know a query (an MF user without a trained row),
    `fallback` (its popularity) answers, as the model's own `score` would.
    """

    vectors: np.ndarray
    bias: np.ndarray
    model: Model
    fallback: PopScorer | None

    @classmethod
    def of(cls, model: Model, n_items: int, valid: np.ndarray) -> EmbeddingScorer | None:
        """For a model that declares item vectors, None for one that scores otherwise."""
        declared = model.item_vectors()
        if declared is None:
            return None
        vectors, bias = declared
        vectors = np.ascontiguousarray(fit_rows(vectors, n_items), np.float32)
        bias = fit_rows(bias, n_items)[:, 0].astype(np.float32)
        bias[~valid] = -np.inf
        return cls(vectors, bias, model, PopScorer.of(model, valid))

    def query(self, batch: Batch, model: Model | None = None) -> tuple[np.ndarray, bool]:
        """(q [d] float32, whether the model knows the query) for the one-row query `batch`, from `model`
        (the copy narrowed to the query, `Model.narrowed`) or else the model this scorer was made from."""
        q, known = (model or self.model).query_vectors(batch, _FIRST_ROW)
        return np.asarray(q[0], np.float32), bool(np.asarray(known)[0])

    def scores(self, batch: Batch) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(scores float32 [n], q) for a known query, or (popularity scores, None) when it falls back."""
        q, known = self.query(batch)
        if not known:
            return (self.fallback.scores(batch) if self.fallback is not None else None), None
        return self.vectors @ q + self.bias, q


def scorer_for(model: Model, n_items: int, valid: np.ndarray) -> PopScorer | EmbeddingScorer | None:
    """The prepared scorer of a model (see the module docstring), None when only `model.score` answers."""
    return EmbeddingScorer.of(model, n_items, valid) or PopScorer.of(model, valid)


def similarity_matrix(model: Model | None, n_items: int) -> np.ndarray | None:
    """L2-normalised `similarity_vectors` of `model` fitted to n_items rows, or None when it has none."""
    vectors = model.similarity_vectors() if model is not None else None
    if vectors is None:
        return None
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[1] < 2:
        return None
    out = np.zeros((n_items, vectors.shape[1]), np.float32)
    n = min(n_items, len(vectors))
    out[:n] = vectors[:n]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


class AnnIndex:
    """An hnswlib index over one shard's item vectors (inner product), built from a snapshot.

    Candidates come from the index, then are rescored exactly with the *current* view's vectors,
    so a slightly old index only costs recall, never stale scores; rows added after the build
    (`rows >= n`) are always candidates.
    """

    def __init__(self, vectors: np.ndarray, version: int, *, m: int = 16, ef_construction: int = 100,
                 ef: int = 64, threads: int = 1):
        import hnswlib

        self.n, dim = vectors.shape
        self.version = version
        self.built_at = time.monotonic()
        self.ef = ef
        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(max_elements=max(self.n, 1), ef_construction=ef_construction, M=m)
        if self.n:
            index.add_items(vectors, np.arange(self.n), num_threads=threads)
        index.set_ef(ef)
        self.index = index
        self._lock = threading.Lock()

    @classmethod
    def for_recommendations(cls, scorer: EmbeddingScorer, version: int) -> AnnIndex:
        """An index whose inner product with [q, 1] is q . V[i] + b[i] (rows of no item get a very low bias)."""
        bias = np.where(np.isfinite(scorer.bias), scorer.bias, -1e4).astype(np.float32)
        return cls(np.hstack([scorer.vectors, bias[:, None]]), version)

    def candidates(self, q: np.ndarray, m: int, n_now: int) -> np.ndarray:
        """Up to m rows by inner product with q, plus every row the index does not cover yet."""
        m = min(m, self.n)
        if m <= 0:
            found = np.zeros(0, np.int64)
        else:
            with self._lock:  # set_ef is index-wide
                self.index.set_ef(max(self.ef, m))
                labels, _ = self.index.knn_query(q[None, :], k=m, num_threads=1)
            found = labels[0].astype(np.int64)
        if n_now > self.n:
            found = np.concatenate([found, np.arange(self.n, n_now)])
        return found


def _pairs(history: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) of every entry of `history` (user row -> [n, 2] (item row, event type))."""
    if not history:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lengths = np.fromiter((len(h) for h in history.values()), np.int64, len(history))
    users = np.repeat(np.fromiter(history.keys(), np.int64, len(history)), lengths)
    return users, np.concatenate(list(history.values()))[:, 0].astype(np.int64)


def _keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """The sorted unique keys user * n_items + item of the pairs within bounds."""
    ok = (items >= 0) & (items < n_items) & (users >= 0)
    return np.unique(users[ok] * n_items + items[ok])


USERS_PER_ITEM = 128  # the users an item keeps in a co-occurrence index: its size follows the catalogue


@dataclass
class Cooccurrence:
    """Binary user x item incidence of the shard's recent histories, both directions as CSR arrays, with
    each item's `per_item` newest users only (the highest user rows: a user's row is given at her first
    event). A sample of users bounds the index by the catalogue, not the user base, and is all that
    reasons and similar items need: which item of a history co-occurs most with an answer.

    Users are numbered by their order among the kept ones (`user_rows` maps back). A catch-up that takes
    an item out of a user's history does not bring back users the cap left out; the next full read does.
    """

    item_ptr: np.ndarray  # [n_items + 1] offsets into item_users
    item_users: np.ndarray  # kept users' numbers, ascending per item
    user_rows: np.ndarray  # [n_kept] user row of each kept user, ascending
    user_ptr: np.ndarray  # [n_kept + 1] offsets into user_items
    user_items: np.ndarray
    n_items: int
    per_item: int = USERS_PER_ITEM

    @classmethod
    def of_pairs(cls, users: np.ndarray, items: np.ndarray, n_items: int,
                 per_item: int = USERS_PER_ITEM) -> Cooccurrence:
        """From (user row, item row) pairs, repeats allowed."""
        return cls._of_keys(_keys(users, items, n_items), n_items, per_item)

    def updated(self, history: dict[int, np.ndarray], changed: Iterable[int], n_items: int) -> Cooccurrence:
        """This incidence with the users in `changed` taken anew from `history` (absent there: no items),
        vectorised over the pairs it keeps, where `of_pairs` sorts every pair again."""
        changed = np.fromiter(changed, np.int64)
        users = np.repeat(self.user_rows, np.diff(self.user_ptr))
        keep = ~np.isin(users, changed) & (self.user_items < n_items)
        kept = users[keep] * n_items + self.user_items[keep]  # sorted and unique, as `_of_keys` left them
        new = _keys(*_pairs({u: history[u] for u in changed.tolist() if u in history}), n_items)
        return Cooccurrence._of_keys(np.insert(kept, np.searchsorted(kept, new), new), n_items, self.per_item)

    @classmethod
    def _of_keys(cls, pairs: np.ndarray, n_items: int, per_item: int) -> Cooccurrence:
        """From the sorted unique keys user * n_items + item of its pairs, each item's `per_item` newest users
        kept (numbers and items as int32: the index is what a server holds per pair)."""
        users, items = pairs // n_items, pairs % n_items
        by_item = np.lexsort((-users, items))  # each item's users, newest first
        starts = np.searchsorted(items[by_item], np.arange(n_items))
        newest = np.arange(len(pairs)) - starts[items[by_item]] < per_item
        kept = np.sort(by_item[newest])  # still sorted by user, then item
        user_rows, number = np.unique(users[kept], return_inverse=True)
        items = items[kept].astype(np.int32)
        order = np.argsort(items, kind="stable")
        item_ptr = np.zeros(n_items + 1, np.int64)
        np.cumsum(np.bincount(items, minlength=n_items), out=item_ptr[1:])
        user_ptr = np.zeros(len(user_rows) + 1, np.int64)
        np.cumsum(np.bincount(number, minlength=len(user_rows)), out=user_ptr[1:])
        return cls(item_ptr, number.astype(np.int32)[order], user_rows, user_ptr, items, n_items, per_item)

    def users_of(self, item: int) -> np.ndarray:
        return self.item_users[self.item_ptr[item]: self.item_ptr[item + 1]]

    def degree(self) -> np.ndarray:
        return np.diff(self.item_ptr)

    def _items_of(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated item lists of `users` (vectorised CSR gather), and each user's count."""
        starts, ends = self.user_ptr[users], self.user_ptr[users + 1]
        lengths = ends - starts
        total = int(lengths.sum())
        if total == 0:
            return np.zeros(0, np.int64), lengths
        offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
        return self.user_items[offsets + np.arange(total)], lengths

    def counts(self, candidates: Iterable[int], anchors: list[int]) -> np.ndarray:
        """[len(candidates), len(anchors)] number of kept users (at most `per_item` per anchor) who had both."""
        candidates = np.asarray(list(candidates), np.int64)
        out = np.zeros((len(candidates), len(anchors)))
        if len(candidates) == 0 or not anchors:
            return out
        pos = np.full(self.n_items, -1, np.int64)
        pos[candidates] = np.arange(len(candidates))
        per_anchor = [self.users_of(a) for a in anchors]
        users = np.concatenate(per_anchor)
        labels = np.repeat(np.arange(len(anchors)), [len(u) for u in per_anchor])
        items, lengths = self._items_of(users)
        if len(items) == 0:
            return out
        lab = np.repeat(labels, lengths)
        p = pos[items]
        ok = p >= 0
        np.add.at(out, (p[ok], lab[ok]), 1.0)
        return out

    def similar(self, item: int) -> np.ndarray:
        """Cosine of item's user set with every item's: [n_items]."""
        users = self.users_of(item)
        if len(users) == 0:
            return np.zeros(self.n_items)
        items, _ = self._items_of(users)
        co = np.bincount(items, minlength=self.n_items).astype(np.float64)
        deg = self.degree().astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = co / np.sqrt(np.maximum(deg, 1) * max(len(users), 1))
        return out
