"""The hostile-traffic suite's own cluster: a worker, an API process (auth on, ONE gunicorn process, so the process a
test attacks is the process it then checks) and a batch driver on a Redis database of their own.

Every test attacks as an ordinary `user` and then calls `assert_still_serving`: another caller's generation
stream completes, `/health/live` answers within a second, and no job of the suite's database is left unended.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests

from tests.support import ADMIN_KEY, OTHER_USER_KEY, USER_KEY, ApiProcess, WorkerProcess, read_sse, wait_until

DB_HOSTILE = 12
# The model another caller streams from after each attack (small, streams token by token).
VICTIM_MODEL = "tiny-gpt2"


def auth(key: str = USER_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def hostile_redis_url(redis_server) -> str:
    url = redis_server.url(DB_HOSTILE)
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="session")
def hostile_redis(hostile_redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(hostile_redis_url, decode_responses=True)


@pytest.fixture(scope="session")
def hostile_worker(hostile_redis_url: str) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(hostile_redis_url, name="hostile-worker").start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def hostile_api(hostile_redis_url: str, hostile_worker: WorkerProcess) -> Iterator[ApiProcess]:
    # As deployed: auth on, the default limit on failed authentications (the fuzzer stays under it), a batch driver.
    server = ApiProcess(
        hostile_redis_url,
        name="hostile-api",
        batches=True,
        AETHERCORE_AUTH="true",
        AETHERCORE_WORKERS="1",
        AETHERCORE_AUTH_FAILURE_LIMIT="100",
    ).start()
    yield server
    server.stop()


def ensure_loaded(api: ApiProcess, model_id: str = VICTIM_MODEL) -> None:
    """Load a model as an admin (a `user` may not), waiting for the load job to end."""
    response = requests.post(f"{api.base}/models/{model_id}/load?wait=120", headers=auth(ADMIN_KEY), timeout=130)
    assert response.status_code in (200, 202), response.text
    job = response.json()
    assert job.get("status") == "succeeded", job


def another_callers_stream(api: ApiProcess, tokens: int = 8, timeout_s: float = 60) -> list[dict[str, Any]]:
    """Another user submits a generation and follows its SSE stream to the end; returns its chunks."""
    ensure_loaded(api)
    submitted = requests.post(
        f"{api.base}/serve",
        headers=auth(OTHER_USER_KEY),
        json={"model_id": VICTIM_MODEL, "inputs": {"text": "Once upon a time"}, "parameters": {"max_length": tokens}},
        timeout=10,
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    chunks, final = [], None
    started = time.monotonic()
    with requests.get(
        f"{api.base}/jobs/{job_id}/stream", headers=auth(OTHER_USER_KEY), stream=True, timeout=timeout_s
    ) as response:
        assert response.status_code == 200, response.text
        for event, _id, data in read_sse(response):
            if event == "chunk":
                chunks.append(data)
            elif event in ("done", "error"):
                final = (event, data)
                break
            assert time.monotonic() - started < timeout_s, "another caller's stream stalled"
    assert final is not None and final[0] == "done", final
    assert final[1]["job"]["status"] == "succeeded", final
    assert chunks, "another caller's stream delivered no chunk"
    return chunks


def assert_live_within(api: ApiProcess, seconds: float = 1.0) -> None:
    started = time.monotonic()
    response = requests.get(f"{api.base}/health/live", timeout=seconds)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < seconds


def unended_jobs(client: redis.Redis) -> list[dict[str, str]]:
    from tasks.names import job_key
    from tasks.states import QUEUED, RUNNING

    pending = []
    for key in client.scan_iter(job_key("*"), count=1000):
        if key.endswith(":events") or client.type(key) != "hash":
            continue
        fields = client.hmget(key, "job_id", "status", "model_id", "kind")
        if fields[1] in (QUEUED, RUNNING):
            pending.append(dict(zip(("job_id", "status", "model_id", "kind"), fields)))
    return pending


def assert_every_job_ends(client: redis.Redis, within_s: float = 60) -> None:
    """No job of the suite's database stays queued or running: each ends within `within_s`."""
    try:
        wait_until(lambda: not unended_jobs(client), within_s, 0.5, "every job to end")
    except Exception:
        raise AssertionError(f"jobs left unended after {within_s} s: {unended_jobs(client)}") from None


def assert_still_serving(api: ApiProcess, client: redis.Redis) -> None:
    """The attacked API process still serves others: live within 1 s, another caller's stream completes, and
    every job ends."""
    assert_live_within(api, 1.0)
    another_callers_stream(api)
    assert_live_within(api, 1.0)
    assert_every_job_ends(client)
