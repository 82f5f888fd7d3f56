"""The station's Prometheus metrics (``prometheus_client``), one registry per station."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.inspections = Counter("clad_inspections", "Inspections committed to the history",
                                   ["model", "decision"], registry=r)
        self.request_seconds = Histogram("clad_request_seconds", "HTTP request latency (arrival to response)",
                                         ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("clad_queue_depth", "Inspections waiting for a batch", registry=r)
        self.batch_size = Histogram("clad_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.errors = Counter("clad_errors", "Requests refused or failed, by kind", ["kind"], registry=r)
        self.stage_seconds = Histogram("clad_stage_seconds", "Seconds per batch in each stage of an inspection",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)

    def text(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
