"""A worker with a small model cache evicts the least recently used model to load another."""

import os

import pytest

from tests.conftest import DB_EVICTION, client_for, settings_for
from tests.support import WorkerProcess, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_cache(redis_server):
    url = redis_server.url(DB_EVICTION)
    worker = WorkerProcess(url, name="evict", AETHERCORE_MODEL_CACHE_SIZE="150MB").start()
    yield worker, client_for(settings_for(url))
    worker.stop()


def test_loading_beyond_the_budget_evicts_the_lru_model(small_cache):
    worker, client = small_cache
    assert client.post("/models/minilm/load?wait=60").get_json()["status"] == "succeeded"
    minilm_pid = wait_until(
        lambda: (worker.record()["models"].get("minilm") or {}).get("info", {}).get("processes", [{}])[0].get("pid"),
        10,
        0.2,
        "minilm's model process in the heartbeat",
    )
    assert client.post("/models/minilm-onnx/load?wait=60").get_json()["status"] == "succeeded"
    assert client.get("/models/minilm-onnx/status").get_json()["state"] == "loaded"
    evicted = client.get("/models/minilm/status").get_json()
    assert evicted["state"] == "unloaded" and evicted["replicas"] == []
    record = worker.record()
    assert list(record["models"]) == ["minilm-onnx"]
    # The evicted model's process is gone, and its memory with it.
    assert not os.path.exists(f"/proc/{minilm_pid}") or "zombie" in open(f"/proc/{minilm_pid}/status").read()
    assert record["memory"]["cache_used_bytes"] <= 150 * 10**6
    # The evicted model is served again on demand (lazy load), evicting the other one.
    job = client.post("/serve?wait=60", json={"model_id": "minilm", "inputs": {"text": "back"}}).get_json()
    assert job["status"] == "succeeded"
    assert client.get("/models/minilm-onnx/status").get_json()["state"] == "unloaded"
