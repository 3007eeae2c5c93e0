"""The server's Prometheus metrics (/metrics): requests and errors by status, queue depth, latency,
clip-cache hits, visual tokens before and after pruning. Each app has its own registry, so that two
servers in one process (tests, Ray replicas) count apart."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Telemetry:
    def __init__(self, queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("vidsparse_requests", "Chat completion requests answered, by HTTP status",
                                ["status"], registry=self.registry)
        self.latency = Histogram("vidsparse_request_seconds", "Chat completion latency (successful requests)",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.clip_cache = Counter("vidsparse_clip_cache", "Answers whose clip's shared work was cached (hit) or not",
                                  ["result"], registry=self.registry)
        self.visual_tokens = Counter("vidsparse_visual_tokens", "Visual tokens of answered requests, "
                                     "before pruning and after the last stage", ["when"], registry=self.registry)
        depth = Gauge("vidsparse_queue_depth", "Requests waiting for the inference thread", registry=self.registry)
        depth.set_function(queue_depth)

    def answered(self, stats: dict) -> None:
        """Count one answer from its `vidsparse` statistics."""
        self.clip_cache.labels(stats["clip_cache"]).inc()
        self.visual_tokens.labels("before").inc(stats["tokens"]["visual_before"])
        self.visual_tokens.labels("after").inc(stats["tokens"]["visual_after"])

    def finished(self, status: int, seconds: float | None = None) -> None:
        self.requests.labels(str(status)).inc()
        if seconds is not None:
            self.latency.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
