"""Horizontal scaling: several workers on one device queue share the load and the resident models."""

import time

import pytest

from tests.conftest import DB_SCALING, client_for, poll, settings_for
from tests.support import WorkerProcess, metric, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(redis_server):
    url = redis_server.url(DB_SCALING)
    workers = [WorkerProcess(url, name=f"scale-{i}").start(wait=False) for i in range(2)]
    client = client_for(settings_for(url))
    wait_until(
        lambda: client.get("/health").get_json()["checks"]["workers"].get("live") == 2, 90, 0.2, "two live workers"
    )
    yield url, workers, client
    for worker in workers:
        worker.stop()


def replica_workers(client, model_id):
    return {
        r["worker"] for r in client.get(f"/models/{model_id}/status").get_json()["replicas"] if r["state"] == "loaded"
    }


def test_load_reaches_every_worker_and_jobs_spread(cluster):
    url, workers, client = cluster
    job = client.post("/models/minilm/load?wait=60").get_json()
    assert job["status"] == "succeeded"
    names = {w.name for w in workers}
    assert {r["worker"] for r in job["result"]["replicas"]} == names
    assert replica_workers(client, "minilm") == names

    before = client.get("/metrics").get_data(as_text=True)
    job_ids = [
        client.post("/serve", json={"model_id": "minilm", "inputs": {"text": f"sentence {i}"}}).get_json()["job_id"]
        for i in range(32)
    ]
    results = [poll(client, job_id) for job_id in job_ids]
    assert all(r["status"] == "succeeded" for r in results)
    assert {r["result"]["worker"] for r in results} == names

    # Both workers counted into the same figures (each flushes with its heartbeat): every job exactly once.
    def counted() -> str | None:
        text = client.get("/metrics").get_data(as_text=True)
        labels = {"kind": "inference", "model": "minilm", "status": "succeeded"}
        done = metric(text, "aethercore_jobs_total", **labels) - metric(before, "aethercore_jobs_total", **labels)
        return text if done >= 32 else None

    after = wait_until(counted, 10, 0.2, "both workers' counts")
    for name, labels in (
        ("aethercore_jobs_total", {"kind": "inference", "model": "minilm", "status": "succeeded"}),
        ("aethercore_queue_wait_seconds_count", {"model": "minilm"}),
        ("aethercore_inference_seconds_count", {"model": "minilm"}),
    ):
        assert metric(after, name, **labels) - metric(before, name, **labels) == 32
    assert all("load_ms" not in r["result"]["timings"] for r in results)


def test_dead_worker_disappears_and_a_new_one_picks_up_the_models(cluster):
    url, workers, client = cluster
    assert client.post("/models/minilm/load?wait=60").get_json()["status"] == "succeeded"
    victim = workers[0]
    victim.kill()
    started = time.monotonic()
    wait_until(lambda: victim.name not in replica_workers(client, "minilm"), 30, 0.2, "the dead worker to vanish")
    assert time.monotonic() - started <= 30
    assert client.get("/health").get_json()["checks"]["workers"]["live"] == 1

    newcomer = WorkerProcess(url, name="scale-late").start()
    workers.append(newcomer)
    wait_until(
        lambda: newcomer.name in replica_workers(client, "minilm"), 60, 0.2, "the late worker to load minilm by itself"
    )
    job = client.post("/serve?wait=60", json={"model_id": "minilm", "inputs": {"text": "after"}}).get_json()
    assert job["status"] == "succeeded"


def test_unload_reaches_every_worker(cluster):
    url, workers, client = cluster
    job = client.post("/models/minilm/unload?wait=60").get_json()
    assert job["status"] == "succeeded" and job["result"]["state"] == "unloaded"
    assert replica_workers(client, "minilm") == set()
    for worker in workers:
        if worker.proc.poll() is None:
            assert "minilm" not in worker.record()["models"]
