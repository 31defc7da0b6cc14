"""The model runs in its own process: a crash mid-batch, a hang, unload and eviction, each for real
(SIGKILL, SIGSTOP, real worker, real Redis, real minilm)."""

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import yaml

from tasks.names import job_events_key
from tests.conftest import client_for, settings_for
from tests.support import REPO_ROOT, WorkerProcess, wait_until

pytestmark = pytest.mark.slow

DB_MODEL_PROCESS = 6
LONG = "a sentence long enough to make the forward pass of a batch take a while " * 6


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory):
    """A worker whose minilm gives up on a silent model process after 3 s (timeout_s)."""
    models = yaml.safe_load((REPO_ROOT / "config" / "models.yaml").read_text())
    models["models"]["minilm"]["timeout_s"] = 3
    models_file = tmp_path_factory.mktemp("model-process") / "models.yaml"
    models_file.write_text(yaml.safe_dump(models))
    url = redis_server.url(DB_MODEL_PROCESS)
    worker = WorkerProcess(url, name="model-process", AETHERCORE_MODELS_FILE=str(models_file)).start()
    client = client_for(settings_for(url, models_file=models_file))
    assert client.post("/models/minilm/load?wait=120").get_json()["status"] == "succeeded"
    yield worker, client, redis.Redis.from_url(url, decode_responses=True)
    worker.stop()


def model_pid(worker, model_id="minilm"):
    info = (worker.record() or {}).get("models", {}).get(model_id)
    return info["info"]["processes"][0]["pid"] if info else None


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def done_events(r, job_id):
    return sum(1 for _id, e in r.xrange(job_events_key(job_id)) if e["type"] == "done")


def submit_many(client, n):
    with ThreadPoolExecutor(16) as pool:
        return list(
            pool.map(
                lambda i: client.post(
                    "/serve", json={"model_id": "minilm", "inputs": {"text": f"{i} {LONG}"}}
                ).get_json()["job_id"],
                range(n),
            )
        )


def finished(client, job_ids, timeout=90):
    def all_ended():
        jobs = [client.get(f"/jobs/{j}").get_json() for j in job_ids]
        return jobs if all(j["status"] not in ("queued", "running") for j in jobs) else None

    return wait_until(all_ended, timeout, 0.2, "every job to end")


def test_the_worker_process_holds_no_model(cluster):
    worker, _client, _r = cluster
    pid = model_pid(worker)
    assert pid and pid != worker.proc.pid and alive(pid)
    maps = open(f"/proc/{worker.proc.pid}/maps").read()
    assert "libtorch" not in maps and "onnxruntime" not in maps  # the Celery process never imports them


def test_a_model_process_killed_mid_batch_is_restarted_and_its_jobs_end_once(cluster):
    worker, client, r = cluster
    pid = model_pid(worker)
    job_ids = submit_many(client, 96)
    wait_until(
        lambda: any(client.get(f"/jobs/{j}").get_json()["status"] == "running" for j in job_ids),
        30,
        0.01,
        "the first batch to run",
    )
    os.kill(pid, signal.SIGKILL)
    jobs = finished(client, job_ids)
    assert [j["status"] for j in jobs] == ["succeeded"] * 96, [j["error"] for j in jobs if j["error"]]
    # Never a second end (a job nobody follows that streamed nothing has no event stream at all: 0).
    assert all(done_events(r, j) <= 1 for j in job_ids)
    assert all(len(j["result"]["output"]["embedding"]) == 384 for j in jobs)
    wait_until(lambda: model_pid(worker) not in (None, pid), 10, 0.2, "the restarted process in the heartbeat")
    assert not alive(pid) and alive(model_pid(worker))
    assert worker.record()["models"]["minilm"]["info"]["restarts"] >= 1


def test_a_hung_model_process_is_killed_after_its_timeout_and_its_jobs_retried(cluster):
    worker, client, r = cluster
    pid = model_pid(worker)
    os.kill(pid, signal.SIGSTOP)  # alive, but makes no progress: a hang
    try:
        started = time.monotonic()
        job = client.post("/serve?wait=60", json={"model_id": "minilm", "inputs": {"text": "still there?"}}).get_json()
        took = time.monotonic() - started
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
    assert job["status"] == "succeeded" and len(job["result"]["output"]["embedding"]) == 384
    assert took >= 3  # the model's timeout_s passed before the process was replaced
    wait_until(lambda: not alive(pid), 10, 0.1, "the hung process to be gone")
    assert "made no progress" in worker.log()


def test_unload_ends_the_model_process_and_gives_its_memory_back(cluster):
    worker, client, _r = cluster
    # The heartbeat after the last restart: the live model process with its memory.
    before = wait_until(
        lambda: (m := worker.record()["memory"])["model_processes_rss_bytes"] > 0 and m,
        10,
        0.2,
        "a heartbeat with the model process",
    )
    pid = model_pid(worker)
    assert before["model_processes_rss_bytes"] > 100e6 and before["cache_used_bytes"] > 80e6
    assert client.post("/models/minilm/unload?wait=60").get_json()["status"] == "succeeded"
    wait_until(lambda: not alive(pid), 10, 0.1, "the model process to exit")
    after = wait_until(
        lambda: (m := worker.record()["memory"])["model_processes_rss_bytes"] == 0 and m,
        10,
        0.2,
        "the heartbeat after the unload",
    )
    assert after["cache_used_bytes"] == 0
    # The worker process itself held no model: its own RSS did not grow with the model's.
    assert after["rss_bytes"] <= before["rss_bytes"] * 1.1
    # Loaded again: a fresh process serves it.
    assert (
        client.post("/serve?wait=120", json={"model_id": "minilm", "inputs": {"text": "back"}}).get_json()["status"]
        == "succeeded"
    )
    assert model_pid(worker) not in (None, pid)


def test_embeddings_can_come_back_as_base64_float32(cluster):
    import base64

    import numpy as np

    _worker, client, _r = cluster
    body = {"model_id": "minilm", "inputs": {"text": "compact"}}
    floats = client.post("/serve?wait=60", json=body).get_json()["result"]["output"]["embedding"]
    packed = client.post("/serve?wait=60", json={**body, "encoding_format": "base64"}).get_json()
    vector = np.frombuffer(base64.b64decode(packed["result"]["output"]["embedding"]), dtype="<f4")
    assert vector.shape == (384,) and np.allclose(vector, floats, atol=1e-7)
    bad = client.post("/serve", json={**body, "encoding_format": "hex"})
    assert bad.status_code == 422 and "encoding_format" in json.dumps(bad.get_json())
