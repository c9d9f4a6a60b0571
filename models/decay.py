"""Exponential time decay that costs nothing per event, shared by the count-based models."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_MAX_EXPONENT = 60.0  # move t0 forward before weights overflow float32 (Redis rows)


@njit(cache=True)
def growth(ts, t0, half_life):
    """`2 ** ((ts - t0) / half_life)`, the weight of an event at `ts` (a time, or an array of them)."""
    return np.exp2((ts - t0) / half_life)


class DecayClock:
    """Weights events by `2 ** ((ts - t0) / half_life)`, so older counts shrink relative to new ones.

    Every stored count decays alike, so nothing is touched per event; when the
    exponent grows large, `t0` moves forward and `advance` (or `weights`) returns the factor
    by which the caller must rescale all its counts.
    """

    def __init__(self, half_life: float):
        self.half_life = half_life
        self.t0: float | None = None

    def advance(self, ts: np.ndarray) -> float | None:
        """Make `t0` ready for events at `ts` [B]; returns the rescale factor (None: no rescale)."""
        if self.t0 is None:
            self.t0 = float(ts.min())
        shift = float(ts.max()) - self.t0
        if shift / self.half_life <= _MAX_EXPONENT:
            return None
        self.t0 += shift
        return 2.0 ** (-shift / self.half_life)

    def weights(self, ts: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Growth weights of events at `ts` [B], and the rescale factor (None: no rescale)."""
        rescale = self.advance(ts)
        return growth(ts, self.t0, self.half_life), rescale

    def export(self) -> np.ndarray:  # [1, 1]
        return np.array([[math.nan if self.t0 is None else self.t0]])

    def load(self, meta: np.ndarray) -> None:
        t0 = float(np.asarray(meta).ravel()[0])
        self.t0 = None if math.isnan(t0) else t0
