"""The API's request counter and duration histogram, counted in memory and written to Prometheus once a second.

Under gunicorn the two metrics are prometheus-client multiprocess values: every `inc` and `observe` takes the
library's lock, checks the pid and writes an mmap'd file, three writes per request, which was ~8 % of an API
process's CPU at GPU speed. Here a request costs a few dict increments; a per-process thread writes the sums every
`FLUSH_S` (and a scrape answered by this process writes them first), so a scrape sees a request at most `FLUSH_S`
late, and totals stay exact. The counts of a process that exits are written at exit.

Below HTTP (api/metrics.py counts each request through it): may import tasks/, config/ and prometheus_client;
never api or flask.
"""

from __future__ import annotations

import atexit
import bisect
import threading
import time
from collections import Counter as Tally
from typing import Any

from loguru import logger
from prometheus_client import Counter, Histogram

from tasks.per_process import PerProcessThread

FLUSH_S = 1.0


class RequestTally:
    def __init__(self, total: Counter, duration: Histogram, buckets: tuple[float, ...]) -> None:
        self.total = total
        self.duration = duration
        self._bounds = [*buckets, float("inf")]  # the histogram's own bounds, +Inf last as prometheus-client adds it
        self._lock = threading.Lock()
        self._counts: Tally = Tally()  # (method, endpoint, status) -> requests
        self._buckets: Tally = Tally()  # (method, endpoint, bucket index) -> requests
        self._sums: Any = Tally()  # (method, endpoint) -> seconds (floats: typeshed types a Counter int)
        self._thread = PerProcessThread("aethercore-request-tally", self._run, self._reset)

    def count(self, method: str, endpoint: str, status: str, seconds: float) -> None:
        self._thread.ensure()
        # observe() counts an amount in the first bucket whose bound is >= it: bisect_left finds the same one.
        index = bisect.bisect_left(self._bounds, seconds)
        with self._lock:
            self._counts[(method, endpoint, status)] += 1
            self._buckets[(method, endpoint, index)] += 1
            self._sums[(method, endpoint)] += seconds

    def flush(self) -> None:
        """Write what was counted since the last flush to the Prometheus values."""
        with self._lock:
            counts, buckets, sums = self._counts, self._buckets, self._sums
            self._counts, self._buckets, self._sums = Tally(), Tally(), Tally()
        for labels, times in counts.items():
            self.total.labels(*labels).inc(times)
        for (method, endpoint, index), times in buckets.items():
            # prometheus-client has no "observe n times": its own per-bucket and sum values take the n at once
            # (the layout observe() writes; tests/unit/test_request_tally.py compares the two expositions).
            self.duration.labels(method, endpoint)._buckets[index].inc(times)
        for (method, endpoint), seconds in sums.items():
            self.duration.labels(method, endpoint)._sum.inc(seconds)

    def _reset(self) -> None:
        with self._lock:  # counts inherited from the parent across a fork were the parent's to write
            self._counts, self._buckets, self._sums = Tally(), Tally(), Tally()
        atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            try:
                self.flush()
            except Exception as exc:  # a full disk under the multiprocess directory, say: keep serving
                logger.warning("request metrics not written: {}", exc)
