"""Prometheus metrics, kept in a registry per app (no process-global state, so tests can run several apps)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmbridge.engine.types import EngineStats

if TYPE_CHECKING:
    from vlmbridge.pool import ModelPool

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "MetricsMiddleware"]

_ENGINE_GAUGES = (
    ("vlmbridge_queue_depth", "Requests waiting for the engine.", "queue_depth"),
    ("vlmbridge_running_requests", "Requests the engine is generating for.", "running"),
    ("vlmbridge_decode_steps", "Decode steps the engine has run.", "decode_steps"),
    ("vlmbridge_prefill_batches", "Prefill passes the engine has run.", "prefill_batches"),
    ("vlmbridge_cancelled_requests", "Requests stopped because the client went away (or a stop string ended them).",
     "cancelled"),
    ("vlmbridge_decode_steps_after_cancel",
     "Decode steps requests took part in after they were cancelled (at most one each).", "steps_after_cancel"),
    ("vlmbridge_worker_shared_input_bytes",
     "Image and video bytes handed to the model's worker process in shared memory instead of through its socket.",
     "shared_input_bytes"),
)  # fmt: skip
_CACHE_STATS = ("hits", "misses", "evictions", "bytes", "entries")


class _PoolCollector(Collector):
    """Each model's engine stats as gauges labelled `model`, read at scrape time; caches by name, whichever the
    backend keeps. Models that are not loaded have no engine gauges, only `vlmbridge_model_ready` 0."""

    def __init__(self, pool: ModelPool) -> None:
        self._pool = pool

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: engines come and go

    def collect(self) -> Iterable[Metric]:
        slots = list(self._pool.slots.values())
        ready = GaugeMetricFamily(
            "vlmbridge_model_ready", "1 when the model is loaded and warmed up.", labels=["model"]
        )
        in_flight = GaugeMetricFamily(
            "vlmbridge_requests_in_flight", "Requests holding the model (chat and tokenize).", labels=["model"]
        )
        memory = GaugeMetricFamily(
            "vlmbridge_model_memory_bytes", "What the model's worker holds (PSS), or its plan in-process.",
            labels=["model"],
        )  # fmt: skip
        gauges = {name: GaugeMetricFamily(name, doc, labels=["model"]) for name, doc, _ in _ENGINE_GAUGES}
        caches = GaugeMetricFamily(
            "vlmbridge_cache",
            "Prefix (KV), vision-encoder and processed-pixel cache counters: hits, misses, evictions, bytes, entries.",
            labels=["model", "cache", "stat"],
        )
        for slot in slots:
            ready.add_metric([slot.name], 1.0 if slot.state == "ready" else 0.0)
            in_flight.add_metric([slot.name], float(slot.in_flight))
            memory.add_metric([slot.name], float(slot.memory_bytes()))
            engine = slot.peek()
            stats = engine.stats() if engine is not None else EngineStats()
            for name, _, field in _ENGINE_GAUGES:
                gauges[name].add_metric([slot.name], float(getattr(stats, field)))
            for cache, counters in sorted(stats.caches.items()):
                for stat in _CACHE_STATS:
                    caches.add_metric([slot.name, cache, stat], float(getattr(counters, stat)))
        yield ready
        yield in_flight
        yield memory
        yield from gauges.values()
        yield caches


_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vlmbridge_requests", "Requests answered, by endpoint and HTTP status.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "vlmbridge_request_latency_seconds", "Time from arrival to the last byte.", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "vlmbridge_time_to_first_token_seconds", "Time from arrival to the first generated token.", ["model"],
            buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "vlmbridge_prompt_tokens", "Prompt tokens, image tokens included.", ["model"], registry=r
        )
        self.image_tokens = Counter("vlmbridge_image_tokens", "Image tokens in prompts.", ["model"], registry=r)
        self.video_tokens = Counter("vlmbridge_video_tokens", "Video tokens in prompts.", ["model"], registry=r)
        self.completion_tokens = Counter("vlmbridge_completion_tokens", "Generated tokens.", ["model"], registry=r)

    def bind_pool(self, pool: ModelPool) -> None:
        """Read each model's typed stats snapshot at scrape time (any backend: nothing here knows which)."""
        self.registry.register(_PoolCollector(pool))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every response by endpoint and status, and times it to the last body byte (streams included)."""

    _ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/models", "/v1/tokenize", "/tokenize", "/health", "/metrics"})

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self._ENDPOINTS else "other"  # bounded label values
        started = time.monotonic()
        status = 500
        counted = False

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.metrics.requests.labels(endpoint, str(status)).inc()
                self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count()
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            count()  # a response cut short (a bug mid-stream, a dropped client) still counts, under its status
