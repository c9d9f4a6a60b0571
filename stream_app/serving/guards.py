"""What keeps POST /events from being abused or from tying up the server: a per-key rate limit and a
circuit breaker around Kafka. Both are per process (each uvicorn worker keeps its own)."""

from __future__ import annotations

import math
import threading
import time


class RateLimiter:
    """A token bucket per key: `rate` requests a second on average, bursts of up to `burst`.

    `take(name)` returns 0 when the request may go ahead, else the seconds until it may
    (the `Retry-After` of the 429). A `rate` of 0 turns the limit off.
    """

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, name: str) -> float:
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(name, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[name] = (tokens - 1.0, now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (1.0 - tokens) / self.rate


class CircuitBreaker:
    """After a failure, refuse at once for `cooldown` seconds instead of waiting for a dead service again.

    `open_for()` is the seconds left (0 when closed); a success closes it, a failure (re)opens it.
    While it is open, no request waits on the service, so a dead Kafka cannot fill the thread pool.
    """

    def __init__(self, cooldown: float):
        self.cooldown = cooldown
        self._until = 0.0
        self.failures = 0

    def open_for(self) -> float:
        return max(0.0, self._until - time.monotonic())

    def retry_after(self) -> int:
        """Whole seconds for a `Retry-After` header (at least 1)."""
        return max(1, math.ceil(self.open_for()))

    def failed(self) -> None:
        self.failures += 1
        self._until = time.monotonic() + self.cooldown

    def succeeded(self) -> None:
        self._until = 0.0
