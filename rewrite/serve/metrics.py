"""The server's Prometheus metrics, in a registry of its own (one per app)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rewrite_requests", "Requests by outcome (ok, cancelled, rejected, error).",
                                ["outcome"], registry=r)
        self.prompt = Counter("rewrite_prompt_tokens", "Prompt tokens of admitted completions.", registry=r)
        self.generated = Counter("rewrite_generation_tokens", "Tokens generated.", registry=r)
        self.batch_size = Histogram("rewrite_batch_size", "Rows per ONNX Runtime call (prefill or decoding step).",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("rewrite_queue_depth", "Requests waiting to be admitted.", registry=r)
        self.running = Gauge("rewrite_running_requests", "Requests being decoded.", registry=r)
        self.latency = Histogram("rewrite_request_latency_seconds", "Time from a request's arrival to its last token.",
                                 registry=r)
        self.first_token = Histogram("rewrite_time_to_first_token_seconds",
                                     "Time from a request's arrival to its first text.", registry=r)
