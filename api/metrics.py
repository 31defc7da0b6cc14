"""Prometheus metrics of the API process (names from the seed; labels bounded by config and routes)."""

from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tasks.cluster import ClusterState

REQUESTS_TOTAL = "aethercore_requests_total"
REQUEST_DURATION = "aethercore_request_duration_seconds"
MODEL_MEMORY = "aethercore_model_memory_usage_bytes"
ACTIVE_MODELS = "aethercore_active_models"


class ClusterCollector:
    """Model memory and active models, read from the workers' heartbeat records at scrape time."""

    def __init__(self, cluster: ClusterState) -> None:
        self.cluster = cluster

    def collect(self):
        memory = GaugeMetricFamily(MODEL_MEMORY, "Memory held by a resident model replica",
                                   labels=["model", "worker", "device"])
        active = GaugeMetricFamily(ACTIVE_MODELS, "Models resident on at least one live worker")
        try:
            workers = self.cluster.live_workers()
        except Exception:  # a scrape during a Redis outage still returns the request metrics
            workers = None
        if workers is not None:
            models = set()
            for record in workers:
                for model_id, info in record.get("models", {}).items():
                    if info.get("state") == "loaded":
                        models.add(model_id)
                        memory.add_metric([model_id, record["name"], record["device"]], info.get("memory_bytes", 0))
            active.add_metric([], len(models))
            yield memory
            yield active


def init_metrics(app: Flask, cluster: ClusterState) -> CollectorRegistry:
    registry = CollectorRegistry()
    requests_total = Counter(REQUESTS_TOTAL, "HTTP requests handled", ["method", "endpoint", "status"],
                             registry=registry)
    duration = Histogram(REQUEST_DURATION, "HTTP request duration", ["method", "endpoint"], registry=registry,
                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
    registry.register(ClusterCollector(cluster))

    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        elapsed = time.perf_counter() - g.get("request_started", time.perf_counter())
        requests_total.labels(request.method, endpoint, str(response.status_code)).inc()
        duration.labels(request.method, endpoint).observe(elapsed)
        return response

    return registry


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
