"""Prometheus metrics of one server, in a registry of its own (several apps may share a process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.latency = Histogram(
            "indicf5_request_seconds", "Request latency", ["endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.errors = Counter(
            "indicf5_request_errors_total", "Requests answered with an error", ["endpoint", "status"], registry=r
        )
        self.queue_depth = Gauge("indicf5_queue_depth", "Requests waiting for an inference worker", registry=r)
        self.batch_rows = Histogram(
            "indicf5_batch_rows",
            "Rows (utterance chunks) per engine batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "indicf5_batch_seconds", "Engine time per batch (sampling + vocoder)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.captures_after_ready = Gauge(
            "indicf5_engine_captures_after_ready",
            "CUDA graph shapes captured since /readyz turned ready (0 when load captured them all)",
            registry=r,
        )
        self.compiles_after_ready = Gauge(
            "indicf5_engine_compiles_after_ready",
            "torch.compile graphs compiled since /readyz turned ready",
            registry=r,
        )
        self.graph_memory = Gauge(
            "indicf5_engine_graph_memory_bytes",
            "Device memory held by the captured graphs and their buffers",
            registry=r,
        )
        self.stage_seconds = Histogram(
            "indicf5_stage_seconds",
            "Seconds a request spends in each stage: prepare (text, reference), queue, engine (its "
            "batch's loop on the device), vocoder_wait (behind its batch-mates' vocoding), vocoder, encode",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cancelled = Counter(
            "indicf5_requests_cancelled_total",
            "Queued requests dropped before inference (client gone or timed out)",
            registry=r,
        )
