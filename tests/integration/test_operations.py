"""Operations: metrics that add up, request ids into the worker's log, JSON logs, readiness, the CLI."""

import json
import re
import subprocess
import sys
import time

import pytest
import requests

from tasks.request_tally import FLUSH_S
from tests.conftest import DB_MISC, client_for, poll, settings_for
from tests.support import REPO_ROOT, ApiProcess, WorkerProcess, metric, wait_until


def test_request_counter_adds_up_across_gunicorn_workers(main_redis_url, main_worker):
    api = ApiProcess(main_redis_url, name="api-3-workers", AETHERCORE_WORKERS="3").start()
    try:
        # The readiness probes start() sent are counted in whichever process served them, and written within
        # FLUSH_S: let them reach the exposition before the baseline is read.
        time.sleep(FLUSH_S + 0.5)
        before = requests.get(f"{api.base}/metrics", timeout=5).text
        for _ in range(60):
            # A new connection each time, so the requests spread over the gunicorn workers.
            response = requests.get(f"{api.base}/heartbeat", headers={"Connection": "close"}, timeout=5)
            assert response.status_code == 200
        counted = (
            ("aethercore_requests_total", {"status": "200"}),
            ("aethercore_request_duration_seconds_count", {}),
        )

        def added() -> list[float]:
            text = requests.get(f"{api.base}/metrics", timeout=5).text
            return [
                metric(text, name, endpoint="/heartbeat", **labels)
                - metric(before, name, endpoint="/heartbeat", **labels)
                for name, labels in counted
            ]

        # Each process writes what it counted within FLUSH_S (tasks/request_tally.py); then the sums are exact.
        wait_until(lambda: min(added()) >= 60, timeout=10, what="the 60 requests in /metrics")
        time.sleep(FLUSH_S + 0.5)  # every process has flushed again: nothing was counted twice
        assert added() == [60, 60]
        workers = subprocess.run(["pgrep", "-P", str(api.proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 3
    finally:
        api.stop()


def test_request_id_is_echoed_stored_and_logged_by_the_worker(client, main_worker):
    response = client.post(
        "/serve?wait=60",
        json={"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}},
        headers={"X-Request-ID": "req-7f3a-operations"},
    )
    assert response.headers["X-Request-ID"] == "req-7f3a-operations"
    job = response.get_json()
    assert job["request_id"] == "req-7f3a-operations"
    wait_until(lambda: "req-7f3a-operations" in main_worker.log(), 10, 0.1, "the request id in the worker's log")
    line = next(line for line in main_worker.log().splitlines() if "req-7f3a-operations" in line)
    assert job["job_id"] in line and "model_id=tiny-mlp" in line
    generated = client.get("/heartbeat").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    hostile = client.get("/heartbeat", headers={"X-Request-ID": "bad id with spaces and {braces}"}).headers[
        "X-Request-ID"
    ]
    assert re.fullmatch(r"[0-9a-f]{32}", hostile)


def test_worker_metrics_count_every_job_once(client):
    def scrape():
        return client.get("/metrics").get_data(as_text=True)

    client.post("/models/minilm/load?wait=60")
    before = scrape()
    job_ids = [
        client.post("/serve", json={"model_id": "minilm", "inputs": {"text": f"count me {i}"}}).get_json()["job_id"]
        for i in range(20)
    ]
    assert all(poll(client, job_id)["status"] == "succeeded" for job_id in job_ids)

    def delta(name, **labels):
        return metric(scrape(), name, **labels) - metric(before, name, **labels)

    # Workers count in memory and flush with the heartbeat: within a heartbeat every job is counted, once.
    wait_until(
        lambda: delta("aethercore_jobs_total", kind="inference", model="minilm", status="succeeded") >= 20,
        10,
        0.2,
        "the jobs to be counted",
    )
    assert delta("aethercore_jobs_total", kind="inference", model="minilm", status="succeeded") == 20
    assert delta("aethercore_queue_wait_seconds_count", model="minilm") == 20
    assert delta("aethercore_inference_seconds_count", model="minilm") == 20
    # Forward passes too: their sizes add up to the jobs.
    wait_until(lambda: delta("aethercore_batch_size_sum", model="minilm") == 20, 10, 0.2, "batch sizes to add up")
    passes = delta("aethercore_batch_size_count", model="minilm")
    assert 1 <= passes <= 20
    text = scrape()
    assert metric(text, "aethercore_live_workers", device="cpu") >= 1
    assert 'aethercore_queue_depth{queue="cpu"}' in text
    assert "aethercore_stream_connections" in text


@pytest.fixture(scope="module")
def json_worker(redis_server):
    url = redis_server.url(DB_MISC)
    worker = WorkerProcess(url, name="json-worker", AETHERCORE_LOG_FORMAT="json").start()
    yield worker, client_for(settings_for(url))
    worker.stop()


def test_json_log_lines_parse_and_carry_the_job(json_worker):
    worker, client = json_worker
    job = client.post(
        "/serve?wait=60",
        json={"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}},
        headers={"X-Request-ID": "json-req-1"},
    ).get_json()
    assert job["status"] == "succeeded"
    wait_until(lambda: job["job_id"] in worker.log(), 10, 0.1, "the job in the worker's log")
    records = [json.loads(line) for line in worker.log().splitlines() if line.strip()]
    assert all({"time", "level", "component", "message"} <= set(r) for r in records)
    mine = [r for r in records if r.get("job_id") == job["job_id"]]
    assert mine and all(r["model_id"] == "tiny-mlp" and r["request_id"] == "json-req-1" for r in mine)
    # Inputs never appear in the log at INFO.
    assert "features" not in worker.log()


def test_a_batch_ends_in_one_line_naming_each_job_with_its_request_id(json_worker):
    worker, client = json_worker
    assert client.post("/models/tiny-mlp/load?wait=60").get_json()["status"] == "succeeded"
    submitted = {}
    for i in range(12):  # queued without waiting: the worker takes several at a time
        job = client.post(
            "/serve",
            json={"model_id": "tiny-mlp", "inputs": {"features": [[i, 2, 3, 4]]}},
            headers={"X-Request-ID": f"batch-line-{i}"},
        ).get_json()
        submitted[job["job_id"]] = f"batch-line-{i}"
    assert all(poll(client, job_id)["status"] == "succeeded" for job_id in submitted)

    def ends():
        records = [json.loads(line) for line in worker.log().splitlines() if line.strip()]
        return [
            r for r in records if r["message"].startswith("inference succeeded") and "batch-line-" in r["request_id"]
        ]

    wait_until(lambda: sum(len(r["job_id"].split(",")) for r in ends()) >= 12, 10, 0.1, "every end in the log")
    named = {}
    for record in ends():
        job_ids, request_ids = record["job_id"].split(","), record["request_id"].split(",")
        assert len(job_ids) == len(request_ids) and record["model_id"] == "tiny-mlp"
        assert record["message"].startswith(f"inference succeeded: {len(job_ids)} job(s)")
        named.update(zip(job_ids, request_ids))
    assert named == submitted  # each job once, beside its own request id


def test_readiness_flips_when_the_only_worker_stops(json_worker):
    worker, client = json_worker
    assert client.post("/models/tiny-mlp/load?wait=60").get_json()["status"] == "succeeded"
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.get_json()["checks"]["models"]["desired"] == ["tiny-mlp"]
    assert client.get("/health/live").status_code == 200
    worker.stop()
    wait_until(lambda: client.get("/health/ready").status_code == 503, 30, 0.2, "readiness to flip")
    body = client.get("/health/ready").get_json()
    assert body["checks"]["workers"]["status"] == "fail"
    assert body["checks"]["models"]["not_loaded"] == ["tiny-mlp"]
    assert client.get("/health/live").status_code == 200


def run_cli(api_server, *args):
    env = dict(api_server.env, AETHERCORE_URL=api_server.base, COLUMNS="200")
    out = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    return out


def test_cli_jobs_and_system_status(api_server):
    job = requests.post(
        f"{api_server.base}/serve?wait=60",
        timeout=70,
        headers={"X-Request-ID": "cli-test"},
        json={"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}},
    ).json()
    out = run_cli(api_server, "jobs", "list", "--model", "tiny-mlp", "--json")
    assert out.returncode == 0, out.stderr
    assert job["job_id"] in [j["job_id"] for j in json.loads(out.stdout)["jobs"]]
    out = run_cli(api_server, "jobs", "show", job["job_id"], "--json")
    assert json.loads(out.stdout)["request_id"] == "cli-test"
    out = run_cli(api_server, "jobs", "cancel", job["job_id"])
    assert out.returncode == 1 and "already ended" in out.stderr
    out = run_cli(api_server, "system", "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["health"]["status"] == "ok"
    assert status["workers"] and all(w["heartbeat_age_s"] >= 0 for w in status["workers"])
    assert "cpu" in status["health"]["checks"]["queues"]["depth"]
    out = run_cli(api_server, "system", "status")
    assert out.returncode == 0 and "heartbeat age" in out.stdout


def test_cancelling_a_queued_job_means_it_never_runs(redis_server):
    # No worker consumes this database: the job stays queued until it is cancelled.
    client = client_for(settings_for(redis_server.url(DB_MISC + 1)))
    job = client.post("/serve", json={"model_id": "minilm", "inputs": {"text": "never"}}).get_json()
    response = client.delete(f"/jobs/{job['job_id']}")
    assert response.status_code == 200 and response.get_json()["status"] == "cancelled"
    assert client.delete(f"/jobs/{job['job_id']}").status_code == 409
    assert client.get(f"/jobs/{job['job_id']}").get_json()["status"] == "cancelled"
