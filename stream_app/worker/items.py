"""Shared items: one item vocabulary and one set of item parameters for every partition of a topic.

Users and sessions stay with their partition's shard. Items and context values get their rows from one
vocabulary per topic (`SharedVocab`), so row r is the same item in every shard, and every shard keeps a
replica of each model's shared item tables (`Model.shared`). What a shard's own events change in them
is written, as the difference to the replica's last committed rows, to the partition's item log inside
its fenced commit; each shard folds the other partitions' logs into its replica (`Model.absorb`) and
commits how far it got (cursors) with its own state. README "Scale-out" states the consistency model.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import numpy as np
import orjson

from models.base import Model
from models.features import Featurizer
from stream_app.io.redis import Keys, PartitionStore, SharedVocab, log_trim, read_item_log

log = logging.getLogger("streamrec.worker")

FOLD_ENTRIES = 256  # log entries folded per source partition and fold at most
TRIM_EVERY = 32  # commits between checks of how much of the item log every partition has folded in


def encode(tables: list[tuple[str, str, float | None, np.ndarray, np.ndarray]], names: dict[int, str]) -> bytes:
    """One log entry: the changed rows of each shared table (model, table, scale, rows [R], delta [R, w])
    and the ids of those rows."""
    header = orjson.dumps({"tables": [[m, t, s] for m, t, s, _, _ in tables], "names": {str(r): n for r, n in names.items()}})
    buf = io.BytesIO()
    buf.write(len(header).to_bytes(4, "little"))
    buf.write(header)
    for *_, rows, delta in tables:
        np.save(buf, rows.astype(np.int64), allow_pickle=False)
        np.save(buf, delta, allow_pickle=False)
    return buf.getvalue()


def decode(entry: bytes) -> tuple[list[tuple[str, str, float | None, np.ndarray, np.ndarray]], dict[int, str]]:
    """The tables and ids of a log entry made by `encode`."""
    size = int.from_bytes(entry[:4], "little")
    header = orjson.loads(entry[4 : 4 + size])
    buf = io.BytesIO(entry[4 + size :])
    tables = [(m, t, s, np.load(buf, allow_pickle=False), np.load(buf, allow_pickle=False)) for m, t, s in header["tables"]]
    return tables, {int(r): n for r, n in header["names"].items()}


class SharedItems:
    """One shard's side of the shared items: the rows its replica had at its last commit (`base`), the
    changes it publishes, and folding in the other partitions' changes."""

    def __init__(self, store: PartitionStore, models: dict[str, Model], featurizer: Featurizer, partitions: int,
                 know: Callable[[np.ndarray], None]):
        """`know(rows)`: tell the shard's evaluator that these items are in the catalogue."""
        keys = store.keys
        self.store, self.featurizer, self.know = store, featurizer, know
        self.models = {name: m for name, m in models.items() if m.shared}
        self.sources = [p for p in range(partitions) if p != keys.partition]
        featurizer.items.resolve = SharedVocab(store.client, keys.prefix, keys.topic, "item")
        featurizer.contexts.resolve = SharedVocab(store.client, keys.prefix, keys.topic, "context")
        self.base: dict[tuple[str, str], np.ndarray] = {}
        self.cursors: dict[int, int] = {}
        self._commits = 0

    def loaded(self, cursors: dict[int, int]) -> None:
        """After the shard's state was loaded: its replica as committed, and how far it had folded."""
        self.cursors = {p: cursors.get(p, 0) for p in self.sources}
        self.base = {}
        for name, model in self.models.items():
            state = model.export_state()
            for table in model.shared:
                self.base[(name, table)] = np.array(state[table], np.float64, ndmin=2)
        self._commits = 0

    def reserve(self, n_items: int) -> None:
        """Grow every replica to `n_items` rows before they are learned or folded into: a new row's base is
        the row as the model made it, so only what is learned or folded later counts as a change."""
        for name, model in self.models.items():
            model.reserve_items(n_items)
            state = model.export_state()
            for table in model.shared:
                base, now = self.base[(name, table)], state[table]
                if len(now) > len(base):
                    grown = np.zeros((len(now), max(base.shape[1], now.shape[1])))
                    grown[: len(base), : base.shape[1]] = base
                    grown[len(base) :, : now.shape[1]] = now[len(base) :]
                    self.base[(name, table)] = grown

    def scales(self) -> dict[tuple[str, str], float | None]:
        """The log2 scale of every decayed shared table now."""
        return {(name, table): model.decay_scale(table) for name, model in self.models.items()
                for table, how in model.shared.items() if how == "decayed"}

    def rescaled(self, before: dict[tuple[str, str], float | None]) -> None:
        """After learning: a decayed table whose clock moved forward had its counts scaled down by
        2 ** (before - after) (`models.decay`); its base follows, so the change stays what was learned."""
        for key, after in self.scales().items():
            old = before.get(key)
            if old is not None and after is not None and after > old:
                self.base[key] *= 2.0 ** (old - after)

    def publish(self, changed: list[tuple[str, str, np.ndarray, np.ndarray]]) -> bytes | None:
        """The log entry of one commit from its changed shared rows (model, table, rows, values): each row's
        change since the last commit, learned here (folded-in changes are in the base already)."""
        out, rows_named = [], set()
        for name, table, ids, values in changed:
            base = self._fit((name, table), values.shape[1])
            delta = values.astype(np.float64) - base[ids, : values.shape[1]]
            moved = delta.any(axis=1)
            base[ids, : values.shape[1]] = values
            if moved.any():
                how = self.models[name].shared[table]
                scale = self.models[name].decay_scale(table) if how == "decayed" else None
                out.append((name, table, scale, ids[moved], delta[moved]))
                rows_named.update(ids[moved].tolist())
        self._commits += 1
        if not out:
            return None
        names = self.featurizer.items.names
        return encode(out, {r: n for r in rows_named if r < len(names) and (n := names[r]) is not None})

    def trim(self) -> int:
        """Entries of this partition's item log every other partition has folded in (checked every
        `TRIM_EVERY` commits; 0 otherwise)."""
        if self._commits % TRIM_EVERY or not self.sources:
            return 0
        return log_trim(self.store.client, self.store.keys, self.sources)

    def fold(self) -> int:
        """Fold the other partitions' new log entries into the replicas; returns how many were folded."""
        keys = self.store.keys
        entries = []
        for source in self.sources:
            start = self.cursors[source]
            first, got = read_item_log(self.store.client, Keys(keys.prefix, keys.topic, source), start, FOLD_ENTRIES)
            if first > start:
                log.error("partition %s: %s changes of partition %s to the shared items were trimmed before they "
                          "were folded in here; its replica misses them", keys.partition, first - start, source)
            entries += [decode(entry) for entry in got]
            self.cursors[source] = first + len(got)
        names = {row: name for _, named in entries for row, name in named.items()}
        if names:
            for row, name in names.items():
                self.featurizer.items.put(name, row)
            self.know(np.fromiter(names, np.int64, len(names)))
            self.reserve(len(self.featurizer.items))
        self._absorb([tables for tables, _ in entries])
        return len(entries)

    def _absorb(self, entries: list[list[tuple[str, str, float | None, np.ndarray, np.ndarray]]]) -> None:
        """Fold the entries' deltas into the replicas. Each touched row's base moves by what folding
        changed in it (as the table keeps it, rounded), so that a commit publishes only what was learned
        here. Each model's state is exported once before and once after all entries."""
        parts: dict[tuple[str, str], list[np.ndarray]] = {}
        for tables in entries:
            for name, table, _, rows, _ in tables:
                model = self.models.get(name)
                if model is not None and table in model.shared:  # else a model this shard does not run
                    parts.setdefault((name, table), []).append(rows)
        touched = {key: np.unique(np.concatenate(rows)) for key, rows in parts.items()}
        before = self._values(touched)
        for tables in entries:
            for name, table, scale, rows, delta in tables:
                if (name, table) in touched:
                    self.models[name].absorb(table, rows, delta, scale)
        for key, after in self._values(touched).items():
            rows, old = touched[key], before[key]
            base = self._fit(key, after.shape[1])
            base[rows, : old.shape[1]] -= old
            base[rows, : after.shape[1]] += after

    def _values(self, touched: dict[tuple[str, str], np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
        """The current values of some rows of shared tables (model, table) -> rows, one export per model."""
        states: dict[str, dict] = {}
        out = {}
        for (name, table), rows in touched.items():
            if name not in states:
                states[name] = self.models[name].export_state()
            out[(name, table)] = np.array(states[name][table][rows], np.float64, ndmin=2)
        return out

    def _fit(self, key: tuple[str, str], width: int) -> np.ndarray:
        """The base of a table, at least `width` wide (new columns are zeros, as the tables' are)."""
        base = self.base[key]
        if base.shape[1] < width:
            base = self.base[key] = np.pad(base, ((0, 0), (0, width - base.shape[1])))
        return base
