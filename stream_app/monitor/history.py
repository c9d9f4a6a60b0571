"""The monitor's bounded history in Redis, so charts and drift detectors resume after a restart.

One capped list per model (history points), one for lag samples, one for alerts, all under
`<prefix>:monitor:<metrics topic>`. The windowed tables are not here: faust restores them
from their changelog topics.

Each write is one pipelined round trip, not a transaction: its keys may sit in different slots of a
Redis Cluster, and a reader never needs a point and its trim together.
"""

from __future__ import annotations

import orjson

from stream_app.io.redis import connect


class RedisHistory:
    """Bounded history in Redis: a capped list per model, one for lag samples, one for alerts."""

    def __init__(self, url: str, prefix: str, topic: str, cap: int = 2000, timeout: float = 5.0):
        """Connect and ping, so an unreachable Redis fails here rather than on the first write."""
        self.client = connect(url, timeout=timeout)
        self.client.ping()
        self.base = f"{prefix}:monitor:{topic}"
        self.cap = cap

    def _push(self, key: str, item: dict) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(key, orjson.dumps(item))
        pipe.ltrim(key, -self.cap, -1)
        pipe.execute()

    def push_point(self, model: str, point: dict) -> None:
        key = f"{self.base}:history:{model}"
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(f"{self.base}:models", model)
        pipe.rpush(key, orjson.dumps(point))
        pipe.ltrim(key, -self.cap, -1)
        pipe.execute()

    def push_alert(self, alert: dict) -> None:
        self._push(f"{self.base}:alerts", alert)

    def push_lag(self, sample: dict) -> None:
        self._push(f"{self.base}:lag", sample)

    def load(self) -> tuple[dict[str, list[dict]], list[dict], list[dict]]:
        """(points per model, alerts, lag samples), oldest first."""
        models = sorted(m.decode() if isinstance(m, bytes) else m for m in self.client.smembers(f"{self.base}:models"))
        points = {m: [orjson.loads(x) for x in self.client.lrange(f"{self.base}:history:{m}", 0, -1)] for m in models}
        alerts = [orjson.loads(x) for x in self.client.lrange(f"{self.base}:alerts", 0, -1)]
        lag = [orjson.loads(x) for x in self.client.lrange(f"{self.base}:lag", 0, -1)]
        return points, alerts, lag
