"""Prometheus metrics: the seed's names plus what an operator needs to see queues, jobs and batches.

Three sources, one /metrics:
* API request metrics, per API process. Under gunicorn (`manage.py api`) prometheus-client's
  multiprocess mode is on (PROMETHEUS_MULTIPROC_DIR), so N requests to any of the gunicorn
  workers raise the counter by exactly N, within a second (tasks/request_tally.py counts them in memory).
* worker-side job metrics (jobs by final status, queue wait, inference time, batch size), kept in
  Redis by every worker (tasks/metrics.py): they add up across all workers on all hosts.
* cluster gauges read at scrape time (tasks/metrics_view.py, with webhooks/metrics.py): model memory per replica,
  active models, queue depth per device queue, live workers per device, webhook deliveries, dead letters, and the
  bytes and objects each owner makes the service keep (tasks/holdings.py).
Label values are bounded: endpoints are route templates, models come from models.yaml, owners are API keys and JWT
subjects (admins create them).

Who sees what (docs/SECURITY.md): the API's own request metrics go to anyone who may scrape; everything read from
Redis (models, queues, jobs, webhooks, dead letters, holdings) only to the roles that read the whole service
(api/blueprints/health.py SEES_DETAILS). That part is read at most once per CLUSTER_CACHE_S per API process, however
many scrapes ask.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tasks.cluster import ClusterState
from tasks.metrics_view import CachedCollector, ClusterCollector, dead_letter_families
from tasks.replication import replication_families
from tasks.request_tally import RequestTally
from webhooks.metrics import webhook_families

REQUESTS_TOTAL = "aethercore_requests_total"
REQUEST_DURATION = "aethercore_request_duration_seconds"
STREAMS_OPEN = "aethercore_stream_connections"
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The metrics read from Redis are read at most this often per API process.
CLUSTER_CACHE_S = 1.0


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def operations_families(client: Any) -> Any:
    """Webhook deliveries (every dispatcher's counts, the queue's depth), dead letters and Redis's replication (the
    primary, its replicas' lag), read at scrape time."""
    yield from webhook_families(client)
    yield from dead_letter_families(client)
    yield from replication_families(client)


class ApiMetrics:
    def __init__(self, app: Flask, cluster: ClusterState) -> None:
        self.multiprocess = multiprocess_enabled()
        # Single process: our own registry (several apps may live in one test process). Multiprocess:
        # values go to the shared directory and are read back by MultiProcessCollector at scrape.
        self.registry = None if self.multiprocess else CollectorRegistry()
        holdings = app.extensions["aethercore"].holdings
        self.cluster_registry = CollectorRegistry()
        collector = ClusterCollector(cluster, holdings, operations_families)
        self.cluster_registry.register(CachedCollector(collector, CLUSTER_CACHE_S))
        self.requests_total = Counter(
            REQUESTS_TOTAL, "HTTP requests handled", ["method", "endpoint", "status"], registry=self.registry
        )
        self.duration = Histogram(
            REQUEST_DURATION,
            "HTTP request duration",
            ["method", "endpoint"],
            registry=self.registry,
            buckets=DURATION_BUCKETS,
        )
        self.tally = RequestTally(self.requests_total, self.duration, DURATION_BUCKETS)
        self.streams = Gauge(
            STREAMS_OPEN,
            "Open streaming connections (WebSocket and SSE)",
            ["kind"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )

        @app.before_request
        def _start_timer() -> None:
            g.request_started = time.perf_counter()

        @app.after_request
        def _count(response: Response) -> Response:
            endpoint = request.url_rule.rule if request.url_rule else "unmatched"
            elapsed = time.perf_counter() - g.get("request_started", time.perf_counter())
            self.tally.count(request.method, endpoint, str(response.status_code), elapsed)
            return response

    def response(self, cluster: bool) -> Response:
        """The API's request metrics; with `cluster`, also everything read from Redis (cached). In the OpenMetrics
        format when the scraper asks for it (Accept: application/openmetrics-text; Prometheus does with exemplar
        storage on): the job histograms' exemplars (trace ids) are in that format only."""
        self.tally.flush()  # this process's requests are in its own answer at once (others' within FLUSH_S)
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        if "application/openmetrics-text" in request.headers.get("Accept", ""):
            from prometheus_client.openmetrics import exposition as openmetrics

            both = CollectorRegistry(auto_describe=False)
            both.register(_Together([registry, self.cluster_registry] if cluster else [registry]))
            return Response(openmetrics.generate_latest(both), content_type=openmetrics.CONTENT_TYPE_LATEST)
        text = generate_latest(registry)
        if cluster:
            text += generate_latest(self.cluster_registry)
        return Response(text, mimetype=CONTENT_TYPE_LATEST)


class _Together:
    """Several registries as one collector: the OpenMetrics format is one document with one `# EOF`."""

    def __init__(self, registries: list[Any]) -> None:
        self.registries = registries

    def collect(self) -> Any:
        for registry in self.registries:
            yield from registry.collect()


def init_metrics(app: Flask, cluster: ClusterState) -> ApiMetrics:
    return ApiMetrics(app, cluster)
