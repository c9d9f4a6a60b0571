"""An online ensemble: other models' scores, combined with weights learned from the stream itself.

Each member model scores every item. Two features per member and item: the member's scores
standardised over the items (z-score, after log(s + eps * mean) for members whose scores are never
negative: counts and shares), and 10 / (10 + rank) for the member's `top` best items (0 below).
The blend scores

    score(i) = sum_f w[g, f] * x_f(i),   w[g] = base[g] + mean over the event's context values c of ctx[c, g]

where the group g is the query kind: 0 ("user": the event's session has no earlier event, so only the
user's history speaks; a user lookup without an open session) or, for a session with earlier events,
1 + the bucket of its length (`length_buckets`). After scoring an event, and only then, the weights
of its group (base and its context values' rows) take one Adagrad step of the softmax loss of the
event's item among the items its session has not seen (a hashed filter per session):

    d loss / d w[g, f] = sum_i p(i) x_f(i) - x_f(true),   p = softmax(score)

so the weights learn only from events already scored. Members are created from the registry with
the blend's seed; their tables are the blend's, named `member + "." + table`.
"""

from __future__ import annotations

import bisect
import functools
from statistics import NormalDist
from typing import ClassVar, Literal, NamedTuple, cast

import numpy as np
from numba import njit

from models.base import Batch, Model, TableKind
from models.kernels import FAST, SEEN_BITS_PER_WORD, is_seen, mark_seen, top_items_near
from models.registry import create
from models.rows import Changes, RowTable

_NONE = np.zeros(0, np.int64)


@njit(cache=True)
def _seen(seen, s, n, n_bits):  # pragma: no cover - numba
    """Which of items 0..n-1 session s's seen filter holds. # [n] bool"""
    out = np.zeros(n, np.bool_)
    for j in range(n):
        out[j] = is_seen(seen, s, j, n_bits)
    return out


@njit(cache=True, fastmath=FAST)
def _cleaned(s, rows, average):  # pragma: no cover - numba
    """Non-finite scores of each row r in `rows` set to 0, in place; average[r] gets the row's mean when none of
    its scores is negative, else NaN (one pass that counts, for most rows). # [M, n] -> [M]"""
    n = s.shape[1]
    for r in rows:
        bad, negative = 0, 0
        for j in range(n):
            bad += not abs(s[r, j]) < np.inf
            negative += s[r, j] < 0
        if bad:
            negative = 0
            for j in range(n):
                if not abs(s[r, j]) < np.inf:
                    s[r, j] = 0.0
                negative += s[r, j] < 0
        average[r] = np.nan
        if negative == 0:
            total = 0.0
            for j in range(n):
                total += s[r, j]
            average[r] = total / max(n, 1)


@njit(inline="always")
def _reciprocal(rank):  # pragma: no cover - numba
    """The feature of the item at `rank` (0: best) of a member's best items."""
    return 10.0 / (10.0 + rank)


@njit(cache=True, fastmath=FAST)
def _summary(s, rows, spread, mean, std, best):  # pragma: no cover - numba
    """For each row r in `rows`: its mean and standard deviation (float64), and its best[r].shape[0] best items,
    best first, ties to the lower item (-1 where the row has fewer items), looked for first among the scores
    `spread` deviations above the mean. # [M, n] -> mean, std [M], best [M, top]"""
    n = s.shape[1]
    top = best.shape[1]
    for r in rows:
        total = 0.0
        for j in range(n):
            total += s[r, j]
        mean[r] = total / max(n, 1)
        var = 0.0
        for j in range(n):
            d = s[r, j] - mean[r]
            var += d * d
        std[r] = np.sqrt(var / max(n, 1))
        best[r, :] = -1
        if top > 0:
            found = top_items_near(s[r], top, mean[r] + spread * std[r])
            best[r, : len(found)] = found


@functools.lru_cache(maxsize=64)
def _spread(top: int, n: int) -> float:
    """How many deviations above its mean a normal row of n scores has its 2 * top best: where `_summary`
    looks for a row's `top` best first (a row of other shape costs it one pass)."""
    return NormalDist().inv_cdf(max(1.0 - 2.0 * top / max(n, 1), 0.5))


