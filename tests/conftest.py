"""Shared fixtures: a real redis-server started for the session, real worker processes, the real API app."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from config.settings import Settings  # noqa: E402
from tests.support import ADMIN_KEY, RedisServer, WorkerProcess, base_env  # noqa: E402

# Redis databases of the session server, one per group of tests that needs its own cluster state.
DB_MAIN, DB_SCALING, DB_EVICTION, DB_E2E, DB_MISC, DB_SCRATCH = 0, 1, 2, 3, 4, 9


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture()
def scratch_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A database of the session's redis-server of the test's own: empty before it, emptied after it."""
    client = redis.Redis.from_url(redis_server.url(DB_SCRATCH), decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()


def settings_for(redis_url: str, **overrides: Any) -> Settings:
    env = base_env(redis_url)
    return Settings.from_env(env, **overrides)


def client_for(settings: Settings, key: str | None = ADMIN_KEY):
    """A test client of a real app (real Redis), sending `key` as its bearer credential."""
    from api import create_app

    test_client = create_app(settings).test_client()
    if key:
        test_client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return test_client


@pytest.fixture(scope="session")
def main_redis_url(redis_server: RedisServer) -> str:
    return redis_server.url(DB_MAIN)


@pytest.fixture(scope="session")
def main_worker(main_redis_url: str) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(main_redis_url, name="main-worker").start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def app(main_redis_url: str, main_worker: WorkerProcess):
    from api import create_app

    return create_app(settings_for(main_redis_url))


@pytest.fixture()
def client(app):
    test_client = app.test_client()
    test_client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {ADMIN_KEY}"
    return test_client


def submit_and_wait(client, payload: dict, wait: float = 60) -> dict:
    response = client.post(f"/serve?wait={wait}", json=payload)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def poll(client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"/jobs/{job_id}")
        if response.status_code == 200:
            return response.get_json()
        assert response.status_code == 202
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


@pytest.fixture(scope="session")
def api_server(main_redis_url: str, main_worker):
    from tests.support import ApiProcess

    server = ApiProcess(main_redis_url).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def auth_api_server(main_redis_url: str, main_worker):
    """An API process with authentication on (as deployed), and a batch driver beside it (as `manage.py up` runs
    them): for the stock protocol clients (OIP, OpenAI)."""
    from tests.support import ApiProcess

    server = ApiProcess(main_redis_url, name="api-auth-protocols", batches=True, AETHERCORE_AUTH="true").start()
    yield server
    server.stop()


@pytest.fixture()
def client_without_signatures(main_redis_url: str, main_worker):
    """A client of an API that does not know the models' signatures yet (no worker has published them): the
    worker's own checks are then what stands between a bad tensor and the model."""
    import redis

    from tasks.names import SIGNATURES

    store = redis.Redis.from_url(main_redis_url, decode_responses=True)
    saved = store.hgetall(SIGNATURES)
    store.delete(SIGNATURES)
    try:
        yield client_for(settings_for(main_redis_url))
    finally:
        if saved:
            store.hset(SIGNATURES, mapping=saved)
