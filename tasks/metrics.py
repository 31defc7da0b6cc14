"""Worker-side metrics kept in Redis, so they add up across every worker process and host.

Workers count in memory (`LocalMetrics`, no Redis work per job) and add their counts to counters
and histogram buckets in two Redis hashes with every heartbeat, in one round trip (a job is counted
once, when it ends); the API's /metrics turns the hashes into Prometheus counters and histograms at
scrape time. One scrape target sees the whole
cluster, however many workers `--scale` starts. Label values are bounded: model ids come from
models.yaml, kinds and statuses are fixed sets.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter, defaultdict
from typing import Any

from tasks.names import PREFIX

COUNTERS_KEY = f"{PREFIX}:metrics:counters"
HISTOGRAMS_KEY = f"{PREFIX}:metrics:histograms"

JOBS_TOTAL = "aethercore_jobs_total"
QUEUE_WAIT = "aethercore_queue_wait_seconds"
INFERENCE_TIME = "aethercore_inference_seconds"
BATCH_SIZE = "aethercore_batch_size"

BUCKETS: dict[str, tuple[float, ...]] = {
    QUEUE_WAIT: (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
    INFERENCE_TIME: (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
    BATCH_SIZE: (1, 2, 4, 8, 16, 32, 64, 128, 256),
}
HELP = {
    JOBS_TOTAL: "Jobs that ended, by kind, model and final status",
    QUEUE_WAIT: "Seconds from submission until a worker started the job",
    INFERENCE_TIME: "Seconds of the forward pass that produced the job's output",
    BATCH_SIZE: "Jobs per forward pass (sum / count = average batch size)",
}


class LocalMetrics:
    """Counts kept in the worker's memory until the next flush (`flush(pipe)` with the heartbeat)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: Counter = Counter()
        self._observations: Counter = Counter()  # (metric, model, value) -> times
        self._sums: Counter = Counter()

    def count_job(self, kind: str, model: str, status: str) -> None:
        with self._lock:
            self._jobs[(kind, model, status)] += 1

    def observe(self, metric: str, model: str, value: float, times: int = 1) -> None:
        buckets = BUCKETS[metric]
        index = bisect.bisect_left(buckets, value)
        bucket = f"{buckets[index]}" if index < len(buckets) else "+Inf"
        with self._lock:
            self._observations[(metric, model, bucket)] += times
            self._sums[(metric, model)] += value * times

    def take(self) -> tuple[Counter, Counter, Counter]:
        with self._lock:
            taken = self._jobs, self._observations, self._sums
            self._jobs, self._observations, self._sums = Counter(), Counter(), Counter()
        return taken

    def give_back(self, taken: tuple[Counter, Counter, Counter]) -> None:
        """A flush that failed: keep its counts for the next one."""
        with self._lock:
            self._jobs.update(taken[0])
            self._observations.update(taken[1])
            self._sums.update(taken[2])

    @staticmethod
    def write(pipe: Any, taken: tuple[Counter, Counter, Counter]) -> bool:
        jobs, observations, sums = taken
        for (kind, model, status), times in jobs.items():
            pipe.hincrby(COUNTERS_KEY, f"{JOBS_TOTAL}|{kind}|{model}|{status}", times)
        counts: Counter = Counter()
        for (metric, model, bucket), times in observations.items():
            pipe.hincrby(HISTOGRAMS_KEY, f"{metric}|{model}|{bucket}", times)
            counts[(metric, model)] += times
        for (metric, model), times in counts.items():
            pipe.hincrby(HISTOGRAMS_KEY, f"{metric}|{model}|count", times)
            pipe.hincrbyfloat(HISTOGRAMS_KEY, f"{metric}|{model}|sum", sums[(metric, model)])
        return bool(jobs or observations)


def read(client: Any) -> tuple[dict[tuple[str, str, str], float], dict[str, dict[str, dict[str, float]]]]:
    """({(kind, model, status): count}, {metric: {model: {bucket|sum|count: value}}})."""
    counters = {}
    for field, value in client.hgetall(COUNTERS_KEY).items():
        _name, kind, model, status = field.split("|")
        counters[(kind, model, status)] = float(value)
    histograms: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for field, value in client.hgetall(HISTOGRAMS_KEY).items():
        metric, model, part = field.split("|")
        histograms[metric][model][part] = float(value)
    return counters, histograms


def cumulative_buckets(metric: str, parts: dict[str, float]) -> list[tuple[str, float]]:
    running, out = 0.0, []
    for bound in BUCKETS[metric]:
        running += parts.get(f"{bound}", 0.0)
        out.append((f"{bound}", running))
    out.append(("+Inf", running + parts.get("+Inf", 0.0)))
    return out
