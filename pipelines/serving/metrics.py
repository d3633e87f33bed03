"""What ``GET /metrics`` says, in Prometheus' text format (``prometheus_client``): requests by status, errors, shed
requests by reason, the latency of accepted requests, images per forward pass, the queue, the versions answering,
connections cut and clients gone, and the inference log's records written and dropped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Latency buckets, in seconds: from a lone small request to a deadline's worth.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """One server's metrics, in a registry of their own (several apps may live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("siamese_requests", "Requests answered on /invocations, by HTTP status.", ["status"],
                                registry=r)
        self.errors = Counter("siamese_request_errors", "Requests answered with an error other than shedding "
                              "(4xx, 5xx), by HTTP status.", ["status"], registry=r)
        self.shed = Counter("siamese_shed_requests", "Requests answered 503 with Retry-After because they could not be "
                            "answered in time, by the limit: queue (serving.queue_images) or deadline "
                            "(serving.deadline_ms).", ["reason"], registry=r)
        self.latency = Histogram("siamese_request_seconds", "From a request's arrival to its answer, for requests "
                                 "answered 200.", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("siamese_batch_images", "Images per forward pass.", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.refused = Counter("siamese_refused_connections", "Connections cut before the app saw a request: head over "
                               "serving.max_header_bytes (431) or slower than serving.header_seconds (408).",
                               ["status"], registry=r)
        self.disconnects = Counter("siamese_client_disconnects", "Clients gone before their request's body arrived.",
                                   registry=r)
        self.queue = Gauge("siamese_queue_images", "Images taken on and not yet answered.", registry=r)

    def follow(self, served, batcher) -> None:
        """Report the queue of ``batcher`` and the versions and logs of ``served`` (a
        :class:`pipelines.serving.following.Served`) as they are when scraped."""
        self.queue.set_function(lambda: batcher.pending)
        self.registry.register(_Served(served))


class _Served(Collector):
    """The versions answering and their inference logs' counts, read when scraped."""

    def __init__(self, served):
        self.served = served

    def collect(self):
        versions = GaugeMetricFamily("siamese_serving_version", "1 for each version answering, by role and version.",
                                     labels=["model", "role", "version"])
        written = CounterMetricFamily("siamese_log_records_written", "Inference log records written.", labels=["role"])
        dropped = CounterMetricFamily("siamese_log_records_dropped", "Inference log records dropped (queue full, "
                                      "store failing).", labels=["role"])
        for role, loaded in self.served.answering().items():
            versions.add_metric([self.served.model_uri, role, loaded.version or "local"], 1)
            if loaded.inference_log is not None:
                stats = loaded.inference_log.stats()
                written.add_metric([role], stats["written"])
                dropped.add_metric([role], stats["dropped"])
        yield from (versions, written, dropped)
