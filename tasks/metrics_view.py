"""The cluster's Prometheus families, read from Redis at scrape time, below HTTP (api/metrics.py serves them on
/metrics to the roles that read the whole service): model memory per replica, active models, live workers per
device, queue depth per device queue and lane, every worker's job metrics (tasks/metrics.py: jobs by final status,
queue wait, inference time, batch size, decoding), dead letters, and the bytes and objects each owner makes the
service keep (tasks/holdings.py). `CachedCollector` reads them at most once per interval however many scrapes ask.
Label values are bounded: models come from models.yaml, owners are API keys and JWT subjects (admins create them).

May import config/, tasks/ and prometheus_client; never api, flask or the rooms above (webhooks/metrics.py's
families are handed in by the API: `ClusterCollector(operations=...)`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from tasks import metrics as worker_metrics
from tasks.cluster import ClusterState
from tasks.deadletters import DeadLetters
from tasks.holdings import KINDS, Holdings
from tasks.names import CPU_QUEUE, queue_for_device
from tasks.queues import lane_depths
from tasks.states import LOADED
from tasks.ttl_cache import TTLCache

MODEL_MEMORY = "aethercore_model_memory_usage_bytes"
ACTIVE_MODELS = "aethercore_active_models"
QUEUE_DEPTH = "aethercore_queue_depth"
LANE_DEPTH = "aethercore_lane_queue_depth"
LIVE_WORKERS = "aethercore_live_workers"
# Dead letters (tasks/deadletters.py).
DEAD_LETTERS = "aethercore_dead_letters"
DEAD_LETTERS_TOTAL = "aethercore_dead_letters_total"
# What each caller makes the service keep (tasks/holdings.py), per owner and kind, every owner's added up, and the
# share of Redis's maxmemory all of it may take (AETHERCORE_HOLDINGS_MAX_SHARE; 0: no maxmemory, no limit).
HOLDINGS_BYTES = "aethercore_holdings_bytes"
HOLDINGS_OBJECTS = "aethercore_holdings_objects"
HOLDINGS_TOTAL_BYTES = "aethercore_holdings_total_bytes"
HOLDINGS_TOTAL_OBJECTS = "aethercore_holdings_total_objects"
HOLDINGS_LIMIT = "aethercore_holdings_limit_bytes"


class ClusterCollector:
    """Everything read from Redis at scrape time (see the module docstring); nothing of it when Redis fails."""

    def __init__(
        self, cluster: ClusterState, holdings: Holdings, operations: Callable[[Any], Iterable[Any]] | None = None
    ) -> None:
        """`operations`: the families of the rooms above this one, read from the same Redis in the same pass (the
        API passes webhook deliveries and dead letters); without, dead letters alone."""
        self.cluster = cluster
        self.holdings = holdings
        self.operations = operations or dead_letter_families

    def collect(self):
        try:
            workers = self.cluster.live_workers()
            counters, histograms = worker_metrics.read(self.cluster.redis)
            exemplars = worker_metrics.read_exemplars(self.cluster.redis)
            devices = (
                {CPU_QUEUE}
                | {w["device"] for w in workers}
                | {e["device"] for e in self.cluster.all_desired().values()}
            )
            lanes = {d: lane_depths(self.cluster.redis, queue_for_device(d)) for d in sorted(devices)}
            operations = list(self.operations(self.cluster.redis))
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
        for key, count in sorted(counters.items()):
            if key[0] == worker_metrics.GENERATED_TOKENS:
                tokens.add_metric([key[1]], count)
            else:
                jobs.add_metric(list(key), count)
        yield jobs
        yield tokens
        yield from self._decoding(workers)
        for metric in worker_metrics.BUCKETS:
            label = worker_metrics.HISTOGRAM_LABEL.get(metric, "model")
            family = HistogramMetricFamily(metric, worker_metrics.HELP[metric], labels=[label])
            for model, parts in sorted(histograms.get(metric, {}).items()):
                mine = {
                    bucket: ex for (name, label, bucket), ex in exemplars.items() if (name, label) == (metric, model)
                }
                family.add_metric(
                    [model], worker_metrics.cumulative_buckets(metric, parts, mine), sum_value=parts.get("sum", 0.0)
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


def dead_letter_families(client: Any) -> Any:
    """Dead letters kept per queue, and every one made, by queue and reason, read at scrape time."""
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
