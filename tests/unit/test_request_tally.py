"""The request tally writes exactly what one observe() per request would have written."""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from api.metrics import DURATION_BUCKETS, REQUEST_DURATION, REQUESTS_TOTAL
from tasks.request_tally import RequestTally

# On a bound, between bounds, under the first, past the last (+Inf), and the same route with another status.
REQUESTS = [
    ("GET", "/health", "200", 0.0),
    ("GET", "/health", "200", 0.005),
    ("GET", "/health", "200", 0.0051),
    ("GET", "/health", "503", 1.0),
    ("POST", "/serve", "200", 0.3),
    ("POST", "/serve", "200", 60.0),
    ("POST", "/serve", "504", 75.5),
]


def metrics() -> tuple[CollectorRegistry, Counter, Histogram]:
    registry = CollectorRegistry()
    total = Counter(REQUESTS_TOTAL, "requests", ["method", "endpoint", "status"], registry=registry)
    duration = Histogram(
        REQUEST_DURATION, "duration", ["method", "endpoint"], registry=registry, buckets=DURATION_BUCKETS
    )
    return registry, total, duration


def exposition(registry: CollectorRegistry) -> list[str]:
    # Without the `_created` timestamps, which differ between two registries made at different instants.
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_a_flush_writes_what_one_observe_per_request_writes():
    direct, total, duration = metrics()
    for method, endpoint, status, seconds in REQUESTS:
        total.labels(method, endpoint, status).inc()
        duration.labels(method, endpoint).observe(seconds)
    tallied, total, duration = metrics()
    tally = RequestTally(total, duration, DURATION_BUCKETS)
    for request in REQUESTS:
        tally.count(*request)
    assert 'aethercore_requests_total{endpoint="/serve"' not in generate_latest(tallied).decode()  # not yet written
    tally.flush()
    assert exposition(tallied) == exposition(direct)
    tally.flush()  # nothing new: nothing counted twice
    assert exposition(tallied) == exposition(direct)
