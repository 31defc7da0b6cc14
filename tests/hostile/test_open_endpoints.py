"""Issue 34, case 17: the endpoints open to anyone (`/health`, `/health/ready`, `/v2/health/ready`, and `/metrics`
while AETHERCORE_METRICS_AUTH is off) tell an anonymous caller whether the service is healthy and nothing more — no
model name, no queue depth, no one's holdings — and a flood of them costs Redis at most about one set of the checks'
round trips per second in the attacked API process, however many requests it answers.

Measured with Redis's own count of the commands it ran (`INFO commandstats`), against the suite's real API and
worker: a quiet window of the same length gives the background (the worker's heartbeats, the batch driver's polls).
"""

from __future__ import annotations

import json
import threading
import time

import requests

from api.metrics import REQUESTS_TOTAL
from tasks.metrics_view import DEAD_LETTERS, HOLDINGS_BYTES, LANE_DEPTH, MODEL_MEMORY, QUEUE_DEPTH
from tests.hostile.conftest import VICTIM_MODEL, assert_still_serving, auth, ensure_loaded
from tests.support import ADMIN_KEY, USER_KEY, VIEWER_KEY
from webhooks.metrics import WEBHOOK_QUEUE

OPEN_CHECKS = ("/health", "/health/ready")
# Families that name models or count what waits in a queue: only callers who read the whole service see them.
PRIVATE_FAMILIES = (MODEL_MEMORY, QUEUE_DEPTH, LANE_DEPTH, WEBHOOK_QUEUE, DEAD_LETTERS, HOLDINGS_BYTES)
FLOOD_S = 3.0
FLOODERS = 8


def redis_commands(client) -> int:
    """Commands Redis has run since it started, every client's, but INFO itself (the measuring)."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for name, v in stats.items() if name != "cmdstat_info")


def model_names(api) -> list[str]:
    response = requests.get(f"{api.base}/models", headers=auth(ADMIN_KEY), timeout=10)
    assert response.status_code == 200, response.text
    return [m["model_id"] for m in response.json()["models"]]


def families(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_an_anonymous_caller_learns_the_status_and_nothing_else(hostile_api, hostile_redis):
    ensure_loaded(hostile_api)  # a resident model: its name is in the details a probe must not see
    names = model_names(hostile_api)
    for key in (None, USER_KEY):  # anonymous, or a tenant's key: the statuses only
        headers = auth(key) if key else {}
        for path in OPEN_CHECKS:
            response = requests.get(f"{hostile_api.base}{path}", headers=headers, timeout=10)
            assert response.status_code in (200, 503), response.text
            body = response.json()
            assert body["status"] in ("ok", "degraded") and body["checks"], body
            assert all(set(check) == {"status"} for check in body["checks"].values()), (path, key, body)
            assert not any(name in response.text for name in names), (path, key, response.text)
        metrics = requests.get(f"{hostile_api.base}/metrics", headers=headers, timeout=10)
        assert metrics.status_code == 200
        assert REQUESTS_TOTAL in families(metrics.text)  # the API's own request metrics stay open to scrapes
        assert not families(metrics.text) & set(PRIVATE_FAMILIES), (key, families(metrics.text) & set(PRIVATE_FAMILIES))
        assert not any(f'"{name}"' in metrics.text for name in names), key
    # Who reads the whole service (admin, operator, viewer) still gets every detail, on the same paths.
    detailed = requests.get(f"{hostile_api.base}/health", headers=auth(VIEWER_KEY), timeout=10).json()
    assert "cpu" in detailed["checks"]["queues"]["lanes"] and "live" in detailed["checks"]["workers"], detailed
    ready = requests.get(f"{hostile_api.base}/health/ready", headers=auth(ADMIN_KEY), timeout=10).json()
    assert VICTIM_MODEL in json.dumps(ready["checks"]["models"]), ready
    scraped = requests.get(f"{hostile_api.base}/metrics", headers=auth(VIEWER_KEY), timeout=10).text
    assert {MODEL_MEMORY, QUEUE_DEPTH, LANE_DEPTH, WEBHOOK_QUEUE} <= families(scraped)
    assert f'model="{VICTIM_MODEL}"' in scraped
    # A credential that is presented is checked, also on an open path: a wrong one is refused, not ignored.
    wrong = requests.get(f"{hostile_api.base}/health", headers=auth("not-a-key-of-this-service-0123"), timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    assert_still_serving(hostile_api, hostile_redis)


def one_set_of_checks(api, client) -> int:
    """Redis commands one fresh computation of /health and /health/ready costs (the least of three tries: the
    background only adds)."""
    costs = []
    for _ in range(3):
        time.sleep(1.2)  # past the API's cache of the checks
        before = redis_commands(client)
        for path in OPEN_CHECKS:
            assert requests.get(f"{api.base}{path}", timeout=10).status_code in (200, 503)
        costs.append(redis_commands(client) - before)
    return min(costs)


def flood(api, seconds: float) -> int:
    """FLOODERS anonymous callers asking /health, /health/ready, /v2/health/ready and /metrics as fast as they
    can for `seconds`; how many answers they got."""
    paths = (*OPEN_CHECKS, "/v2/health/ready", "/metrics")
    answered = [0] * FLOODERS
    deadline = time.monotonic() + seconds

    def caller(index: int) -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline:
                response = session.get(f"{api.base}{paths[answered[index] % len(paths)]}", timeout=10)
                assert response.status_code in (200, 503)
                answered[index] += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(FLOODERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    return sum(answered)


def test_a_flood_of_anonymous_probes_costs_about_one_set_of_round_trips_per_second(hostile_api, hostile_redis):
    ensure_loaded(hostile_api)
    per_set = one_set_of_checks(hostile_api, hostile_redis)
    assert per_set > 0
    before = redis_commands(hostile_redis)
    time.sleep(FLOOD_S)
    quiet = redis_commands(hostile_redis) - before
    before, started = redis_commands(hostile_redis), time.monotonic()
    answers = flood(hostile_api, FLOOD_S)
    elapsed = time.monotonic() - started
    loud = redis_commands(hostile_redis) - before
    extra = loud - quiet * elapsed / FLOOD_S
    # One set per second, the window's partial seconds rounded up, and a cold start's; the background varies.
    allowed = (elapsed + 2) * per_set + 0.5 * quiet + 20
    print(
        f"\nflood: {answers} anonymous answers in {elapsed:.1f} s; Redis commands {loud} (quiet {quiet} in "
        f"{FLOOD_S:.0f} s), one set of checks {per_set}: {extra:.0f} more than the background, allowed {allowed:.0f}"
    )
    assert answers >= 100, answers  # a flood, not a trickle: per request, the old cost would pass the bound
    assert extra <= allowed, (answers, loud, quiet, per_set)
    assert_still_serving(hostile_api, hostile_redis)
