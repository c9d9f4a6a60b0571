"""The lookup API's Prometheus metrics: request latency and counts, and the freshness of the cached shards."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from stream_app.serving.cache import ModelCache

LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)


class ApiMetrics:
    """The instruments, in a registry of their own (one per app, so apps in one process do not clash)."""

    content_type = CONTENT_TYPE_PLAIN_0_0_4  # the classic text format every Prometheus scrapes

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        self.latency = Histogram("streamrec_api_request_seconds", "Request latency by endpoint", ["endpoint"],
                                 registry=registry, buckets=LATENCY_BUCKETS)
        self.requests = Counter("streamrec_api_requests", "Requests by endpoint and status", ["endpoint", "status"],
                                registry=registry)
        self.cache_age = Gauge("streamrec_api_cache_age_seconds",
                               "Seconds since the shard's version was last confirmed", ["partition"], registry=registry)
        self.view_age = Gauge("streamrec_api_view_age_seconds", "Seconds since the shard's view was loaded from Redis",
                              ["partition"], registry=registry)
        self.version = Gauge("streamrec_api_model_version", "Shard version (worker commits) being served",
                             ["partition"], registry=registry)
        self.served = Gauge("streamrec_api_model_served", "Models with state in each shard", ["partition", "model"],
                            registry=registry)
        self.reloads = Gauge("streamrec_api_cache_reloads", "Shard reloads from Redis so far", registry=registry)
        self.full_reloads = Gauge("streamrec_api_cache_full_reloads",
                                  "Shard reloads that read the whole shard (the others re-read the rows commits changed)",
                                  registry=registry)
        self.reload_s = Gauge("streamrec_api_cache_last_reload_seconds", "Duration of the last shard reload",
                              registry=registry)

    def render(self, cache: ModelCache) -> bytes:
        """The exposition text, with the cache gauges read now."""
        now = time.monotonic()
        for p, (view, checked) in cache.cached().items():
            self.cache_age.labels(str(p)).set(now - checked)
            self.view_age.labels(str(p)).set(now - view.loaded_at)
            self.version.labels(str(p)).set(view.version)
            for name in cache.model_names:
                self.served.labels(str(p), name).set(1 if name in view.models else 0)
        self.reloads.set(cache.reloads)
        self.full_reloads.set(cache.full_reloads)
        self.reload_s.set(cache.last_reload_seconds)
        return generate_latest(self.registry)


class MeasureRequests:
    """Pure ASGI middleware: latency histogram and request counter per route (no BaseHTTPMiddleware cost)."""

    def __init__(self, app, metrics: ApiMetrics):
        self.app = app
        self.latency = metrics.latency
        self.requests = metrics.requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.latency.labels(endpoint).observe(time.perf_counter() - started)
            self.requests.labels(endpoint, str(status[0])).inc()
