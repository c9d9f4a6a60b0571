"""Drop detection: one ADWIN detector per (model, metric); a detected drop becomes an alert.

An alert is `{"ts", "model", "metric", "before", "after", "detector"}`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

DRIFT_METRICS = ("recall", "auc")  # the metrics watched for drops


class DriftWatcher:
    """ADWIN per (model, metric); alerts on drops only, then restarts that detector.

    `before` is the mean of the values ADWIN dropped, `after` the mean of those it kept.
    A change counts as a drop when after < before by at least `min_drop` (relative).

    ADWIN's bound assumes values in [0, 1], where a small metric moves too little for it
    to notice in time; so each detector sees its series divided by the mean of its first
    `reference` values (a relative scale, the same for all models).
    """

    def __init__(self, delta: float = 0.002, min_drop: float = 0.1, clock: int = 1, grace_period: int = 10,
                 reference: int = 10):
        self.delta, self.min_drop, self.clock, self.grace_period = delta, min_drop, clock, grace_period
        self.reference = reference
        self._detectors: dict[tuple[str, str], Any] = {}
        self._values: dict[tuple[str, str], deque] = {}
        self._ref: dict[tuple[str, str], list[float]] = {}

    def _detector(self, key: tuple[str, str]):
        from river.drift import ADWIN

        det = self._detectors.get(key)
        if det is None:
            det = self._detectors[key] = ADWIN(delta=self.delta, clock=self.clock, grace_period=self.grace_period)
            self._values[key] = deque(maxlen=100_000)
            self._ref[key] = []
        return det

    def _feed(self, key: tuple[str, str], value: float) -> None:
        ref = self._ref[key]
        if len(ref) < self.reference:
            ref.append(value)
        scale = sum(ref) / len(ref)
        self._detectors[key].update(value / scale if scale > 1e-12 else value)
        self._values[key].append(value)

    def update(self, model: str, metric: str, value: float, ts: float) -> dict | None:
        """Feed one value; the alert when it completes a drop, else None."""
        key = (model, metric)
        det = self._detector(key)
        values = self._values[key]
        before_width = det.width
        self._feed(key, value)
        if not det.drift_detected:
            return None
        # where the change happened: the split of ADWIN's window (before the cut) that
        # maximises the standardised mean difference; before/after are the means either side
        window = list(values)[-(int(before_width) + 1):]
        if len(window) < 2:
            return None
        split = change_point(window)
        old, new = window[:split], window[split:]
        before, after = sum(old) / len(old), sum(new) / len(new)
        # restart on the new regime only: one change, one alert
        del self._detectors[key]
        self._detector(key)
        for v in new:
            self._feed(key, v)
        if after < before * (1.0 - self.min_drop) and before - after > 1e-9:
            return {"ts": ts, "model": model, "metric": metric, "before": before, "after": after, "detector": "ADWIN"}
        return None


def change_point(values: list[float]) -> int:
    """The index splitting `values` into two runs with the most different means (CUSUM estimate)."""
    n = len(values)
    if n < 2:
        raise ValueError("need two values at least")
    total = sum(values)
    best, best_i, left = -1.0, 1, 0.0
    for i in range(1, n):
        left += values[i - 1]
        m1, m2 = left / i, (total - left) / (n - i)
        score = abs(m1 - m2) * math.sqrt(i * (n - i) / n)
        if score > best:
            best, best_i = score, i
    return best_i
