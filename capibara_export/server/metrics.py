"""The server's Prometheus metrics (prometheus-client, on a registry of its own), served by
process 0 at `GET /metrics`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("capibara_requests", "Inference requests received", ["model", "protocol"], registry=r)
        self.errors = Counter("capibara_request_errors", "Requests answered with an error, by kind",
                              ["model", "kind"], registry=r)
        self.latency = Histogram("capibara_request_latency_seconds", "From receipt to answer, successful requests",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("capibara_queue_wait_seconds", "From receipt to the start of its batch",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("capibara_batch_rows", "Real rows per batch run", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_size = Histogram("capibara_batch_size", "Compiled batch size each batch ran at", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.padded_rows = Counter("capibara_padded_rows", "Rows of padding run (never returned)", ["model"],
                                   registry=r)
        self.step_seconds = Histogram("capibara_step_seconds", "One lockstep step: broadcast, program, gather",
                                      ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.lockstep_seconds = Histogram("capibara_lockstep_seconds", "Process 0 telling every process a batch's "
                                          "step (header and padded inputs)", buckets=LATENCY_BUCKETS, registry=r)
        self.ceiling = Gauge("capibara_ceiling_rows_per_second", "Rows/s of the largest compiled batch run back to "
                             "back at start-up with no server in between (--measure-ceiling)", ["model"], registry=r)
        self.queue_depth = Gauge("capibara_queue_depth", "Requests waiting for a batch", registry=r)
        self.ready = Gauge("capibara_ready", "1 while every process has loaded and warmed every program and none "
                                             "is lost", registry=r)

    def batch_ran(self, batch, seconds: float, told_s: float = 0.0) -> None:
        name = batch.model.name
        self.lockstep_seconds.observe(told_s)
        self.batch_rows.labels(name).observe(batch.rows)
        self.batch_size.labels(name).observe(batch.size)
        self.padded_rows.labels(name).inc(batch.size - batch.rows)
        self.step_seconds.labels(name).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
