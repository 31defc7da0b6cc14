"""Prometheus metrics: the seed's names plus what an operator needs to see queues, jobs and batches.

Three sources, one /metrics:
* API request metrics, per API process. Under gunicorn (`manage.py api`) prometheus-client's
  multiprocess mode is on (PROMETHEUS_MULTIPROC_DIR), so N requests to any of the gunicorn
  workers raise the counter by exactly N.
* worker-side job metrics (jobs by final status, queue wait, inference time, batch size), kept in
  Redis by every worker (tasks/metrics.py): they add up across all workers on all hosts.
* cluster gauges read at scrape time: model memory per replica, active models, queue depth per
  device queue, live workers per device.
Label values are bounded: endpoints are route templates, models come from models.yaml.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tasks import metrics as worker_metrics
from tasks.cluster import ClusterState
from tasks.names import CPU_QUEUE, queue_for_device
from tasks.states import LOADED

REQUESTS_TOTAL = "aethercore_requests_total"
REQUEST_DURATION = "aethercore_request_duration_seconds"
MODEL_MEMORY = "aethercore_model_memory_usage_bytes"
ACTIVE_MODELS = "aethercore_active_models"
QUEUE_DEPTH = "aethercore_queue_depth"
LIVE_WORKERS = "aethercore_live_workers"
STREAMS_OPEN = "aethercore_stream_connections"


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class ClusterCollector:
    """Everything read from Redis at scrape time (see the module docstring)."""

    def __init__(self, cluster: ClusterState) -> None:
        self.cluster = cluster

    def collect(self):
        try:
            workers = self.cluster.live_workers()
            counters, histograms = worker_metrics.read(self.cluster.redis)
            devices = (
                {CPU_QUEUE}
                | {w["device"] for w in workers}
                | {e["device"] for e in self.cluster.all_desired().values()}
            )
            depths = {d: self.cluster.redis.llen(queue_for_device(d)) for d in sorted(devices)}
        except Exception:  # a scrape during a Redis outage still returns the API's own metrics
            return
        memory = GaugeMetricFamily(
            MODEL_MEMORY, "Memory held by a resident model replica", labels=["model", "worker", "device"]
        )
        models = set()
        for record in workers:
            for model_id, info in record.get("models", {}).items():
                if info.get("state") == LOADED:
                    models.add(model_id)
                    memory.add_metric([model_id, record["name"], record["device"]], info.get("memory_bytes", 0))
        yield memory
        yield GaugeMetricFamily(ACTIVE_MODELS, "Models resident on at least one live worker", value=len(models))

        live = GaugeMetricFamily(LIVE_WORKERS, "Workers with a fresh heartbeat, per device", labels=["device"])
        for device in sorted(devices):
            live.add_metric([device], sum(1 for w in workers if w["device"] == device))
        yield live
        depth = GaugeMetricFamily(QUEUE_DEPTH, "Messages waiting in a device queue", labels=["queue"])
        for device, value in depths.items():
            depth.add_metric([queue_for_device(device)], value)
        yield depth

        jobs = CounterMetricFamily(
            worker_metrics.JOBS_TOTAL,
            worker_metrics.HELP[worker_metrics.JOBS_TOTAL],
            labels=["kind", "model", "status"],
        )
        tokens = CounterMetricFamily(
            worker_metrics.GENERATED_TOKENS, worker_metrics.HELP[worker_metrics.GENERATED_TOKENS], labels=["model"]
        )
        for key, value in sorted(counters.items()):
            if key[0] == worker_metrics.GENERATED_TOKENS:
                tokens.add_metric([key[1]], value)
            else:
                jobs.add_metric(list(key), value)
        yield jobs
        yield tokens
        yield from self._decoding(workers)
        for metric in worker_metrics.BUCKETS:
            family = HistogramMetricFamily(metric, worker_metrics.HELP[metric], labels=["model"])
            for model, parts in sorted(histograms.get(metric, {}).items()):
                family.add_metric(
                    [model], worker_metrics.cumulative_buckets(metric, parts), sum_value=parts.get("sum", 0.0)
                )
            yield family

    @staticmethod
    def _decoding(workers: list[dict]) -> Any:
        running = GaugeMetricFamily(
            worker_metrics.GENERATION_RUNNING, worker_metrics.HELP[worker_metrics.GENERATION_RUNNING], labels=["model"]
        )
        waiting = GaugeMetricFamily(
            worker_metrics.GENERATION_WAITING, worker_metrics.HELP[worker_metrics.GENERATION_WAITING], labels=["model"]
        )
        totals: dict[str, list[int]] = {}
        for record in workers:
            for model_id, info in record.get("models", {}).items():
                if info.get("decoding"):
                    total = totals.setdefault(model_id, [0, 0])
                    total[0] += info["decoding"].get("running", 0)
                    total[1] += info["decoding"].get("waiting", 0)
        for model_id, (run, wait) in sorted(totals.items()):
            running.add_metric([model_id], run)
            waiting.add_metric([model_id], wait)
        yield running
        yield waiting


class ApiMetrics:
    def __init__(self, app: Flask, cluster: ClusterState) -> None:
        self.multiprocess = multiprocess_enabled()
        # Single process: our own registry (several apps may live in one test process). Multiprocess:
        # values go to the shared directory and are read back by MultiProcessCollector at scrape.
        self.registry = None if self.multiprocess else CollectorRegistry()
        self.cluster_collector = ClusterCollector(cluster)
        self.requests_total = Counter(
            REQUESTS_TOTAL, "HTTP requests handled", ["method", "endpoint", "status"], registry=self.registry
        )
        self.duration = Histogram(
            REQUEST_DURATION,
            "HTTP request duration",
            ["method", "endpoint"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.streams = Gauge(
            STREAMS_OPEN,
            "Open streaming connections (WebSocket and SSE)",
            ["kind"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        if self.registry is not None:
            self.registry.register(self.cluster_collector)

        @app.before_request
        def _start_timer() -> None:
            g.request_started = time.perf_counter()

        @app.after_request
        def _count(response: Response) -> Response:
            endpoint = request.url_rule.rule if request.url_rule else "unmatched"
            elapsed = time.perf_counter() - g.get("request_started", time.perf_counter())
            self.requests_total.labels(request.method, endpoint, str(response.status_code)).inc()
            self.duration.labels(request.method, endpoint).observe(elapsed)
            return response

    def response(self) -> Response:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(self.cluster_collector)
        else:
            registry = self.registry
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def init_metrics(app: Flask, cluster: ClusterState) -> ApiMetrics:
    return ApiMetrics(app, cluster)
