"""The batch driver is a process of its own (`manage.py batches`, batches/driver.py), never an API process: an API
alone leaves a new batch `validating` and its /health says no driver is alive; a driver started beside it runs the
batch. An idle driver starts a new batch as soon as it is created (the API's wake note, not its idle wait). It runs
niced (AETHERCORE_BATCH_DRIVER_NICE), every thread of it; SIGTERM stops it cleanly, its leases given up, so another
driver carries its batches on at once. No worker runs here: what is checked is the driver's, not the lines' work."""

from __future__ import annotations

import json
import signal
import statistics
import time
from pathlib import Path

import pytest
import redis
import requests

from tasks.names import batch_lease_key
from tests.support import ADMIN_KEY, USER_KEY, ApiProcess, BatchDriverProcess, wait_until

DB_DRIVER = 26
LINES = [{"custom_id": "r0", "method": "POST", "url": "/v1/embeddings", "body": {"model": "sim-h100", "input": "x"}}]


def auth(key: str = USER_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def driver_redis(redis_server):
    url = redis_server.url(DB_DRIVER)
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    yield url, client
    client.flushdb()


def create(api: ApiProcess, lines: list[dict] = LINES) -> str:
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = requests.post(
        f"{api.base}/v1/files", files={"file": ("in.jsonl", content), "purpose": (None, "batch")}, headers=auth()
    )
    assert uploaded.status_code == 200, uploaded.text
    body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}
    created = requests.post(f"{api.base}/v1/batches", json=body, headers=auth(), timeout=30)
    assert created.status_code == 200, created.text
    return created.json()["id"]


def status(api: ApiProcess, batch_id: str) -> str:
    return requests.get(f"{api.base}/v1/batches/{batch_id}", headers=auth(), timeout=30).json()["status"]


def cancel_and_wait(api: ApiProcess, batch_id: str) -> None:
    requests.post(f"{api.base}/v1/batches/{batch_id}/cancel", headers=auth(), timeout=30)
    wait_until(lambda: status(api, batch_id) == "cancelled", 60, 0.1, f"batch {batch_id} cancelled")


def batches_check(api: ApiProcess) -> dict:
    return requests.get(f"{api.base}/health", headers=auth(ADMIN_KEY), timeout=30).json()["checks"]["batches"]


def test_an_api_alone_runs_no_batch_and_a_driver_beside_it_does(driver_redis):
    url, _client = driver_redis
    api = ApiProcess(url, name="api-without-driver", AETHERCORE_AUTH="true").start()
    try:
        batch_id = create(api)
        time.sleep(3)  # an API process's own driver thread started a new batch within a second
        assert status(api, batch_id) == "validating"
        check = batches_check(api)
        assert check["active"] == 1 and check["drivers"] == 0, check
        assert "manage.py batches" in check["error"] and check["status"] == "ok"  # said, never failing /health
        with api.driving():
            wait_until(lambda: status(api, batch_id) != "validating", 30, 0.1, "the driver to validate it")
            wait_until(lambda: batches_check(api)["drivers"] == 1, 10, 0.2, "/health to see the driver")
            assert "error" not in batches_check(api)
            cancel_and_wait(api, batch_id)
    finally:
        api.stop()


def test_an_idle_driver_starts_a_new_batch_at_once(driver_redis):
    """Idle, a driver waits up to a second between passes; the API's wake note ends that wait when a batch is
    created (the median of 5 starts well under the 0.5 s an idle wait alone would average)."""
    url, _client = driver_redis
    api = ApiProcess(url, name="api-wake", batches=True, AETHERCORE_AUTH="true").start()
    try:
        waits = []
        for _ in range(5):
            time.sleep(1.5)  # nothing unfinished: the driver is in its idle wait
            began = time.monotonic()
            batch_id = create(api)
            wait_until(lambda b=batch_id: status(api, b) != "validating", 10, 0.01, "the batch to start")
            waits.append(time.monotonic() - began)
            cancel_and_wait(api, batch_id)
        assert statistics.median(waits) < 0.3, waits
    finally:
        api.stop()


def niceness(pid: int) -> set[int]:
    """The nice value of every thread of the process (/proc/PID/task/TID/stat: field 19)."""
    values = set()
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        values.add(int(stat.read_text().rsplit(")", 1)[1].split()[16]))
    return values


def test_a_driver_runs_niced_and_stops_cleanly_giving_its_leases_up(driver_redis):
    url, client = driver_redis
    api = ApiProcess(url, name="api-stopping-driver", AETHERCORE_AUTH="true").start()
    try:
        first = BatchDriverProcess(api.env, "batches-stopped").start()
        assert niceness(first.proc.pid) == {10}, niceness(first.proc.pid)
        batch_id = create(api)  # no worker: its line waits, the batch stays in progress, leased by the driver
        wait_until(lambda: status(api, batch_id) == "in_progress", 30, 0.1, "the batch in progress")
        wait_until(lambda: client.get(batch_lease_key(batch_id)), 10, 0.1, "the driver's lease")
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(30) == 0
        log = first.log()
        assert "running at nice 10" in log and "stopped (1 leases given up)" in log, log
        assert "Logging error" not in log and "Traceback" not in log, log
        assert not client.exists(batch_lease_key(batch_id))  # given up: nobody waits for it to lapse
        second = BatchDriverProcess({**api.env, "AETHERCORE_BATCH_DRIVER_NICE": "0"}, "batches-successor").start()
        try:
            assert niceness(second.proc.pid) == {0}
            cancel_and_wait(api, batch_id)
        finally:
            second.stop()
    finally:
        api.stop()