@njit(cache=True)
def _weight_of(base, ctx, context, start, m):  # pragma: no cover - numba
    """base[start : start + m] plus the mean of those rows' columns that the context values name (the values
    without a row left out), in float32 as numpy's mean of the rows. # -> [m]"""
    out = base[start : start + m].copy()
    total = np.zeros(m, np.float32)
    count = 0
    for c in context:
        if 0 <= c < ctx.shape[0]:
            total += ctx[c, start : start + m]
            count += 1
    if count:
        out += total / np.float32(count)
    return out


@njit(cache=True, fastmath=FAST)
def _combined(s, a, c, best, b, out):  # pragma: no cover - numba
    """out[j] = c + sum_r a[r] s[r, j] + b[r] * (j's reciprocal rank in row r's best). # [M, n] -> [n]"""
    m, n = s.shape
    out[:] = c
    for r in range(m):
        for j in range(n):
            out[j] += a[r] * s[r, j]
        for rank in range(best.shape[1]):
            if best[r, rank] >= 0:
                out[best[r, rank]] += b[r] * _reciprocal(rank)


@njit(cache=True, fastmath=FAST)
def _expected(s, best, p):  # pragma: no cover - numba
    """sum_j p[j] s[r, j] and sum_j p[j] (j's reciprocal rank in row r's best), per row. # -> [M], [M]"""
    m, n = s.shape
    dense, ranks = np.zeros(m), np.zeros(m)
    for r in range(m):
        total = 0.0
        for j in range(n):
            total += p[j] * s[r, j]
        dense[r] = total
        for rank in range(best.shape[1]):
            if best[r, rank] >= 0:
                ranks[r] += p[best[r, rank]] * _reciprocal(rank)
    return dense, ranks


@njit(cache=True)
def _at(s, mean, scale, best, items, ranked):  # pragma: no cover - numba
    """The features of `items`: z-scores, then (when `ranked`) reciprocal ranks. # -> [M or 2M, len(items)]"""
    m = s.shape[0]
    out = np.zeros((2 * m if ranked else m, len(items)))
    for r in range(m):
        for i in range(len(items)):
            out[r, i] = (s[r, items[i]] - mean[r]) * scale[r]
        if ranked:
            for rank in range(best.shape[1]):
                for i in range(len(items)):
                    if items[i] == best[r, rank]:
                        out[m + r, i] = _reciprocal(rank)
    return out


class Row(NamedTuple):
    """One member's part of a query's features: what a frozen blend keeps of an `alike` query."""

    s: np.ndarray  # [n] float32, cleaned and logged as the features take it
    mean: float
    std: float
    best: np.ndarray  # [top]


class Features:
    """One row's features [F, n] (see the module docstring), kept as what they are made of: each member's
    scores s [M, n] (logged where they count), their means and deviations, and each member's `top` best
    items. Nothing [F, n] is built: a score, an expectation and a few items' features are each one pass."""

    def __init__(self, s: np.ndarray, mean: np.ndarray, std: np.ndarray, best: np.ndarray):
        self.s = s  # [M, n] float32
        self.mean, self.std, self.best = mean, std, best  # [M], [M], [M, top]
        self.scale = 1.0 / np.where(std > 0, std, np.inf)  # [M] 1 / std (0: a constant row)
        self.ranked = best.shape[1] > 0

    def row(self, r: int) -> Row:
        """Member r's part (copies)."""
        return Row(self.s[r].copy(), float(self.mean[r]), float(self.std[r]), self.best[r].copy())

    def score(self, w: np.ndarray) -> np.ndarray:
        """w @ features. # [F] -> [n]"""
        m = len(self.s)
        a = w[:m] * self.scale
        out = np.empty(self.s.shape[1])
        _combined(self.s, a, -float(a @ self.mean), self.best, w[m:] if self.ranked else np.zeros(m), out)
        return out

    def expect(self, p: np.ndarray) -> np.ndarray:
        """features @ p, for weights p over the items that sum to 1. # [n] -> [F]"""
        dense, ranks = _expected(self.s, self.best, np.asarray(p, np.float64))
        z = (dense - self.mean) * self.scale
        return np.concatenate([z, ranks]) if self.ranked else z

    def at(self, items: np.ndarray) -> np.ndarray:
        """The features of `items`. # [len(items)] -> [F, len(items)]"""
        return _at(self.s, self.mean, self.scale, self.best, np.asarray(items, np.int64), self.ranked)


