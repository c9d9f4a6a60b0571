"""Exponential time decay that costs nothing per event, shared by the count-based models.

Counts are kept as sums of `weight * 2 ** ((ts - t0) / half_life)`: every stored count decays
alike, so nothing is touched per event, and `t0 / half_life` is their log2 scale. However far
time jumps, an event's weight is finite and non-zero, and relative weights stay right:

* forward: when a batch's latest `ts` is more than `MAX_EXPONENT` half-lives after `t0`, `t0`
  moves there and every count is multiplied by the factor `advance` returns (counts that many
  half-lives old may round to 0: their weight is below what a float holds);
* backward: an event up to `MAX_LAG` half-lives before `t0` is a late event and weighs what its
  age says; one further back weighs `2 ** -MAX_LAG`. When a whole batch is that far back, time
  went back (a replay started again, or a future `ts` had moved the clock): `t0` moves back to
  it and the counts carry over as they are, so the new events count in full.

The clock moves once per batch, so a batch split at other points can differ after such a jump.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from numba import njit

MAX_EXPONENT = 60.0  # half-lives: counts stay below 2 ** 60 per event, within float32 (Redis rows)
MAX_LAG = 64.0  # half-lives: the lightest weight, 2 ** -64, is still a normal float32


@njit(cache=True)
def growth(ts, t0, half_life):
    """`2 ** ((ts - t0) / half_life)`, at least `2 ** -MAX_LAG`: the weight of an event at `ts` (a time,
    or an array of them)."""
    return np.exp2(np.maximum((ts - t0) / half_life, -MAX_LAG))


class DecayClock:
    """The `t0` of a model's decayed counts (see the module doc): where it is, and when it moves."""

    def __init__(self, half_life: float):
        self.half_life = half_life
        self.t0: float | None = None
        self._held = False

    @property
    def scale(self) -> float | None:
        """`t0 / half_life`, the log2 scale of the counts (None before the first event)."""
        return None if self.t0 is None else self.t0 / self.half_life

    def rebase(self, scale: float) -> float:
        """The factor that brings counts kept at the log2 scale `scale` to this clock's (which starts
        there when it has not started yet)."""
        if self.t0 is None:
            self.t0 = scale * self.half_life
        return float(2.0 ** np.clip(scale - self.t0 / self.half_life, -MAX_LAG, MAX_EXPONENT))

    def advance(self, ts: np.ndarray) -> float | None:
        """Make `t0` ready for a batch of events at `ts` [B]; returns the factor by which the caller must
        multiply all its counts (None: leave them)."""
        if self._held or not len(ts):
            return None
        latest = float(ts.max())
        if self.t0 is None:
            self.t0 = float(ts.min())
        exponent = (latest - self.t0) / self.half_life  # finite ts: never NaN, may be +-inf
        if -MAX_LAG <= exponent <= MAX_EXPONENT:
            return None
        self.t0 = latest
        return 2.0 ** -exponent if exponent > 0 else None

    def weights(self, ts: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Growth weights of events at `ts` [B], and the factor for every count (None: leave them)."""
        rescale = self.advance(ts)
        return growth(ts, self.t0, self.half_life), rescale

    @contextmanager
    def held(self) -> Iterator[None]:
        """Keep `t0` where it is: `learn_scored` moves it once for the batch, then learns it in parts."""
        self._held = True
        try:
            yield
        finally:
            self._held = False

    def export(self) -> np.ndarray:  # [1, 1]
        return np.array([[math.nan if self.t0 is None else self.t0]])

    def load(self, meta: np.ndarray) -> None:
        t0 = float(np.asarray(meta).ravel()[0])
        self.t0 = None if math.isnan(t0) else t0
