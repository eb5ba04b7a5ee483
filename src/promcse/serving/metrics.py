"""Prometheus metrics of the server (``GET /metrics``, text exposition format, via ``prometheus-client``).

- ``promcse_requests_total{endpoint, model, status}`` and ``promcse_request_seconds{endpoint}`` (histogram);
  ``model`` is bounded: only the ``top_models`` names with the most requests so far have their own label value,
  every other model's requests count as ``other`` (a name that overtakes the least-used labelled one takes its
  place, and the displaced name's series are removed), and a request that named no model is ``-``;
- ``promcse_queue_tokens`` / ``promcse_queue_requests``: what waits in the batching engine;
- ``promcse_batch_rows``, ``promcse_batch_tokens`` (padded rows x longest row) and ``promcse_batch_seconds``
  per forward pass of the engine;
- with a prompt store: ``promcse_prompt_cache_bytes`` / ``promcse_prompt_cache_prompts`` (loaded now),
  ``promcse_prompt_cache_budget_bytes`` (``--prompt-cache-mb``), ``promcse_prompt_loads_total`` and
  ``promcse_prompt_evictions_total`` (since start), read from the store at scrape time.

Each app has its own collector registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

ENDPOINTS: tuple[str, ...] = ("/embed", "/similarity", "/search", "/v1/embeddings", "/v1/models", "/models",
                              "/health", "/metrics", "/", "/v1/prompts")


OTHER = "other"  # the label value of the models beyond the top ones


class ServerMetrics:
    """The server's counters, gauges and histograms; ``top_models`` bounds the ``model`` label's values."""

    def __init__(self, top_models: int = 50) -> None:
        from prometheus_client import CollectorRegistry, Gauge, Histogram
        from prometheus_client import Counter as PromCounter

        self.collectors = CollectorRegistry()
        self.top_models = top_models
        self.traffic: Counter[str] = Counter()  # requests per model name (only names that resolved to a model)
        self.series: dict[str, set[tuple[str, str]]] = {}  # labelled name -> its (endpoint, status) series
        r = self.collectors
        self.requests = PromCounter("promcse_requests", "HTTP requests by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram("promcse_request_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.queue_tokens = Gauge("promcse_queue_tokens", "tokens waiting in the batching engine", registry=r)
        self.queue_requests = Gauge("promcse_queue_requests", "requests waiting or in progress", registry=r)
        self.batch_rows = Histogram("promcse_batch_rows", "rows per forward pass", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_tokens = Histogram("promcse_batch_tokens", "padded tokens per forward pass", registry=r,
                                      buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768))
        self.batch_seconds = Histogram("promcse_batch_seconds", "seconds per forward pass", registry=r,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def watch_queue(self, tokens: Callable[[], float], requests: Callable[[], float]) -> None:
        """Read the queue gauges from the engine at scrape time."""
        self.queue_tokens.set_function(tokens)
        self.queue_requests.set_function(requests)

    def watch_store(self, store: Any) -> None:
        """Expose a :class:`promcse.serving.store.PromptStore`'s cache at scrape time."""
        self.collectors.register(StoreCollector(store))

    def on_batch(self, rows: int, tokens: int, seconds: float) -> None:
        """Record one forward pass of the batching engine."""
        self.batch_rows.observe(rows)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)

    def observe(self, path: str, model: str | None, status: int, seconds: float) -> None:
        """Record one finished request (unknown paths are counted as ``other``: bounded label values)."""
        endpoint = path if path in ENDPOINTS else "/v1/prompts/{name}" if path.startswith("/v1/prompts/") else "other"
        label = self.model_label(model)
        if label in self.series:
            self.series[label].add((endpoint, str(status)))
        self.requests.labels(endpoint, label, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def model_label(self, model: str | None) -> str:
        """The ``model`` label value of one more request for ``model``: itself while among the top names by
        requests, else ``other`` (``-`` for none)."""
        if not model:
            return "-"
        self.traffic[model] += 1
        if model in self.series:
            return model
        if len(self.series) >= self.top_models:
            coldest = min(self.series, key=lambda name: self.traffic[name], default=None)
            if coldest is None or self.traffic[model] <= self.traffic[coldest]:
                return OTHER
            for endpoint, status in self.series.pop(coldest):  # displaced: its series go, its requests are "other"
                self.requests.remove(endpoint, coldest, status)
        self.series[model] = set()
        return model

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.collectors), CONTENT_TYPE_LATEST


class StoreCollector:
    """The prompt store's cache as Prometheus metrics, read when scraped (a custom collector: the loads and
    evictions are the store's own counts, exposed as counters without a second tally here)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        store = self.store
        yield GaugeMetricFamily("promcse_prompt_cache_bytes", "bytes of store prompts loaded now (prompt + head "
                                "tensors)", value=store.cached_bytes)
        yield GaugeMetricFamily("promcse_prompt_cache_prompts", "store prompts loaded now",
                                value=len(store.loaded()))
        yield GaugeMetricFamily("promcse_prompt_cache_budget_bytes", "the prompt cache's budget",
                                value=store.budget_bytes)
        yield CounterMetricFamily("promcse_prompt_loads", "store prompts loaded since start", value=store.loads)
        yield CounterMetricFamily("promcse_prompt_evictions", "store prompts evicted from the cache since start",
                                  value=store.evictions)


class MetricsMiddleware:
    """ASGI middleware: time every HTTP request and count it with the model the handler chose."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import time

        start, status = time.perf_counter(), [500]

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            model = (scope.get("state") or {}).get("model")
            self.metrics.observe(scope.get("path", ""), model, status[0], time.perf_counter() - start)
