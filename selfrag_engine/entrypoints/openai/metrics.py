"""The server's Prometheus metrics (`GET /metrics`) and the middleware that counts responses."""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from selfrag_engine.retrieval.batched import SearchStats


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("selfrag_requests_in_flight", "requests and queries admitted, not finished",
                                 registry=r)
        self.running_rows = Gauge("selfrag_running_rows", "sequences the scheduler runs", registry=r)
        self.kv_used = Gauge("selfrag_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_free = Gauge("selfrag_kv_blocks_free", "KV cache blocks free", registry=r)
        self.kv_capacity = Gauge("selfrag_kv_cache_capacity_tokens", "tokens the KV pool holds, by its dtype",
                                 ["dtype"], registry=r)
        self.kv_bytes = Gauge("selfrag_kv_cache_bytes", "bytes of the KV pool (keys, values, scales)", registry=r)
        self.tokens = Counter("selfrag_generated_tokens", "tokens generated for requests (rate() gives tokens/s)",
                              registry=r)
        self.tokens_seen = 0
        self.requests = Counter("selfrag_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("selfrag_time_to_first_token_seconds", "time to the first streamed token",
                              registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.latency = Histogram("selfrag_request_latency_seconds", "end-to-end latency by endpoint",
                                 ["endpoint"], registry=r,
                                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.searches = Counter("selfrag_searches", "retriever searches (queries)", registry=r)
        self.search_batches = Counter("selfrag_search_batches", "batches the searches went in", registry=r)
        self.search_seen = (0, 0)

    def count_searches(self, stats: SearchStats) -> None:
        queries, batches = stats.queries, stats.batches
        self.searches.inc(queries - self.search_seen[0])
        self.search_batches.inc(batches - self.search_seen[1])
        self.search_seen = (queries, batches)

    def update(self, stats: dict[str, Any], pending: int, generated_tokens: int) -> None:
        """The gauges from the engine's stats (`engine_stats`, read on the loop) and the loop's counters."""
        self.queue_depth.set(pending)
        self.running_rows.set(stats["running"])
        self.kv_used.set(stats["used"])
        self.kv_free.set(stats["free"])
        self.kv_capacity.labels(stats["kv_dtype"]).set(stats["kv_capacity_tokens"])
        self.kv_bytes.set(stats["kv_cache_bytes"])
        # Tokens of every request the loop streamed or answered, cancelled ones included up to their cut.
        self.tokens.inc(generated_tokens - self.tokens_seen)
        self.tokens_seen = generated_tokens


def engine_stats(engine) -> dict[str, int | str]:
    """What /metrics reads of the engine; called on the loop's thread."""
    stats = engine.cache_stats()
    return {"used": stats["used"], "free": stats["free"], "running": engine.num_running(),
            "kv_capacity_tokens": stats["kv_capacity_tokens"], "kv_cache_bytes": stats["kv_cache_bytes"],
            "kv_dtype": str(engine.kv_cache_dtype).removeprefix("torch.")}


class CountRequests:
    """Counts responses by path and status. A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide
    a client's disconnect from the endpoints, which cancel their work on it."""

    def __init__(self, app, counter: Counter):
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            # The route's template, never the raw path: a client's random paths must not grow the metrics.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.counter.labels(route, str(status["code"])).inc()
