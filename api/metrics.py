"""Prometheus metrics: the seed's names plus what an operator needs to see queues, jobs and batches.

Three sources, one /metrics:
* API request metrics, per API process. Under gunicorn (`manage.py api`) prometheus-client's
  multiprocess mode is on (PROMETHEUS_MULTIPROC_DIR), so N requests to any of the gunicorn
  workers raise the counter by exactly N, within a second (tasks/request_tally.py counts them in memory).
* worker-side job metrics (jobs by final status, queue wait, inference time, batch size), kept in
  Redis by every worker (tasks/metrics.py): they add up across all workers on all hosts.
* cluster gauges read at scrape time: model memory per replica, active models, queue depth per
  device queue, live workers per device, and the bytes and objects each owner makes the service keep
  (tasks/holdings.py).
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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tasks import metrics as worker_metrics
from tasks.cluster import ClusterState
from tasks.deadletters import DeadLetters
from tasks.holdings import KINDS, Holdings
from tasks.names import CPU_QUEUE, METRICS_WEBHOOKS, queue_for_device
from tasks.queues import lane_depths
from tasks.request_tally import RequestTally
from tasks.states import LOADED
from tasks.ttl_cache import TTLCache
from webhooks.deliveries import LATENCY_BUCKETS, Deliveries

REQUESTS_TOTAL = "aethercore_requests_total"
REQUEST_DURATION = "aethercore_request_duration_seconds"
MODEL_MEMORY = "aethercore_model_memory_usage_bytes"
ACTIVE_MODELS = "aethercore_active_models"
QUEUE_DEPTH = "aethercore_queue_depth"
LANE_DEPTH = "aethercore_lane_queue_depth"
LIVE_WORKERS = "aethercore_live_workers"
STREAMS_OPEN = "aethercore_stream_connections"
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Completion webhooks (webhooks/dispatcher.py) and dead letters (tasks/deadletters.py).
WEBHOOK_DELIVERIES = "aethercore_webhook_deliveries_total"
WEBHOOK_FAILURES = "aethercore_webhook_failures_total"
WEBHOOK_LATENCY = "aethercore_webhook_delivery_seconds"
WEBHOOK_QUEUE = "aethercore_webhook_queue"
WEBHOOK_DISPATCHERS = "aethercore_webhook_dispatchers"
DEAD_LETTERS = "aethercore_dead_letters"
DEAD_LETTERS_TOTAL = "aethercore_dead_letters_total"
# What each caller makes the service keep (tasks/holdings.py), per owner and kind, every owner's added up, and the
# share of Redis's maxmemory all of it may take (AETHERCORE_HOLDINGS_MAX_SHARE; 0: no maxmemory, no limit).
HOLDINGS_BYTES = "aethercore_holdings_bytes"
HOLDINGS_OBJECTS = "aethercore_holdings_objects"
HOLDINGS_TOTAL_BYTES = "aethercore_holdings_total_bytes"
HOLDINGS_TOTAL_OBJECTS = "aethercore_holdings_total_objects"
HOLDINGS_LIMIT = "aethercore_holdings_limit_bytes"
# The metrics read from Redis are read at most this often per API process.
CLUSTER_CACHE_S = 1.0


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class ClusterCollector:
    """Everything read from Redis at scrape time (see the module docstring)."""

    def __init__(self, cluster: ClusterState, holdings: Holdings) -> None:
        self.cluster = cluster
        self.holdings = holdings

    def collect(self):
        try:
            workers = self.cluster.live_workers()
            counters, histograms = worker_metrics.read(self.cluster.redis)
            devices = (
                {CPU_QUEUE}
                | {w["device"] for w in workers}
                | {e["device"] for e in self.cluster.all_desired().values()}
            )
            lanes = {d: lane_depths(self.cluster.redis, queue_for_device(d)) for d in sorted(devices)}
            operations = list(operations_families(self.cluster.redis))
            holdings = list(holdings_families(self.holdings))
        except Exception:  # a scrape during a Redis outage still returns the API's own metrics
            return
        yield from operations
        yield from holdings
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
        by_lane = GaugeMetricFamily(
            LANE_DEPTH, "Messages waiting in a device queue's priority lane", labels=["queue", "lane"]
        )
        for device, counts in lanes.items():
            depth.add_metric([queue_for_device(device)], sum(counts.values()))
            for lane, value in counts.items():
                by_lane.add_metric([queue_for_device(device), lane], value)
        yield depth
        yield by_lane

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
            label = worker_metrics.HISTOGRAM_LABEL.get(metric, "model")
            family = HistogramMetricFamily(metric, worker_metrics.HELP[metric], labels=[label])
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


def operations_families(client: Any) -> Any:
    """Webhook deliveries (every dispatcher's counts, the queue's depth) and dead letters, read at scrape time."""
    counts = {name: float(value) for name, value in client.hgetall(METRICS_WEBHOOKS).items()}
    sent = CounterMetricFamily(WEBHOOK_DELIVERIES, "Webhook delivery attempts by outcome", labels=["outcome"])
    failures = CounterMetricFamily(WEBHOOK_FAILURES, "Webhook deliveries that failed for good", labels=["reason"])
    buckets, running = [], 0.0
    for name, value in sorted(counts.items()):
        kind, _, label = name.partition("|")
        if kind == "deliveries":
            sent.add_metric([label], value)
        elif kind == "failures":
            failures.add_metric([label], value)
    for bound in (*LATENCY_BUCKETS, "+Inf"):
        running += counts.get(f"latency|{bound}", 0.0)
        buckets.append((f"{bound}", running))
    latency = HistogramMetricFamily(WEBHOOK_LATENCY, "Seconds one webhook delivery attempt took")
    latency.add_metric([], buckets, sum_value=counts.get("latency|sum", 0.0))
    yield from (sent, failures, latency)
    depth = Deliveries(client).depth()
    queue = GaugeMetricFamily(
        WEBHOOK_QUEUE,
        "Webhook deliveries: new (due), retrying (waiting for a retry), in_flight, failed (kept after failing)",
        labels=["state"],
    )
    for state in ("new", "retrying", "in_flight", "failed"):
        queue.add_metric([state], depth[state])
    yield queue
    yield GaugeMetricFamily(WEBHOOK_DISPATCHERS, "Webhook dispatchers alive", value=depth["dispatchers"])
    dead = DeadLetters(client, ttl_s=10**9, max_per_queue=1)
    kept = GaugeMetricFamily(DEAD_LETTERS, "Dead letters kept, per queue", labels=["queue"])
    for name, value in dead.depth().items():
        kept.add_metric([name], value)
    yield kept
    total = CounterMetricFamily(DEAD_LETTERS_TOTAL, "Jobs that became dead letters", labels=["queue", "reason"])
    for (name, reason), value in sorted(dead.counts().items()):
        total.add_metric([name, reason], value)
    yield total


def holdings_families(holdings: Holdings) -> Any:
    """Bytes and objects per owner and kind, every owner's added up, and the limit on all of them together."""
    by_owner, totals = holdings.usage_by_owner(), holdings.totals()
    owned_bytes = GaugeMetricFamily(
        HOLDINGS_BYTES, "Bytes an owner makes the service keep in Redis, per kind", labels=["owner", "kind"]
    )
    owned_objects = GaugeMetricFamily(
        HOLDINGS_OBJECTS, "Objects an owner makes the service keep in Redis, per kind", labels=["owner", "kind"]
    )
    for owner, usage in sorted(by_owner.items()):
        for kind in KINDS:
            owned_bytes.add_metric([owner, kind], usage[kind].bytes)
            owned_objects.add_metric([owner, kind], usage[kind].count)
    all_bytes = GaugeMetricFamily(HOLDINGS_TOTAL_BYTES, "Bytes every owner's objects take, per kind", labels=["kind"])
    all_objects = GaugeMetricFamily(HOLDINGS_TOTAL_OBJECTS, "Every owner's objects, per kind", labels=["kind"])
    for kind in KINDS:
        all_bytes.add_metric([kind], totals[kind].bytes)
        all_objects.add_metric([kind], totals[kind].count)
    limit = GaugeMetricFamily(
        HOLDINGS_LIMIT,
        "Bytes every owner's objects may take together (AETHERCORE_HOLDINGS_MAX_SHARE of maxmemory; 0: no limit)",
        value=holdings.total_limit,
    )
    yield from (owned_bytes, owned_objects, all_bytes, all_objects, limit)