class Blend(Model):
    """Member models' standardised scores, weighted per (query kind, context value); see the module docstring.

    members: registry names of the models blended; length_buckets: session lengths (earlier events) from
    which a new weight group starts (the first group, length 1 up, is always there); lr: Adagrad step of
    the weights; init: every weight's start; eps: what count-like scores get before their log, as a
    share of the row's mean; seen_bits: bits of each session's filter of seen items, which the loss leaves
    out (0: none); top: how many of each member's best items get a reciprocal-rank feature (0: none).
    """

    name = "blend"
    query: ClassVar[Literal["user", "session"]] = "session"

    def __init__(self, members: tuple[str, ...] = ("gru", "dnn", "markov", "sknn", "caser", "mf"),
                 length_buckets: tuple[int, ...] = (3, 10, 50), lr: float = 0.005, init: float = 0.5, eps: float = 1e-3,
                 seen_bits: int = 4096, top: int = 100, seed: int = 0):
        super().__init__()
        if not members or "blend" in members:
            raise ValueError(f"a blend needs member models other than blend (got {members!r})")
        self.members = tuple(members)
        self.length_buckets = np.asarray(length_buckets, np.int64)
        self._buckets = tuple(int(b) for b in self.length_buckets)
        self.lr = lr
        self.init = init
        self.eps = eps
        self.seen_bits = seen_bits
        self.top = top
        self.seed = seed
        self.parts = {m: create(m, seed=seed) for m in self.members}
        # what base declares per class depends here on the members: set per instance
        self.sequential = all(p.sequential for p in self.parts.values())  # type: ignore[misc]
        self._groups = 2 + len(self.length_buckets)
        self._f = len(self.members) * (2 if top > 0 else 1)  # features: z-scores, then reciprocal ranks
        width = self._groups * self._f  # weights of each group, one after the other
        self._ctx_changed, self._sessions_changed = Changes(), Changes()
        # [n_context, 2 * width]: the context value's weight offsets, then their Adagrad accumulators
        self._ctx = self._table("context", RowTable(2 * width, np.float32), self._ctx_changed)
        self._length = self._table("length", RowTable(1, np.float32), self._sessions_changed)  # [n_sessions, 1] events so far
        # [n_sessions, ceil(seen_bits / 24)] the session's items, hashed to bits, 24 per value
        words = max(1, -(-seen_bits // SEEN_BITS_PER_WORD))
        self._seen = self._table("seen", RowTable(words, np.float32), self._sessions_changed)
        # [2 * width] the weights, then their Adagrad accumulators
        self._base = np.concatenate([np.full(width, init, np.float32), np.zeros(width, np.float32)])
        self._blob("base", lambda: self._base[None, :], self._load_base)
        tables: dict[str, TableKind] = {"context": "context", "length": "session", "seen": "session", "base": "blob"}
        for m, part in self.parts.items():
            tables.update((f"{m}.{t}", kind) for t, kind in part.tables.items())
        self.tables = tables  # type: ignore[misc]
        self._kept: dict[tuple[str, int], Row] = {}  # (member, n_items) -> its part of `alike` queries, once frozen
        self.shared = {f"{m}.{t}": how for m, part in self.parts.items() for t, how in part.shared.items()}  # type: ignore[misc]

    # -- weights ---------------------------------------------------------------------------
    def _load_base(self, base: np.ndarray) -> None:
        self._base = np.array(np.asarray(base, np.float32).ravel())

    def _lengths(self, batch: Batch) -> np.ndarray:
        """Events of each row's session before it (stored, then this batch's earlier rows). # [B]"""
        stored = self._length.data[:, 0]
        out = np.zeros(len(batch), np.int64)
        running: dict[int, int] = {}
        for j, s in enumerate(batch.sessions.tolist()):
            n = running.get(s)
            if n is None:
                n = int(stored[s]) if 0 <= s < len(stored) else 0
            out[j] = n
            if batch.items[j] >= 0:
                running[s] = n + 1
        return out

    def _group(self, length: int) -> int:
        """The weight group of a row whose session had `length` events before it."""
        return 1 + bisect.bisect_right(self._buckets, length) if length > 0 else 0

    def _contexts(self, batch: Batch, j: int) -> np.ndarray:
        """The context values of row j that have a weight row."""
        c = batch.context[j]
        return c[(c >= 0) & (c < self._ctx.n)]

    def weights(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        """Each row's weights, as it is scored now. # [R, F]"""
        self._ctx.ensure(batch.n_context)
        lengths = self._lengths(batch).tolist()
        out = np.empty((len(rows), self._f), np.float32)
        for r, j in enumerate(rows.tolist()):
            out[r] = self._weight(batch, j, self._group(lengths[j]))
        return out

    def _weight(self, batch: Batch, j: int, g: int) -> np.ndarray:  # [F]
        return _weight_of(self._base, self._ctx.data, batch.context[j], g * self._f, self._f)

    def _step(self, batch: Batch, j: int, g: int, z: Features) -> None:
        """One Adagrad step of the weights of row j (group g) on its item, given its features z;
        none for an item the session had seen (a repeat: what is to rank is what it has not seen)."""
        m = self._f
        seen = None
        if self.seen_bits > 0 and 0 <= batch.sessions[j] < self._seen.n:  # seen items are no answer
            seen = _seen(self._seen.data, batch.sessions[j], batch.n_items, self.seen_bits)
            if seen[batch.items[j]]:
                return
        s = z.score(self._weight(batch, j, g))  # [n]
        if seen is not None:
            s[seen] = -np.inf
        p = np.exp(s - s.max())
        p /= p.sum()
        grad = z.expect(p) - z.at(batch.items[j : j + 1])[:, 0]  # [F]
        width = self._groups * m
        cols = slice(g * m, (g + 1) * m)
        acc = self._base[width:][cols]
        acc += grad * grad
        self._base[:width][cols] -= self.lr * grad / np.sqrt(acc + 1e-8)
        c = self._contexts(batch, j)
        if len(c):
            share = grad / len(c)
            rows = self._ctx.data[c]
            rows[:, width:][:, cols] += share * share
            rows[:, :width][:, cols] -= self.lr * share / np.sqrt(rows[:, width:][:, cols] + 1e-8)
            self._ctx.data[c] = rows
            self._ctx_changed.mark(c)

    # -- features --------------------------------------------------------------------------
    def _features(self, member_scores: list[np.ndarray | Row]) -> Features:
        """One row's features: each member's scores (non-finite ones as 0) z-scored over the items, after
        log(s + eps * mean) when none is negative (counts and shares); then, with `top`, 10 / (10 + rank)
        for each member's `top` best items, ties to the lower item (0 for the rest). A member's part may
        come as kept (`Row`). # M x [n] -> [F, n]"""
        m, n = len(member_scores), len(member_scores[0].s if isinstance(member_scores[0], Row) else member_scores[0])
        s = np.empty((m, n), np.float32)  # cleaned and logged in place, by SIMD ufuncs
        mean, std, best = np.empty(m), np.empty(m), np.empty((m, self.top), np.int64)
        fresh = []
        for r, got in enumerate(member_scores):
            if isinstance(got, Row):
                s[r], mean[r], std[r], best[r] = got
            else:
                s[r] = got
                fresh.append(r)
        rows = np.array(fresh, np.int64)
        average = np.empty(m)
        _cleaned(s, rows, average)
        for r in fresh:
            if not np.isnan(average[r]):  # none negative
                np.add(s[r], np.float32(self.eps * max(average[r], 1e-12)), out=s[r])
                np.log(s[r], out=s[r])
        _summary(s, rows, _spread(self.top, n), mean, std, best)
        return Features(s, mean, std, best)

    # -- Model -----------------------------------------------------------------------------
    def _ensure(self, batch: Batch) -> None:
        self._ctx.ensure(batch.n_context)
        n_sessions = max(batch.n_sessions, int(batch.sessions.max()) + 1 if len(batch) else 0)
        self._length.ensure(n_sessions)
        self._seen.ensure(n_sessions)

    def learn(self, batch: Batch) -> None:
        self.learn_scored(batch, _NONE)

    def learn_scored(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        """Members learn the batch scoring its rows; then, row by row, the blend scores the rows asked
        for and steps its weights on each row with an item (a sequential blend scores row j with the
        weights of rows < j, otherwise every row with the weights from before the batch)."""
        self._ensure(batch)
        has_item = batch.items >= 0
        need = np.union1d(rows, np.flatnonzero(has_item))  # [N] ascending
        scores = [p.learn_scored(batch, need) for p in self.parts.values()]  # M x [N, n_items]
        lengths = self._lengths(batch)
        groups = [self._group(n) for n in lengths.tolist()]
        asked = {j: r for r, j in enumerate(rows.tolist())}
        out = np.empty((len(rows), batch.n_items))  # [R, n_items]
        before = {} if self.sequential else {j: self._weight(batch, j, groups[j]) for j in asked}
        for k, j in enumerate(need.tolist()):
            z = self._features([s[k] for s in scores])
            if j in asked:
                out[asked[j]] = z.score(before[j] if before else self._weight(batch, j, groups[j]))
            if has_item[j]:
                self._step(batch, j, groups[j], z)
                if self.seen_bits > 0:
                    mark_seen(self._seen.data, batch.sessions[j], batch.items[j], self.seen_bits)
        # each session's length after its last row with an item
        sessions, from_end = np.unique(batch.sessions[has_item][::-1], return_index=True)
        if len(sessions):
            self._length.data[sessions, 0] = (lengths[has_item] + 1)[::-1][from_end]
            self._sessions_changed.mark(sessions)
        self._learned = True
        return out

    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        self._ensure(batch)
        scores = [p.score(batch, rows) for p in self.parts.values()]  # M x [R, n_items]
        w = self.weights(batch, rows)  # [R, F]
        out = np.empty((len(rows), batch.n_items))
        for r in range(len(rows)):
            out[r] = self._features([s[r] for s in scores]).score(w[r])
        return out

    def explain(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, Features]:
        """For the one-row query `batch`, in one pass: its scores [n_items] (as `score`), its weights
        [F] and its features, for `contributions`."""
        return Blend.explain_each([(self, batch)])[0]

    @staticmethod
    def explain_each(queries: list[tuple[Blend, Batch]]) -> list[tuple[np.ndarray, np.ndarray, Features]]:
        """`explain` of each (blend, one-row query); the members of one blend's copies (`narrowed`) score
        their queries together (`Model.score_each`: one pass over a member's item rows for all of them).
        A frozen blend takes a member's part of an `alike` query from what it kept of the first one."""
        first = np.zeros(1, np.int64)
        got: dict[tuple[str, int], np.ndarray | Row] = {}  # (member, query) -> its scores [n_items] or kept part
        for i, (blend, batch) in enumerate(queries):
            blend._ensure(batch)
            got.update(((name, i), row) for name, row in blend._kept_rows(batch).items())
        for name in dict.fromkeys(m for blend, _ in queries for m in blend.members):
            which = [i for i, (blend, _) in enumerate(queries) if name in blend.parts and (name, i) not in got]
            if which:
                asked = [(queries[i][0].parts[name], queries[i][1]) for i in which]
                got.update(zip(((name, i) for i in which), type(asked[0][0]).score_each(asked)))
        out = []
        for i, (blend, batch) in enumerate(queries):
            z = blend._features([got[m, i] for m in blend.members])
            blend._keep(batch, z)
            w = blend.weights(batch, first)[0]
            out.append((z.score(w), w, z))
        return out

    def _kept_rows(self, batch: Batch) -> dict[str, Row]:
        """The members' parts kept for this query (those it is `alike` for, once a frozen blend met one)."""
        if not self.frozen:
            return {}
        return {name: row for name, part in self.parts.items()
                if (row := self._kept.get((name, batch.n_items))) is not None and part.alike(batch)}

    def _keep(self, batch: Batch, z: Features) -> None:
        """A frozen blend keeps the parts of the members this query is `alike` for (the first time)."""
        if not self.frozen:
            return
        for r, (name, part) in enumerate(self.parts.items()):
            if (name, batch.n_items) not in self._kept and part.alike(batch):
                self._kept[name, batch.n_items] = z.row(r)

    def contributions(self, weights: np.ndarray, z: Features, items: np.ndarray) -> np.ndarray:
        """Each member's part of the blend's score of `items` [len(items), M], from `explain`'s weights
        and features; the parts of an item add up to its score."""
        parts = weights[:, None] * z.at(items)  # [F, len(items)]
        m = len(self.members)
        return (parts[:m] + parts[m:] if self.top > 0 else parts).T

    # -- state -----------------------------------------------------------------------------
    def export_state(self) -> dict[str, np.ndarray]:
        state = super().export_state()
        for m, part in self.parts.items():
            state.update((f"{m}.{t}", v) for t, v in part.export_state().items())
        return state

    def import_state(self, state: dict[str, np.ndarray]) -> None:
        super().import_state(state)
        for m, part in self.parts.items():
            part.import_state({t: state[f"{m}.{t}"] for t in part.tables})

    def drain_changes(self) -> dict[str, np.ndarray | None]:
        out = super().drain_changes()
        for m, part in self.parts.items():
            out.update((f"{m}.{t}", rows) for t, rows in part.drain_changes().items())
        return out

    def narrowed(self, rows: dict[str, np.ndarray]) -> Blend:
        own: dict[str, np.ndarray] = {}
        of: dict[str, dict[str, np.ndarray]] = {m: {} for m in self.parts}  # member -> its tables' rows
        for t, v in rows.items():
            m, dot, table = t.partition(".")
            if dot:
                of[m][table] = v
            else:
                own[t] = v
        clone = cast(Blend, super().narrowed(own))
        clone.parts = {m: part.narrowed(of[m]) for m, part in self.parts.items()}
        return clone

    def reserve_items(self, n: int) -> None:
        for part in self.parts.values():
            if part.shared:
                part.reserve_items(n)

    def decay_scale(self, table: str) -> float | None:
        m, _, t = table.partition(".")
        return self.parts[m].decay_scale(t)

    def absorb(self, table: str, rows: np.ndarray, delta: np.ndarray, scale: float | None = None) -> None:
        m, _, t = table.partition(".")
        self.parts[m].absorb(t, rows, delta, scale)

    def forget(self, kind: TableKind, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        if kind == "context":
            self._ctx.reset(ids)
        elif kind == "session":
            self._length.reset(ids)
            self._seen.reset(ids)
        for part in self.parts.values():
            part.forget(kind, ids)

    def evicted(self, kind: TableKind, ids: np.ndarray) -> np.ndarray:
        found = [part.evicted(kind, ids) for part in self.parts.values()]
        return np.unique(np.concatenate(found)) if found else _NONE

    def import_rows(self, table: str, ids: np.ndarray, values: np.ndarray) -> None:
        m, _, t = table.partition(".")
        self.parts[m].import_rows(t, ids, values)

    def similarity_vectors(self) -> np.ndarray | None:
        """The first member's (in `members` order) that has any: what explains the blend's answers."""
        return next((v for p in self.parts.values() if (v := p.similarity_vectors()) is not None), None)

    def session_items(self, session: int) -> np.ndarray:
        """The session's items as the member that remembers most of them has them."""
        return max((p.session_items(session) for p in self.parts.values()), key=len)
