"""Completion webhooks' Prometheus families, read from Redis at scrape time (every dispatcher's counts, kept in
Redis by webhooks/dispatcher.py, and the deliveries' queue, webhooks/deliveries.py). api/metrics.py hands them to the
cluster's collector (tasks/metrics_view.py) with the dead letters'.

May import config/ and tasks/ (and prometheus_client); never api or flask.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from tasks.names import METRICS_WEBHOOKS
from webhooks.deliveries import LATENCY_BUCKETS, Deliveries

WEBHOOK_DELIVERIES = "aethercore_webhook_deliveries_total"
WEBHOOK_FAILURES = "aethercore_webhook_failures_total"
WEBHOOK_LATENCY = "aethercore_webhook_delivery_seconds"
WEBHOOK_QUEUE = "aethercore_webhook_queue"
WEBHOOK_DISPATCHERS = "aethercore_webhook_dispatchers"


def webhook_families(client: Any) -> Any:
    """Webhook deliveries (every dispatcher's counts by outcome and failure reason, their latency, the queue's
    depth, the dispatchers alive), read at scrape time."""
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
