"""Priority lanes against a real Redis, API app and worker: a `high` job queued behind 500 `low` ones starts before
them (and within the low lane the order stays first in, first out); lanes are checked per role; the lane depths
show in /health and /metrics."""

from __future__ import annotations

import statistics
from datetime import datetime

import pytest

from tests.conftest import client_for, settings_for
from tests.support import USER_KEY, RedisServer, WorkerProcess, metric, wait_until

MODEL = "sim-h100"
BACKLOG = 500


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@pytest.fixture()
def lanes_redis():
    server = RedisServer().start()
    yield server.url(0)
    server.cleanup()


def test_a_high_job_queued_behind_500_low_ones_starts_before_them(lanes_redis):
    client = client_for(settings_for(lanes_redis))
    body = {"model_id": MODEL, "inputs": {"text": "x"}}
    # No worker yet: everything waits in the cpu queue's lanes, in submission order.
    lows = [client.post("/serve", json={**body, "priority": "low"}).get_json()["job_id"] for _ in range(BACKLOG)]
    high = client.post("/serve", json={**body, "priority": "high"}).get_json()["job_id"]
    last_low = client.post("/serve", json={**body, "priority": "low"}).get_json()["job_id"]
    health = client.get("/health").get_json()
    assert health["checks"]["queues"]["lanes"]["cpu"] == {"high": 1, "normal": 0, "low": BACKLOG + 1}
    assert metric(client.get("/metrics").get_data(as_text=True), "aethercore_lane_queue_depth", lane="low") == 501

    worker = WorkerProcess(lanes_redis, name="lanes-worker").start()
    try:

        def ended() -> bool:
            return client.get(f"/jobs/{last_low}").get_json()["status"] == "succeeded"

        wait_until(ended, 120, 0.5, "the backlog to drain")
        jobs = {j: client.get(f"/jobs/{j}").get_json() for j in [*lows, high, last_low]}
    finally:
        worker.stop()
    assert all(job["status"] == "succeeded" for job in jobs.values())
    started = {j: _ts(job["started_at"]) for j, job in jobs.items()}
    finished = {j: _ts(job["finished_at"]) for j, job in jobs.items()}
    # The high job was taken first, and ran in one of the first forward passes...
    assert started[high] <= min(started[j] for j in lows)
    assert finished[high] <= statistics.median(finished[j] for j in lows)
    # ... while the low lane kept its order: the last one submitted started after the first ones.
    assert started[last_low] >= max(sorted(started[j] for j in lows)[: BACKLOG // 2])


def test_a_role_limited_to_some_lanes_gets_403_for_the_others(redis_server):
    client = client_for(
        settings_for(redis_server.url(14), priority_lanes={"user": frozenset({"normal", "low"})}), key=USER_KEY
    )
    refused = client.post("/serve", json={"model_id": MODEL, "inputs": {"text": "x"}, "priority": "high"})
    assert refused.status_code == 403 and "high" in refused.get_json()["error"]["message"]
    bad = client.post("/serve", json={"model_id": MODEL, "inputs": {"text": "x"}, "priority": "urgent"})
    assert bad.status_code == 422 and "priority" in bad.get_json()["error"]["details"]
