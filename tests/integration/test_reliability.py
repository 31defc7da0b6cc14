"""No job lost: Redis restarted with AOF, Redis unreachable, a worker killed mid-job, a poison job,
deadlines, a corrupt model file, and every Redis key bounded. Each fault is injected for real."""

import json
import shutil
import signal
import time

import pytest
import redis
import yaml

from config.settings import Settings
from tasks.names import (
    AUTH_KEYS,
    BATCH_DRIVERS,
    DEAD_LETTER_QUEUES,
    DESIRED_MODELS,
    GENERATION_COUNTER,
    HOLDINGS_OWNERS,
    HOLDINGS_TOTAL,
    INFLIGHT_HOLDERS,
    METRICS_COUNTERS,
    METRICS_DEAD_LETTERS,
    METRICS_EXEMPLARS,
    METRICS_HISTOGRAMS,
    METRICS_WEBHOOKS,
    MODEL_ERRORS,
    RECENT_JOBS,
    WEBHOOK_DISABLED,
    WEBHOOK_DISPATCHERS,
    WEBHOOK_ENDPOINTS,
    WEBHOOK_SECRETS,
    WEBHOOKS_DUE,
    WEBHOOKS_FAILED,
    WEBHOOKS_LEASED,
    WORKERS_INDEX,
    inflight_key,
    job_events_key,
    job_key,
)
from tasks.queues import queue_depth
from tests.conftest import client_for, poll, settings_for
from tests.support import RedisServer, WorkerProcess, models_with_a_broken_onnx, wait_until

pytestmark = pytest.mark.slow