class CachedCollector:
    """What `source` collected, collected again at most every `ttl_s`; while one scrape collects afresh, the others
    answer the previous collection (tasks/ttl_cache.py)."""

    def __init__(self, source: Any, ttl_s: float) -> None:
        self.source = source
        self.cache = TTLCache(ttl_s)

    def collect(self):
        return self.cache.get("families", lambda: list(self.source.collect()))


class ApiMetrics:
    def __init__(self, app: Flask, cluster: ClusterState) -> None:
        self.multiprocess = multiprocess_enabled()
        # Single process: our own registry (several apps may live in one test process). Multiprocess:
        # values go to the shared directory and are read back by MultiProcessCollector at scrape.
        self.registry = None if self.multiprocess else CollectorRegistry()
        holdings = app.extensions["aethercore"].holdings
        self.cluster_registry = CollectorRegistry()
        self.cluster_registry.register(CachedCollector(ClusterCollector(cluster, holdings), CLUSTER_CACHE_S))
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
        """The API's request metrics; with `cluster`, also everything read from Redis (cached)."""
        self.tally.flush()  # this process's requests are in its own answer at once (others' within FLUSH_S)
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = self.registry
        text = generate_latest(registry)
        if cluster:
            text += generate_latest(self.cluster_registry)
        return Response(text, mimetype=CONTENT_TYPE_LATEST)


def init_metrics(app: Flask, cluster: ClusterState) -> ApiMetrics:
    return ApiMetrics(app, cluster)
