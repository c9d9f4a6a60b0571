"""The interface every model shares, and the micro-batch it learns from.

Ids are dense integers handed out by `models.features.Vocab` (one vocabulary
per id kind: user, item, session, context value). A model's state is a set of
named tables; each table is a 2-D array whose rows are indexed by one id kind
(`user`, `item`, `session`, `context`) or is a `blob` stored whole. After each
`learn`, `drain_changes` names the rows that changed, so the worker writes only
those rows to Redis.

A model registers its tables in its constructor (`_table` for a `RowTable` with
the `Changes` that track its rows, `_blob` for a blob), and `export_state`,
`import_state` and `drain_changes` follow from them; a model overrides these
only for state kept otherwise (GRU's item arrays, the blend's members) or loaded specially.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from models.kernels import dot_rows
from models.rows import Changes, RowTable

# What a table's rows are indexed by: a vocabulary's ids ("user", "item", "session", "context"; rows of
# expired ids are forgotten), slots the model allots itself and recycles ("own"; never expired from
# outside), or nothing: one array written whole ("blob").
TableKind = Literal["user", "item", "session", "context", "own", "blob"]
# How a table's rows combine across shards with shared items: "sum" rows are sums of per-event changes
# (counts, and embeddings and step accumulators moved by additive steps); "decayed" rows are sums of
# time-decayed weights at the log2 scale `Model.decay_scale` gives.
Sharing = Literal["sum", "decayed"]
# The kinds of tables whose rows belong to one query (its user, its session): what `Model.narrowed` swaps.
QUERY_KINDS: frozenset[str] = frozenset({"user", "session"})
_FIRST = np.zeros(1, np.int64)


@dataclass(frozen=True, eq=False)
class Batch:
    """A micro-batch of events in stream order, ids already integer-coded.

    `n_*` are the vocabulary sizes after this batch was coded, so every id in
    the batch is below them. Item id -1 marks a query without an item (lookups).
    The last `time_columns` columns of `context` are derived from `ts` (hour of
    day, day of week); the others come from the events' own `context`.
    """

    users: np.ndarray  # [B] int64
    items: np.ndarray  # [B] int64
    sessions: np.ndarray  # [B] int64
    event_types: np.ndarray  # [B] int8, codes of stream_app.core.events.EVENT_TYPES
    weights: np.ndarray  # [B] float32, event-type weight
    ts: np.ndarray  # [B] float64, epoch seconds
    values: np.ndarray  # [B] float32, NaN where the event carries no value
    context: np.ndarray  # [B, C] int64 context-value ids, -1 pads
    n_users: int
    n_items: int
    n_sessions: int
    n_context: int
    time_columns: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def take(self, rows: np.ndarray | slice) -> Batch:
        """The events at `rows`, as a batch with the same vocabulary sizes."""
        return Batch(
            self.users[rows], self.items[rows], self.sessions[rows], self.event_types[rows],
            self.weights[rows], self.ts[rows], self.values[rows], self.context[rows],
            self.n_users, self.n_items, self.n_sessions, self.n_context, self.time_columns,
        )

    def with_items(self) -> Batch | None:
        """The rows that carry an item (lookup rows have item -1), or None when none does."""
        keep = self.items >= 0
        if keep.all():
            return self
        return self.take(keep) if keep.any() else None

    @property
    def event_context(self) -> np.ndarray:  # [B, C - time_columns]
        """The context columns that came with the events (no time features)."""
        return self.context[:, : self.context.shape[1] - self.time_columns]


@dataclass(frozen=True)
class PopularityState:
    """A popularity ranking, as a server precomputes it: score(i) = count[i] / total + context_weight
    * mean over the query's context values c (among `context_columns(batch)`) of ctx_count[i, c] / total_c."""

    count: np.ndarray  # [n_items, 1] decayed counts
    ctx_count: np.ndarray  # [n_items, n_context] decayed counts per context value
    context_weight: float
    context_columns: Callable[[Batch], np.ndarray]  # batch -> [B, C] the context value ids counted


@dataclass(frozen=True)
class StoredRows:
    """A row table as the model stores it: its rows, the changes that track them (rows whose
    flags carry `bit`), and whether stored columns beyond its width are dropped on import."""

    table: RowTable
    changes: Changes
    bit: int = 1
    clip: bool = False


@dataclass(frozen=True)
class StoredBlob:
    """A blob as the model stores it: how to export it [r, c], and how to load it back."""

    export: Callable[[], np.ndarray]
    load: Callable[[np.ndarray], None]