GEN = {"model_id": "tiny-gpt2", "inputs": {"text": "A long story"}, "parameters": {"max_length": 256}}
MLP = {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}}
# Longer than a redelivered generation takes on a fresh worker (its model process starts, ~4 s on 2 busy
# cores, then 256 tokens): a message unacknowledged for longer is redelivered even while it runs.
WORKER_ENV = {"AETHERCORE_VISIBILITY_TIMEOUT": "10", "AETHERCORE_MAX_ATTEMPTS": "2"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Our own redis-server with AOF (so it can be restarted) and a models file with a corrupt model."""
    tmp = tmp_path_factory.mktemp("reliability")
    models = models_with_a_broken_onnx(tmp)
    # A copy of tiny-mlp whose weights were changed after its manifest was written.
    shutil.copytree(Settings.from_env().model_store / "tiny-mlp", tmp / "tampered-mlp")
    with open(tmp / "tampered-mlp" / "model.pt2", "r+b") as archive:
        archive.seek(100)
        byte = archive.read(1)
        archive.seek(100)
        archive.write(bytes([byte[0] ^ 0xFF]))
    models["models"]["tampered-mlp"] = {**models["models"]["tiny-mlp"], "model_path": str(tmp / "tampered-mlp")}
    models_file = tmp / "models.yaml"
    models_file.write_text(yaml.safe_dump(models))
    server = RedisServer(appendonly=True).start()
    url = server.url(0)
    settings = settings_for(url, models_file=models_file, visibility_timeout=10, max_attempts=2)
    workers: list[WorkerProcess] = []

    def start_worker(name: str) -> WorkerProcess:
        worker = WorkerProcess(
            url, name=name, AETHERCORE_MODELS_FILE=str(models_file), AETHERCORE_MODEL_ROOTS=str(tmp), **WORKER_ENV
        ).start()
        workers.append(worker)
        return worker

    yield {
        "server": server,
        "url": url,
        "client": client_for(settings),
        "start_worker": start_worker,
        "workers": workers,
    }
    for worker in workers:
        worker.stop()
    server.cleanup()


def raw(env) -> redis.Redis:
    return redis.Redis.from_url(env["url"], decode_responses=True)


def test_results_and_queued_jobs_survive_a_redis_restart_and_deadlines_expire(env):
    client = env["client"]
    worker = env["start_worker"]("rel-1")
    finished = client.post("/serve?wait=60", json=MLP).get_json()
    assert finished["status"] == "succeeded"
    worker.stop()
    wait_until(lambda: client.get("/health").status_code == 503, 30, 0.2, "no live worker")
    late = client.post("/serve", json={**MLP, "timeout": 1}).get_json()
    queued = [client.post("/serve", json=MLP).get_json()["job_id"] for _ in range(3)]
    time.sleep(1.5)  # the first job's deadline passes while it waits in the queue

    env["server"].stop()
    env["server"].start()  # same port, same directory: AOF replays
    assert client.get(f"/jobs/{finished['job_id']}").get_json()["result"] == finished["result"]
    assert all(client.get(f"/jobs/{j}").get_json()["status"] == "queued" for j in queued)
    assert queue_depth(raw(env), "cpu") == 4  # every lane of the cpu queue

    env["start_worker"]("rel-2")
    assert all(poll(client, j)["status"] == "succeeded" for j in queued)
    expired = poll(client, late["job_id"])
    assert expired["status"] == "expired" and expired["error"]["code"] == "deadline_exceeded"
    assert expired["started_at"] is not None and expired["result"] is None


def test_api_and_workers_ride_out_a_redis_outage(env):
    client = env["client"]
    env["server"].stop()
    started = time.monotonic()
    response = client.post("/serve", json=MLP)
    assert response.status_code == 503 and time.monotonic() - started < 5
    assert client.get("/health").status_code == 503
    env["server"].start()
    # Nothing restarted: the API reconnects on its next request, the worker on its own.
    wait_until(lambda: client.get("/health").status_code == 200, 60, 0.5, "the worker to reconnect")
    assert client.post("/serve?wait=60", json=MLP).get_json()["status"] == "succeeded"


def kill_when_running(client, job_id: str, worker: WorkerProcess, attempt: int) -> None:
    wait_until(
        lambda: (
            (j := client.get(f"/jobs/{job_id}").get_json())["status"] == "running"
            and j["attempts"] == attempt
            and j["chunks"] >= 3
        ),
        60,
        0.02,
        f"attempt {attempt} to run",
    )
    worker.kill(signal.SIGKILL)


def test_a_job_whose_worker_is_killed_is_redelivered_and_ends_once(env):
    client = env["client"]
    # The worker from the previous test is the only one: kill it mid-generation.
    job_id = client.post("/serve", json=GEN).get_json()["job_id"]
    victim = next(w for w in reversed(env["workers"]) if w.proc.poll() is None)
    kill_when_running(client, job_id, victim, attempt=1)
    killed_at = time.monotonic()
    env["start_worker"]("rel-3")
    job = poll(client, job_id, timeout=90)
    redelivered_after = time.monotonic() - killed_at
    print(
        f"\nredelivered and finished {redelivered_after:.1f} s after the kill "
        f"(visibility timeout {WORKER_ENV['AETHERCORE_VISIBILITY_TIMEOUT']} s)"
    )
    assert job["status"] == "succeeded" and job["attempts"] == 2
    events = raw(env).xrange(job_events_key(job_id))
    chunks = [json.loads(e["data"])["text"] for _id, e in events if e["type"] == "chunk"]
    indices = [int(e["index"]) for _id, e in events if e["type"] == "chunk"]
    assert indices == list(range(256))  # every chunk exactly once, in order, across both attempts
    assert "".join(chunks) == job["result"]["output"]["text"]
    assert sum(1 for _id, e in events if e["type"] == "done") == 1


def test_a_worker_killed_under_a_full_running_batch_redelivers_every_stream_exactly_once(env):
    """Jobs that joined the running batch at different times, some mid-stream, some waiting, when the
    whole worker is SIGKILLed: every one is redelivered, and each stream still holds each chunk once."""
    client = env["client"]
    plan = [(f"Story number {i} begins", 48 + 24 * (i % 3)) for i in range(8)]
    job_ids = [
        client.post(
            "/serve", json={**GEN, "inputs": {"text": prompt}, "parameters": {"max_length": tokens}}
        ).get_json()["job_id"]
        for prompt, tokens in plan
    ]
    victim = next(w for w in reversed(env["workers"]) if w.proc.poll() is None)
    r = raw(env)
    wait_until(
        lambda: sum(int(r.hget(job_key(j), "chunks") or 0) >= 3 for j in job_ids) >= 4,
        60,
        0.02,
        "the batch to be streaming",
    )
    victim.kill(signal.SIGKILL)
    env["start_worker"]("rel-batch")
    for job_id, (_prompt, tokens) in zip(job_ids, plan):
        job = poll(client, job_id, timeout=120)
        assert job["status"] == "succeeded", job
        events = r.xrange(job_events_key(job_id))
        chunks = [e for _id, e in events if e["type"] == "chunk"]
        assert [int(e["index"]) for e in chunks] == list(range(len(chunks)))
        assert "".join(json.loads(e["data"])["text"] for e in chunks) == job["result"]["output"]["text"]
        assert job["result"]["output"]["tokens"] == tokens
        assert sum(1 for _id, e in events if e["type"] == "done") == 1


def test_a_poison_job_fails_after_bounded_attempts_and_workers_keep_serving(env):
    client = env["client"]
    job_id = client.post("/serve", json=GEN).get_json()["job_id"]
    # It "kills its worker" each time it runs. The first death finds it in a shared running batch: no charge,
    # it is queued again to run alone; then two deaths alone reach AETHERCORE_MAX_ATTEMPTS=2.
    r = raw(env)
    for attempt, place in ((1, "shared"), (2, "alone"), (3, "alone")):
        worker = next(w for w in reversed(env["workers"]) if w.proc.poll() is None)
        # Killed once it is in the model's batch on this attempt (not while its new worker loads the model).
        wait_until(
            lambda attempt=attempt, place=place: (
                client.get(f"/jobs/{job_id}").get_json()["attempts"] == attempt
                and r.hget(job_key(job_id), "pass") == place
            ),
            60,
            0.02,
            f"attempt {attempt} to run",
        )
        worker.kill(signal.SIGKILL)
        env["start_worker"](f"rel-poison-{attempt}")
    job = poll(client, job_id, timeout=90)
    assert job["status"] == "failed" and job["error"]["code"] == "poison_job", job
    assert "not retried" in job["error"]["message"] and job["attempts"] == 3
    assert client.post("/serve?wait=60", json=MLP).get_json()["status"] == "succeeded"


def test_a_corrupt_model_fails_its_load_and_the_worker_keeps_serving(env):
    client = env["client"]
    job = client.post("/models/broken-onnx/load?wait=60").get_json()
    assert job["status"] == "failed" and job["error"]["code"] == "model_load_failed"
    assert "not a loadable ONNX model" in job["error"]["message"]
    wait_until(
        lambda: client.get("/models/broken-onnx/status").get_json()["state"] == "failed",
        10,
        0.1,
        "the model to show failed",
    )
    assert client.post("/serve?wait=60", json=MLP).get_json()["status"] == "succeeded"


def test_a_tampered_model_is_refused_naming_the_file_and_the_worker_keeps_serving(env):
    client = env["client"]
    job = client.post("/models/tampered-mlp/load?wait=60").get_json()
    assert job["status"] == "failed" and job["error"]["code"] == "model_artifact_rejected", job
    assert "model.pt2 does not match" in job["error"]["message"]
    assert client.post("/serve?wait=60", json=MLP).get_json()["status"] == "succeeded"


def test_every_redis_key_is_bounded(env):
    client = env["client"]
    client.post("/serve/batch?wait=60", json={"model_id": "tiny-mlp", "inputs": [MLP["inputs"]] * 3})
    r = raw(env)
    # Keys without a TTL must be bounded by construction: one per configured model, per device queue,
    # per API key, or trimmed (recent jobs, workers index), or Celery's own fixed set.
    bounded = {
        DESIRED_MODELS,
        MODEL_ERRORS,
        GENERATION_COUNTER,
        RECENT_JOBS,
        WORKERS_INDEX,
        METRICS_COUNTERS,
        METRICS_HISTOGRAMS,
        METRICS_EXEMPLARS,  # one field per histogram bucket
        AUTH_KEYS,
        "cpu",
        "unacked",
        "unacked_index",
        INFLIGHT_HOLDERS,  # one name per worker holding jobs, removed when it is reaped
        # dead letters: one name per queue; counters per queue and reason (their entries and indexes expire)
        DEAD_LETTER_QUEUES,
        METRICS_DEAD_LETTERS,
        # webhooks: per API key (secrets, endpoints, disabled ones), the dispatchers (trimmed), their counters, and
        # the schedule (each member's delivery hash expires; a member without one is dropped when claimed)
        WEBHOOK_SECRETS,
        WEBHOOK_ENDPOINTS,
        WEBHOOK_DISABLED,
        WEBHOOK_DISPATCHERS,
        BATCH_DRIVERS,  # the batch drivers' heartbeats, trimmed like the dispatchers'
        METRICS_WEBHOOKS,
        WEBHOOKS_DUE,
        WEBHOOKS_LEASED,
        WEBHOOKS_FAILED,
        # what callers hold (tasks/holdings.py): totals per kind, and one member per owner (the sweep drops those
        # whose objects expired); each owner's own account expires with its furthest object
        HOLDINGS_TOTAL,
        HOLDINGS_OWNERS,
    }
    # A worker's in-flight hash lives only while it holds jobs (an empty hash is no key).
    assert not list(r.scan_iter(inflight_key("*")))
    unbounded = []
    for key in r.scan_iter(count=1000):
        # kombu's bookkeeping: one binding set per queue or exchange, and their deadlines.
        if key.startswith("_kombu.binding"):
            continue
        if r.ttl(key) == -1 and key not in bounded:
            unbounded.append(key)
    assert unbounded == [], unbounded
    assert r.zcard(RECENT_JOBS) <= 10_000
    job_keys = [k for k in r.scan_iter(job_key("*"), count=1000)]
    assert job_keys and all(0 < r.ttl(k) <= 86400 for k in job_keys)
