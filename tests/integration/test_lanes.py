"""Priority lanes against a real Redis, API app and worker: a `high` job queued behind 500 `low` ones starts before
them (and within the low lane the order stays first in, first out); `high` only for callers granted it (admins,
operators, keys and tokens with a grant), its own rate limit; interactive admission that a `low` backlog cannot
fill; batches held to their device's watermark; the lane depths in /health and /metrics; and the longest wait of a
`low` job under sustained `high` load, within what aging promises."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime

import jwt
import pytest
import redis
import requests
import yaml

from access.keys import KeyStore, issue_token
from cli.supervise import REPO_ROOT
from tasks.names import batch_jobs_key, lane_list
from tests.conftest import client_for, settings_for
from tests.support import (
    ADMIN_KEY,
    JWT_SECRET,
    OTHER_USER_KEY,
    USER_KEY,
    ApiProcess,
    RedisServer,
    WorkerProcess,
    base_env,
    metric,
    wait_until,
)

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


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_high_is_for_admins_and_callers_granted_it(lanes_redis):
    client = client_for(settings_for(lanes_redis), key=None)
    created = subprocess.run(
        [sys.executable, "manage.py", "auth", "create-key", "--role", "user", "--lanes", "high,normal,low"],
        cwd=REPO_ROOT,
        env=base_env(lanes_redis),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    granted = created.stdout.strip()
    narrow = KeyStore(redis.Redis.from_url(lanes_redis, decode_responses=True)).create("user", lanes=["normal"])[1]
    body = {"model_id": MODEL, "inputs": {"text": "x"}, "priority": "high"}

    refused = client.post("/serve", json=body, headers=bearer(USER_KEY))
    assert refused.status_code == 403
    error = refused.get_json()["error"]
    assert "'high'" in error["message"] and "create-key" in error["message"] and "--lanes" in error["message"]
    assert error["details"] == {"lane": "high", "granted": "normal,low"}
    assert client.post("/serve", json={**body, "priority": "low"}, headers=bearer(USER_KEY)).status_code == 202
    v1 = client.post(
        "/v1/embeddings", json={"model": MODEL, "input": "x", "service_tier": "priority"}, headers=bearer(USER_KEY)
    )
    assert v1.status_code == 403 and "high" in v1.get_json()["error"]["message"]

    assert client.post("/serve", json=body, headers=bearer(granted)).status_code == 202  # a key with a grant
    assert client.post("/serve", json=body, headers=bearer(ADMIN_KEY)).status_code == 202  # admins: every lane
    assert client.post("/serve", json={**body, "priority": "low"}, headers=bearer(narrow)).status_code == 403

    token = issue_token(JWT_SECRET, "alice", "user", 600, lanes=["high", "normal"])
    assert client.post("/serve", json=body, headers=bearer(token)).status_code == 202
    assert client.post("/serve", json={**body, "priority": "low"}, headers=bearer(token)).status_code == 403
    plain = issue_token(JWT_SECRET, "carol", "user", 600)  # no claim: the role's lanes
    assert client.post("/serve", json=body, headers=bearer(plain)).status_code == 403
    forged = jwt.encode({"sub": "bob", "role": "user", "exp": time.time() + 600, "lanes": ["urgent"]}, JWT_SECRET)
    assert client.post("/serve", json=body, headers=bearer(forged)).status_code == 401  # a claim that is no grant


def test_a_callers_high_submissions_have_a_rate_limit_of_their_own(lanes_redis):
    granted = KeyStore(redis.Redis.from_url(lanes_redis, decode_responses=True)).create("user", lanes="high,normal")
    client = client_for(settings_for(lanes_redis, high_lane_rate_limit="3/minute"), key=granted[1])
    body = {"model_id": MODEL, "inputs": {"text": "x"}, "priority": "high"}
    assert [client.post("/serve", json=body).status_code for _ in range(3)] == [202, 202, 202]
    over = client.post("/serve", json=body)
    assert over.status_code == 429 and "high lane" in over.get_json()["error"]["message"]
    assert int(over.headers["Retry-After"]) >= 1
    assert client.post("/serve", json={**body, "priority": "normal"}).status_code == 202  # other lanes unaffected


def test_a_low_backlog_cannot_fill_the_interactive_lanes_bound(lanes_redis):
    """No worker: everything waits. The `low` lane stops at its own bound; interactive callers count only the
    interactive lanes against AETHERCORE_MAX_QUEUE_DEPTH."""
    settings = settings_for(lanes_redis, max_queue_depth=5, low_lane_queue_depth=8)
    client = client_for(settings, key=USER_KEY)
    body = {"model_id": MODEL, "inputs": {"text": "x"}}
    lows = [client.post("/serve", json={**body, "priority": "low"}).status_code for _ in range(9)]
    assert lows == [202] * 8 + [429]
    assert client.post("/serve", json={**body, "priority": "low"}).get_json()["error"]["details"]["lane"] == "low"
    interactive = [client.post("/serve", json=body).status_code for _ in range(6)]
    assert interactive == [202] * 5 + [429]  # its own bound, whatever the low lane holds


def _upload_batch(api: ApiProcess, key: str, lines: int) -> str:
    text = "".join(
        json.dumps(
            {
                "custom_id": f"l{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": MODEL, "input": f"line {i}"},
            }
        )
        + "\n"
        for i in range(lines)
    )
    uploaded = requests.post(
        f"{api.base}/v1/files",
        headers=bearer(key),
        files={"file": ("b.jsonl", text)},
        data={"purpose": "batch"},
        timeout=30,
    )
    assert uploaded.status_code == 200, uploaded.text
    created = requests.post(
        f"{api.base}/v1/batches",
        headers=bearer(key),
        json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"},
        timeout=30,
    )
    assert created.status_code == 200, created.text
    return created.json()["id"]


@pytest.mark.slow
def test_three_owners_batches_keep_to_the_devices_watermark_and_never_refuse_interactive_callers(lanes_redis):
    r = redis.Redis.from_url(lanes_redis, decode_responses=True)
    owners = [KeyStore(r).create("user", f"owner {n}")[1] for n in range(3)]
    mark = 24
    api = ApiProcess(
        lanes_redis,
        name="lanes-batches",
        batches=True,
        AETHERCORE_AUTH="true",
        AETHERCORE_WORKERS="1",
        AETHERCORE_BATCH_QUEUE_WATERMARK=str(mark),
        AETHERCORE_MAX_QUEUE_DEPTH="10",
    ).start()
    worker = None
    try:
        batches = [_upload_batch(api, key, 60) for key in owners for _ in range(2)]

        def in_flight() -> int:
            return sum(r.hlen(batch_jobs_key(b)) for b in batches)

        # No worker yet: every line submitted stays in flight, in the cpu queue's low lane.
        wait_until(lambda: in_flight() >= mark, 60, 0.2, "the batches to reach the watermark")
        time.sleep(2)  # ten more driver passes take nothing
        assert in_flight() == mark and r.llen(lane_list("cpu", "low")) <= mark
        interactive = requests.post(
            f"{api.base}/serve",
            headers=bearer(OTHER_USER_KEY),
            json={"model_id": MODEL, "inputs": {"text": "x"}},
            timeout=30,
        )
        assert interactive.status_code == 202, interactive.text  # the device holds more batch lines than its bound

        worker = WorkerProcess(lanes_redis, name="lanes-batch-worker").start()

        def ended() -> bool:
            return all(
                requests.get(f"{api.base}/v1/batches/{b}", headers=bearer(k), timeout=10).json()["status"]
                == "completed"
                for b, k in zip(batches, [k for k in owners for _ in range(2)])
            )

        wait_until(ended, 240, 1.0, "every batch to complete")
    finally:
        if worker is not None:
            worker.stop()
        api.stop()


SLOW = "sim-slow"  # a device the test can keep busy: one job per 40 ms pass


@pytest.mark.slow
def test_the_longest_wait_of_a_low_job_under_sustained_high_load_is_what_aging_promises(lanes_redis, tmp_path):
    aging_s, interval_s = 3.0, 1.0  # a step; and the reaper pass that promotes (AETHERCORE_HEARTBEAT_INTERVAL)
    models = yaml.safe_load((REPO_ROOT / "config" / "models.yaml").read_text())
    slow = {**models["models"]["sim-h100"], "device": "cpu", "max_batch_size": 1, "max_batch_delay_ms": 0}
    slow["simulate"] = {"base_ms": 40.0, "per_item_ms": 0.0, "dim": 8}
    models_file = tmp_path / "models.yaml"
    models_file.write_text(yaml.safe_dump({**models, "models": {SLOW: slow}}))
    worker = WorkerProcess(
        lanes_redis,
        name="lanes-aging",
        AETHERCORE_MODELS_FILE=str(models_file),
        AETHERCORE_WORKER_CONCURRENCY="1",  # one message at a time: a waiting high message is always taken first
        AETHERCORE_LANE_AGING_S=str(aging_s),
    ).start()
    settings = settings_for(lanes_redis, models_file=models_file)
    client, loader_client = client_for(settings), client_for(settings)  # one each: test clients are not shared
    r = redis.Redis.from_url(lanes_redis, decode_responses=True)
    stop = threading.Event()

    def sustained_high() -> None:  # the high lane is never empty
        while not stop.is_set():
            if r.llen(lane_list("cpu", "high")) < 8:
                for _ in range(4):
                    loader_client.post("/serve", json={"model_id": SLOW, "inputs": {"text": "h"}, "priority": "high"})
            else:
                time.sleep(0.01)

    try:
        assert client.post(f"/models/{SLOW}/load?wait=60").get_json()["status"] == "succeeded"
        loader = threading.Thread(target=sustained_high, daemon=True)
        loader.start()
        time.sleep(1.0)
        lows = []
        for _ in range(2):
            lows.append(
                client.post("/serve", json={"model_id": SLOW, "inputs": {"text": "l"}, "priority": "low"}).get_json()[
                    "job_id"
                ]
            )
            time.sleep(1.0)

        def started() -> list[dict] | None:
            jobs = [client.get(f"/jobs/{j}").get_json() for j in lows]
            return jobs if all(job.get("started_at") for job in jobs) else None

        jobs = wait_until(started, 60, 0.2, "the low jobs to start")
    finally:
        stop.set()
        worker.stop()
    waits = [_ts(job["started_at"]) - _ts(job["created_at"]) for job in jobs]
    # Promoted once per step waited, counted from submission: `normal` after one step, `high` after two, each at
    # the next reaper pass; then first in the high lane. Never earlier (a job promoted twice for one wait would
    # start after one step), and never much later (starved).
    bound = 2 * aging_s + 2 * interval_s + 3.0  # 3 s: a pass, the worker's hand-over and a busy test machine
    assert all(2 * aging_s - 0.5 <= wait <= bound for wait in waits), (waits, bound)