class Model(ABC):
    """A recommender that learns one micro-batch at a time.

    The constructor is the whole configuration (keyword arguments with
    immutable defaults, plus `seed`). `query` says what a score is conditioned
    on: `"user"` models rank for a user, `"session"` models for a session (the
    evaluator excludes already-seen items per user or per session accordingly).
    """

    name: ClassVar[str]
    query: ClassVar[Literal["user", "session"]] = "user"
    frozen = False  # see `freeze`
    tables: ClassVar[dict[str, TableKind]]
    # True when the model learns event by event, so that learning a batch in any split leaves
    # the same state; `learn_scored` then scores each event just before learning it.
    sequential: ClassVar[bool] = False
    # True when a query without a session scores from the item tables alone (a session model's, say):
    # `alike` then holds for such a query.
    alike_without_session: ClassVar[bool] = False
    # True when only learning changes the blobs: a drain then reports them unchanged (an empty id list)
    # unless the model set `_learned` since the last drain or import.
    blobs_change_on_learn: ClassVar[bool] = False
    # Item tables every shard keeps a replica of when items are shared across partitions, and how their
    # changes combine; the other item tables stay the shard's own (README "Scale-out").
    shared: ClassVar[dict[str, Sharing]] = {}

    def __init__(self) -> None:
        self._stored_rows: dict[str, StoredRows] = {}
        self._stored_blobs: dict[str, StoredBlob] = {}
        self._parts: dict[str, Model] = {}  # prefix -> a model this one is built on
        self._learned = False

    def _table(self, name: str, table: RowTable, changes: Changes, bit: int = 1, clip: bool = False) -> RowTable:
        """Store `table` as `name` (returned, to keep), its changed rows tracked by `changes`."""
        self._stored_rows[name] = StoredRows(table, changes, bit, clip)
        return table

    def _blob(self, name: str, export: Callable[[], np.ndarray], load: Callable[[np.ndarray], None]) -> None:
        """Store the blob `name`, written whole at every drain."""
        self._stored_blobs[name] = StoredBlob(export, load)

    def _include(self, prefix: str, part: Model) -> None:
        """Store the tables of a model this one is built on, as `prefix + name`."""
        self._stored_rows.update((prefix + name, rows) for name, rows in part._stored_rows.items())
        self._stored_blobs.update((prefix + name, blob) for name, blob in part._stored_blobs.items())
        self._parts[prefix] = part

    def _part_of(self, table: str) -> tuple[Model, str] | None:
        """The included model that owns `table`, and the table's name there; None when it is this model's own."""
        for prefix, part in self._parts.items():
            if table.startswith(prefix) and table[len(prefix):] in part.tables:
                return part, table[len(prefix):]
        return None

    def _clear_changes(self) -> None:
        for changes in {id(rows.changes): rows.changes for rows in self._stored_rows.values()}.values():
            changes.clear()

    @abstractmethod
    def learn(self, batch: Batch) -> None:
        """Update the model with every event of `batch`, in order."""

    @abstractmethod
    def score(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        """Scores of items `0..batch.n_items-1` for the events at `rows`.  # [len(rows), n_items]

        Uses the model as it stood before learning `batch`; session state
        includes the batch's events that come before each row.
        """

    @classmethod
    def score_each(cls, queries: list[tuple[Model, Batch]]) -> list[np.ndarray]:
        """Each one-row query scored by its model, as `model.score(batch, [0])[0]` (up to float rounding).
        The queries of one model's copies (`narrowed`, sharing its item tables) share the passes over the
        item rows: here those of models that score by item vectors (`item_vectors`, `query_vectors`),
        the others one by one. # Q x [n_items]"""
        out: list[np.ndarray | None] = [None] * len(queries)
        # (item table, n_items) -> the table's (vectors, bias) and the queries that read it
        shared: dict[tuple[int, int], tuple[tuple[np.ndarray, np.ndarray], list[int]]] = {}
        for i, (model, batch) in enumerate(queries):
            declared = model.item_vectors()
            if declared is not None and len(declared[0]) >= batch.n_items:
                shared.setdefault((id(declared[0]), batch.n_items), (declared, []))[1].append(i)
            else:
                out[i] = model.score(batch, _FIRST)[0]
        for (_, n), ((vectors, bias), asked) in shared.items():
            wanted: list[tuple[int, np.ndarray]] = []  # (query, its vector) of the queries the pass scores
            for i in asked:  # alone too: the compiled pass adds the bias as it goes, and answers as in a group
                model, batch = queries[i]
                q, known = model.query_vectors(batch, _FIRST)
                if known[0]:
                    wanted.append((i, q[0]))
                else:
                    out[i] = model.score(batch, _FIRST)[0]  # unknown to the model: its fallback
            if wanted:
                res = np.empty((len(wanted), n), np.float32)  # [R, n_items]
                dot_rows(np.array([q for _, q in wanted], np.float32), vectors, bias, res)
                for r, (i, _) in enumerate(wanted):
                    out[i] = res[r]
        return out  # type: ignore[return-value]

    def learn_scored(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        """Learn `batch`, and return what `score` gives the events at `rows` (ascending), each
        as the model stood just before learning that event: prequential order.  # [R, n_items]

        A model that learns per batch scores every row before learning the batch, so its
        weights lag by up to one batch. A sequential model learns the batch in segments split
        at `rows` and scores each row alone in between; models with a compiled loop override
        this to score inside it. Either way the model ends as `learn(batch)` leaves it.
        """
        if not self.sequential:
            scores = self.score(batch, rows)
            self.learn(batch)
            return scores
        out = np.empty((len(rows), batch.n_items))
        start = 0
        for r, j in enumerate(rows.tolist()):
            if j > start:
                self.learn(batch.take(slice(start, j)))
            out[r] = self.score(batch.take(slice(j, j + 1)), _FIRST)[0]
            start = j
        if start < len(batch):
            self.learn(batch.take(slice(start, None)))
        return out

    def export_state(self) -> dict[str, np.ndarray]:
        """Every table and array of state. Values may be views: copy to keep."""
        state = {name: rows.table.data for name, rows in self._stored_rows.items()}
        state.update((name, blob.export()) for name, blob in self._stored_blobs.items())
        return state

    def import_state(self, state: dict[str, np.ndarray]) -> None:
        """Load state from `export_state` (or rows read back from Redis).

        Row tables may come shorter or narrower than the model needs; missing
        rows and columns are initialised as for new ids. Nothing counts as changed after.
        """
        for name, rows in self._stored_rows.items():
            values = np.asarray(state[name])
            rows.table.load(values[:, : rows.table.width] if rows.clip else values)
        self._clear_changes()
        for name, blob in self._stored_blobs.items():
            blob.load(state[name])
        self._learned = False

    def drain_changes(self) -> dict[str, np.ndarray | None]:
        """Rows changed since the last call, per table (None: the whole blob)."""
        out: dict[str, np.ndarray | None] = {
            name: rows.changes.rows(rows.table.n, rows.bit) for name, rows in self._stored_rows.items()
        }
        unchanged = self.blobs_change_on_learn and not self._learned
        out.update(dict.fromkeys(self._stored_blobs, np.zeros(0, np.int64) if unchanged else None))
        self._learned = False
        self._clear_changes()
        return out

    # -- one query's rows: what a server reads per request instead of keeping every user ---------------

    def query_tables(self) -> dict[str, TableKind]:
        """The user and session tables (`QUERY_KINDS`): the rows a server reads per request."""
        return {name: kind for name, kind in self.tables.items() if kind in QUERY_KINDS}

    def narrowed(self, rows: dict[str, np.ndarray]) -> Model:
        """A copy for one query whose user and session tables hold only `rows` (table -> [n, w], the query's
        user and session renumbered from row 0; a table left out holds no row), sharing every other table
        with this model. Score it, never learn with it: the shared tables are read-only there."""
        clone = object.__new__(type(self))  # a shallow copy (copy.copy's, without its protocol lookups)
        clone.__dict__.update(self.__dict__)
        own, parts = self._narrowing()
        clone._stored_rows = dict(self._stored_rows)
        for name, attrs in own:
            stored = self._stored_rows[name]
            values = rows.get(name)
            if values is not None and stored.clip:
                values = values[:, : stored.table.width]
            table = stored.table.holding(values)
            clone._stored_rows[name] = StoredRows(table, stored.changes, stored.bit, stored.clip)
            for attr in attrs:
                setattr(clone, attr, table)
        if parts:
            clone._parts = dict(self._parts)
        for prefix, attrs in parts:
            narrow = self._parts[prefix].narrowed({t[len(prefix):]: v for t, v in rows.items() if t.startswith(prefix)})
            clone._stored_rows.update((prefix + t, r) for t, r in narrow._stored_rows.items())
            clone._parts[prefix] = narrow
            for attr in attrs:
                setattr(clone, attr, narrow)
        return clone

    def _narrowing(self) -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
        """What `narrowed` swaps, worked out on the first call (a model's tables and parts stay the objects
        they were made as): its own query tables and the included parts that have query tables, each
        with the attributes that hold it."""
        plan = self.__dict__.get("_narrow_plan")
        if plan is None:
            holders: dict[int, list[str]] = {}
            for attr, value in vars(self).items():
                holders.setdefault(id(value), []).append(attr)
            own = [(name, holders.get(id(stored.table), [])) for name, stored in self._stored_rows.items()
                   if self.tables.get(name) in QUERY_KINDS and self._part_of(name) is None]
            parts = [(prefix, holders.get(id(part), [])) for prefix, part in self._parts.items() if part.query_tables()]
            plan = self._narrow_plan = (own, parts)
        return plan

    # -- shared items: what a shard needs to fold the other shards' item changes into its replica -------

    def reserve_items(self, n: int) -> None:
        """Grow the item tables to `n` rows, each new row as for a new item (rows made by other shards)."""
        raise NotImplementedError(f"{type(self).__name__} shares no item tables")

    def decay_scale(self, table: str) -> float | None:
        """The log2 scale of a "decayed" table's counts (None: no clock yet)."""
        part = self._part_of(table)
        return None if part is None else part[0].decay_scale(part[1])

    def absorb(self, table: str, rows: np.ndarray, delta: np.ndarray, scale: float | None = None) -> None:
        """Add another shard's change `delta` [R, w] to the shared item table `table` at `rows` (unique; grown
        as needed); a "decayed" delta comes at the log2 scale `scale`. The rows count as changed."""
        part = self._part_of(table)
        if part is not None:
            part[0].absorb(part[1], rows, delta, scale)
            return
        self.reserve_items(int(rows.max()) + 1)
        stored = self._stored_rows[table]
        t = stored.table
        if delta.shape[1] > t.width:
            t.ensure(t.n, delta.shape[1])
        t.data[rows, : delta.shape[1]] += delta
        stored.changes.mark(rows, stored.bit)

    @abstractmethod
    def forget(self, kind: TableKind, ids: np.ndarray) -> None:
        """Reset the rows of expired `kind` ids; the vocabulary will hand them out again."""

    def evicted(self, kind: TableKind, ids: np.ndarray) -> np.ndarray:
        """Ids among `ids` whose `kind` rows this model dropped from memory but its store keeps
        (a bounded LRU); the caller reads them back with `import_rows`. None by default."""
        return np.zeros(0, np.int64)

    def import_rows(self, table: str, ids: np.ndarray, values: np.ndarray) -> None:
        """Take back rows of `table` that `evicted` named, as the store holds them (zeros: none kept)."""
        raise NotImplementedError(f"{type(self).__name__} evicts nothing, so it takes no rows back")

    # -- what a server may precompute (serving uses only these, never a model's internals) --------

    def alike(self, batch: Batch) -> bool:
        """Whether the one-row query `batch` is one of those this model scores alike, whatever their users,
        contexts and times (a session model's query without a session): their scores then depend on the
        item tables alone, and a model whose tables change no more (`freeze`) may keep them for the next.
        Here: a query without a session, for a model that declares `alike_without_session`."""
        return bool(self.alike_without_session and len(batch) == 1 and batch.sessions[0] < 0)

    def freeze(self) -> None:
        """The tables change no more (a server's read-only view): from now on the model (and the copies
        `narrowed` from it) may keep what it computes from them for later queries (the blend keeps its
        members' parts of `alike` queries)."""
        self.frozen = True

    def popularity(self) -> PopularityState | None:
        """The popularity this model ranks by, or answers with when it cannot answer a query
        (`query_vectors`' `known` False); None when it has none."""
        return None

    def item_vectors(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(V [n_items, d], b [n_items]) when the model scores an event as q . V[i] + b[i], with q
        from `query_vectors`; None when it scores otherwise (then only `score` answers)."""
        return None

    def query_vectors(self, batch: Batch, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For a model with `item_vectors`: the query vectors of the events at `rows` [R, d], and
        whether the model knows each query [R] (where not, its `popularity` answers)."""
        raise NotImplementedError(f"{type(self).__name__} scores without item vectors")

    def similarity_vectors(self) -> np.ndarray | None:
        """Item embeddings [n_items, d] whose cosine says which items are alike, or None."""
        vectors = self.item_vectors()
        return None if vectors is None else vectors[0]

    def session_items(self, session: int) -> np.ndarray:
        """Items this model remembers of a session, oldest first (none for user models)."""
        return np.zeros(0, np.int64)
