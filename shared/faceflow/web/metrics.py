"""Prometheus metrics of a faceflow server (`faceflow serve`, the GPU container), named after
Prometheus' conventions: a `faceflow_` prefix, base units (seconds, bytes), `_total` on counters.

Each server has its own registry (tests run several in one process) with the process
collector's `process_*` series (CPU seconds, resident memory), which `faceflow monitor` samples.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import ProcessCollector

# Seconds: a small photo on a GPU up to a slow video chunk.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """The series a faceflow server exposes at /metrics."""
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter("faceflow_http_requests_total", "HTTP requests answered, by route, method and status",
                                ("route", "method", "status"), registry=self.registry)
        self.failures = Counter("faceflow_http_request_failures_total",
                                "HTTP requests answered with a 5xx (a defect or an overload), by route",
                                ("route",), registry=self.registry)
        self.latency = Histogram("faceflow_http_request_duration_seconds",
                                 "time from the request's arrival to its answer, by route", ("route",),
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.faces = Counter("faceflow_faces_found_total", "faces found in photos and video frames",
                             registry=self.registry)
        self.frames = Counter("faceflow_frames_processed_total", "video frames processed", registry=self.registry)
        self.queue = Gauge("faceflow_queue_depth", "work waiting for a worker, by queue", ("queue",),
                           registry=self.registry)
        self.model_load = Gauge("faceflow_model_load_seconds", "time the last load of each model set took",
                                ("model",), registry=self.registry)
        self.jobs = Counter("faceflow_jobs_total", "jobs finished, by status", ("status",), registry=self.registry)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request."""
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        if status >= 500:
            self.failures.labels(route=route).inc()
        self.latency.labels(route=route).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
