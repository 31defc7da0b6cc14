"""Completion webhooks and dead letters against real processes: a redis-server, a worker, an API (auth on), the
webhook dispatcher (`manage.py dispatcher`) and a real local HTTP receiver that verifies every signature with the
`standardwebhooks` package. Delivery on each end state, retries after 500s and while the receiver is down, 410,
forbidden addresses, a worker SIGKILLed mid-job, a dispatcher restarted, secret rotation, failed deliveries listed
and retried, dead letters listed and replayed (`manage.py jobs dead|replay`, `manage.py webhooks failed|retry`)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis
import requests
import yaml

from tasks.deadletters import DeadLetters
from tests.support import (
    ADMIN_KEY,
    REPO_ROOT,
    USER_KEY,
    ApiProcess,
    ManagedProcess,
    RedisServer,
    WorkerProcess,
    base_env,
    metric,
    models_with_a_broken_onnx,
    wait_until,
)
from tests.webhook_receiver import Receiver
from webhooks.owners import WebhookOwners

pytestmark = pytest.mark.slow

USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
OWNER = f"env:{hashlib.sha256(USER_KEY.encode()).hexdigest()[:12]}"  # how jobs name USER_KEY's caller
MLP = {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}}
GEN = {"model_id": "tiny-gpt2", "inputs": {"text": "A long story"}, "parameters": {"max_length": 160}}
# Short retries so the tests see a whole schedule: first retry within 0.3 s, doubling to 1 s, for 6 s.
DISPATCH = {
    "AETHERCORE_WEBHOOK_RETRY_BASE": "0.3",
    "AETHERCORE_WEBHOOK_RETRY_MAX_DELAY": "1",
    "AETHERCORE_WEBHOOK_RETRY_WINDOW": "6",
    "AETHERCORE_WEBHOOK_TIMEOUT": "3",
    # The dispatcher allows only 127.0.0.1; the API also 127.0.0.2, so a job may name it and its delivery is refused
    # by the dispatcher's own check (an operator who narrowed the list after the job was submitted).
    "AETHERCORE_WEBHOOK_ALLOW": "127.0.0.1",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("webhooks")
    models = models_with_a_broken_onnx(tmp, autoload=True)
    models_file = tmp / "models.yaml"
    models_file.write_text(yaml.safe_dump(models))
    server = RedisServer().start()
    url = server.url(0)
    common = {
        "AETHERCORE_MODELS_FILE": str(models_file),
        "AETHERCORE_MODEL_ROOTS": str(tmp),
        "AETHERCORE_DEAD_LETTER_MAX": "50",
        **DISPATCH,
    }
    processes: dict[str, object] = {}
    workers = [WorkerProcess(url, name="hook-worker", **common).start()]
    api = ApiProcess(
        url,
        name="hook-api",
        batches=True,  # a batch's webhook (test_a_batch_has_its_webhook...)
        AETHERCORE_AUTH="true",
        **{**common, "AETHERCORE_WEBHOOK_ALLOW": "127.0.0.1,127.0.0.2"},
    ).start()
    r = redis.Redis.from_url(url, decode_responses=True)
    secret = WebhookOwners(r).secret(OWNER, create=True)["current"]

    def start_dispatcher() -> ManagedProcess:
        child = ManagedProcess("hook-dispatcher", base_env(url, **common)).spawn("dispatcher")
        processes["dispatcher"] = child
        wait_until(lambda: r.zcard("aethercore:webhook:dispatchers") > 0 or child.died(), 30, 0.1, "the dispatcher")
        assert not child.died(), child.log()
        return child

    def start_worker(name: str) -> WorkerProcess:
        worker = WorkerProcess(url, name=name, **common).start()
        workers.append(worker)
        return worker

    receiver = Receiver().start()
    yield {
        "url": url,
        "api": api,
        "redis": r,
        "secret": secret,
        "receiver": receiver,
        "start_dispatcher": start_dispatcher,
        "dispatcher": start_dispatcher(),
        "processes": processes,
        "start_worker": start_worker,
        "workers": workers,
        "common": common,
    }
    receiver.stop()
    processes["dispatcher"].stop()
    api.stop()
    for worker in workers:
        worker.stop()
    server.cleanup()


def submit(env, body: dict, wait: float = 0, headers: dict | None = None) -> requests.Response:
    return requests.post(
        f"{env['api'].base}/serve", params={"wait": wait}, json=body, headers=headers or USER, timeout=90
    )


def hooked(env, body: dict, receiver: Receiver | None = None) -> dict:
    return {**body, "webhook": {"url": (receiver or env["receiver"]).url}}


def delivered(env, job_id: str, receiver: Receiver | None = None, count: int = 1, timeout: float = 30) -> list:
    receiver = receiver or env["receiver"]
    return wait_until(
        lambda: (got := receiver.for_job(job_id)) and sum(r["status"] < 300 for r in got) >= count and got,
        timeout,
        0.05,
        f"the delivery of {job_id}",
    )


def job(env, job_id: str) -> dict:
    return requests.get(f"{env['api'].base}/jobs/{job_id}", headers=USER, timeout=10).json()


def manage(env, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    cli_env = base_env(env["url"], AETHERCORE_URL=env["api"].base, AETHERCORE_API_KEY=ADMIN_KEY, COLUMNS="250")
    cli_env.update(env["common"])
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "manage.py"), *args],
        env=cli_env,
        cwd=REPO_ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_each_end_state_is_delivered_signed_once(env):
    receiver, secret = env["receiver"], env["secret"]
    ok = submit(env, hooked(env, MLP), wait=30).json()
    assert ok["status"] == "succeeded"
    failed = submit(env, hooked(env, {"model_id": "broken-onnx", "inputs": {"x": [[1.0]]}}), wait=60).json()
    assert failed["status"] == "failed", failed
    long = submit(env, hooked(env, {**GEN, "parameters": {"max_length": 256}})).json()
    cancel = requests.delete(f"{env['api'].base}/jobs/{long['job_id']}", headers=USER, timeout=10)
    assert cancel.status_code in (200, 202), cancel.text
    expired = submit(env, hooked(env, {**MLP, "timeout": 0.001})).json()

    seen = {}
    for job_id, status in (
        (ok["job_id"], "succeeded"),
        (failed["job_id"], "failed"),
        (long["job_id"], "cancelled"),
        (expired["job_id"], "expired"),
    ):
        request = delivered(env, job_id)[0]
        payload = Receiver.verify(request, secret)  # standardwebhooks: signature, id, timestamp
        assert payload["type"] == f"job.{status}" and payload["data"]["status"] == status, payload
        assert payload["data"]["job_id"] == job_id and payload["data"]["owner"] == OWNER
        assert request["headers"]["webhook-id"] == f"msg_{job_id}"
        seen[status] = payload
    assert seen["succeeded"]["data"]["result"]["output"] == ok["result"]["output"]  # the job's public JSON
    assert seen["failed"]["data"]["error"]["code"] == failed["error"]["code"]
    time.sleep(1)
    assert all(len(receiver.for_job(j)) == 1 for j in (ok["job_id"], failed["job_id"], expired["job_id"]))


def test_retries_after_500s_keep_the_webhook_id_and_sign_each_attempt(env):
    receiver = env["receiver"]
    receiver.script = [500, 503, 502]
    done = submit(env, hooked(env, MLP), wait=30).json()
    attempts = delivered(env, done["job_id"], timeout=30)
    assert [a["status"] for a in attempts] == [500, 503, 502, 200]
    assert {a["headers"]["webhook-id"] for a in attempts} == {f"msg_{done['job_id']}"}
    assert len({a["body"] for a in attempts}) == 1  # the same bytes every time
    for attempt in attempts:
        Receiver.verify(attempt, env["secret"])  # each attempt signed afresh (its own timestamp)
    gaps = [b["at"] - a["at"] for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] < 1.0 and max(gaps) < 3.0, gaps  # first retry within the base delay, then doubling (capped)


def test_a_receiver_down_for_a_while_gets_it_when_back(env):
    down = Receiver().start()
    down.stop()  # nothing listens on its port now
    done = submit(env, hooked(env, MLP, down), wait=30).json()
    time.sleep(2.0)  # several attempts fail (connection refused)
    assert env["redis"].hget(f"aethercore:webhook:delivery:msg_{done['job_id']}", "attempts")
    down.start()  # same port
    try:
        request = delivered(env, done["job_id"], down, timeout=20)[0]
        assert Receiver.verify(request, env["secret"])["data"]["job_id"] == done["job_id"]
    finally:
        down.stop()


def test_410_disables_the_endpoint(env):
    gone = Receiver().start()
    gone.default = 410
    try:
        done = submit(env, hooked(env, MLP, gone), wait=30).json()
        wait_until(lambda: gone.for_job(done["job_id"]), 20, 0.05, "the 410")
        wait_until(
            lambda: WebhookOwners(env["redis"]).disabled(OWNER, gone.url), 10, 0.05, "the endpoint to be disabled"
        )
        refused = submit(env, hooked(env, MLP, gone))
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "webhook_disabled"
        time.sleep(1)
        assert len(gone.for_job(done["job_id"])) == 1  # never retried
        listed = manage(env, "webhooks", "disabled")
        assert gone.url in listed.stdout, listed.stdout + listed.stderr
        assert manage(env, "webhooks", "enable", "--owner", OWNER, gone.url).returncode == 0
        assert submit(env, hooked(env, MLP, gone)).status_code == 202
    finally:
        gone.stop()


@pytest.mark.parametrize(
    "url,status",
    [
        ("http://10.1.2.3/hook", 403),  # private
        ("https://169.254.169.254/latest/meta-data", 403),  # link-local: cloud metadata
        ("https://[::1]:8443/hook", 403),  # loopback, not allowed
        ("http://example.com/hook", 403),  # plain http to a host nobody allowed
        ("https://user:pw@example.com/hook", 422),  # credentials in the URL: not the documented shape
        ("ftp://example.com/hook", 422),
        ("not a url", 422),
    ],
)
def test_forbidden_urls_are_refused_on_submission(env, url, status):
    response = submit(env, {**MLP, "webhook": {"url": url}})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == ("webhook_forbidden" if status == 403 else "validation_error")
    assert "webhook" in str(error["details"])


def test_the_dispatcher_checks_the_address_again_and_never_calls_a_forbidden_one(env):
    elsewhere = Receiver(host="127.0.0.2").start()  # allowed by the API, not by the dispatcher
    try:
        done = submit(env, hooked(env, MLP, elsewhere), wait=30).json()
        assert done["status"] == "succeeded"
        failed = wait_until(
            lambda: next(
                (
                    d
                    for d in requests.get(f"{env['api'].base}/webhooks/failed", headers=ADMIN, timeout=10).json()[
                        "deliveries"
                    ]
                    if d["ref"] == done["job_id"]
                ),
                None,
            ),
            20,
            0.1,
            "the delivery to fail",
        )
        assert failed["reason"] == "forbidden_address" and failed["attempts"] == 1
        assert elsewhere.received == []
    finally:
        elsewhere.stop()


def test_a_worker_killed_mid_job_yields_exactly_one_delivery(env):
    receiver = env["receiver"]
    r = env["redis"]
    job_id = submit(env, hooked(env, {**GEN, "parameters": {"max_length": 200}})).json()["job_id"]
    wait_until(lambda: int(r.hget(f"aethercore:job:{job_id}", "chunks") or 0) >= 3, 60, 0.02, "the job to stream")
    victim = next(w for w in reversed(env["workers"]) if w.proc.poll() is None)
    victim.kill(signal.SIGKILL)
    env["start_worker"]("hook-worker-2")
    request = delivered(env, job_id, timeout=120)[0]
    payload = Receiver.verify(request, env["secret"])
    assert payload["data"]["status"] == "succeeded" and payload["data"]["attempts"] == 2
    time.sleep(2)
    assert len(receiver.for_job(job_id)) == 1  # the end was written once, so it was due once


def test_deliveries_wait_for_a_dispatcher_that_restarts(env):
    env["processes"]["dispatcher"].kill(signal.SIGKILL)
    r = env["redis"]
    r.delete("aethercore:webhook:dispatchers")
    done = [submit(env, hooked(env, MLP), wait=30).json()["job_id"] for _ in range(3)]
    health = requests.get(f"{env['api'].base}/health", headers=ADMIN, timeout=10).json()["checks"]["webhooks"]
    assert health["new"] >= 3 and health["dispatchers"] == 0 and "no dispatcher" in health["error"]
    time.sleep(1)
    assert all(env["receiver"].for_job(j) == [] for j in done)
    env["start_dispatcher"]()
    for job_id in done:
        delivered(env, job_id)


def test_rotation_signs_with_both_secrets_during_the_overlap(env):
    old = env["secret"]
    rotated = manage(env, "auth", "webhook-secret", OWNER, "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip().splitlines()[-1]
    assert new.startswith("whsec_") and new != old
    try:
        done = submit(env, hooked(env, MLP), wait=30).json()
        request = delivered(env, done["job_id"])[0]
        assert len(request["headers"]["webhook-signature"].split(" ")) == 2
        assert Receiver.verify(request, old)["data"]["job_id"] == done["job_id"]  # receivers not switched yet
        assert Receiver.verify(request, new)["data"]["job_id"] == done["job_id"]  # receivers already switched
    finally:
        env["secret"] = new


def test_a_keys_default_endpoint(env):
    other = Receiver().start()
    try:
        set_it = manage(env, "auth", "webhook", OWNER, other.url)
        assert set_it.returncode == 0, set_it.stderr
        time.sleep(5.5)  # API processes re-read default endpoints every 5 s
        done = submit(env, MLP, wait=30).json()  # no webhook in the request
        request = delivered(env, done["job_id"], other)[0]
        assert Receiver.verify(request, env["secret"])["data"]["job_id"] == done["job_id"]
    finally:
        manage(env, "auth", "webhook", OWNER, "--clear")
        other.stop()


def test_failed_for_good_is_listed_dead_lettered_and_retried(env):
    broken = Receiver().start()
    broken.default = 500
    try:
        done = submit(env, hooked(env, MLP, broken), wait=30).json()
        job_id = done["job_id"]
        dead = DeadLetters(env["redis"], 3600, 50)
        entry = wait_until(lambda: dead.get(job_id), 30, 0.2, "the delivery to fail for good")
        assert entry["reason"] == "webhook_failed" and entry["delivery_id"] == f"msg_{job_id}"
        attempts = len(broken.for_job(job_id))
        assert attempts >= 4  # retried for the whole (short) window

        listed = manage(env, "webhooks", "failed")
        assert f"msg_{job_id}" in listed.stdout and "retries_exhausted" in listed.stdout, listed.stdout
        dead_list = manage(env, "jobs", "dead", "--code", "webhook_failed")
        assert job_id in dead_list.stdout, dead_list.stdout + dead_list.stderr

        broken.default = 200
        replayed = manage(env, "jobs", "replay", job_id)
        assert replayed.returncode == 0 and "sent again" in replayed.stdout, replayed.stdout + replayed.stderr
        request = delivered(env, job_id, broken)[-1]
        assert request["headers"]["webhook-id"] == f"msg_{job_id}"  # the same id: the receiver dedupes
        assert Receiver.verify(request, env["secret"])["data"]["job_id"] == job_id
    finally:
        broken.stop()


def test_jobs_expired_in_the_queue_are_dead_letters_and_replay_as_new_jobs(env):
    r = env["redis"]
    for worker in env["workers"]:
        worker.stop()
    wait_until(lambda: requests.get(f"{env['api'].base}/health", timeout=5).status_code == 503, 30, 0.2, "no worker")
    waiting = [submit(env, {**MLP, "timeout": 1}).json()["job_id"] for _ in range(3)]
    time.sleep(1.5)
    env["start_worker"]("hook-worker-3")
    for job_id in waiting:
        wait_until(lambda j=job_id: job(env, j)["status"] == "expired", 60, 0.1, "the job to expire")
    listed = manage(env, "jobs", "dead", "--queue", "cpu", "--code", "expired_in_queue")
    assert listed.returncode == 0 and all(j in listed.stdout for j in waiting), listed.stdout + listed.stderr

    one = manage(env, "jobs", "replay", waiting[0])
    assert one.returncode == 0, one.stderr
    new_id = one.stdout.split("new job ")[1].split()[0]
    replay = wait_until(lambda: (j := job(env, new_id))["status"] == "succeeded" and j, 60, 0.1, "the replay")
    assert replay["replay_of"] == waiting[0] and replay["owner"] == OWNER
    again = requests.post(f"{env['api'].base}/dead-letters/{waiting[0]}/replay", headers=ADMIN, timeout=10)
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_replayed"

    found = requests.get(
        f"{env['api'].base}/dead-letters", params={"code": "expired_in_queue"}, headers=ADMIN, timeout=10
    ).json()["dead_letters"]
    left = sum(1 for e in found if e["replayable"] and not e["replayed_as"])  # these two (and earlier tests' ones)
    assert left >= 2
    refused = manage(env, "jobs", "replay", "--all-matching", "--code", "expired_in_queue", stdin="n\n")
    assert refused.returncode != 0 and f"replay {left} dead letter(s)" in refused.stdout + refused.stderr
    bulk = manage(env, "jobs", "replay", "--all-matching", "--code", "expired_in_queue", stdin="y\n")
    assert bulk.returncode == 0, bulk.stdout + bulk.stderr
    for dead_id in waiting[1:]:
        new_id = r.hget(f"aethercore:dead-entry:{dead_id}", "replayed_as")
        assert wait_until(lambda n=new_id: job(env, n)["status"] == "succeeded", 60, 0.1, "a bulk replay")


def test_metrics_and_health_show_deliveries_and_dead_letters(env):
    text = requests.get(f"{env['api'].base}/metrics", headers=ADMIN, timeout=10).text
    assert metric(text, "aethercore_webhook_deliveries_total", outcome="sent") >= 5
    assert metric(text, "aethercore_webhook_deliveries_total", outcome="retried") >= 3
    assert metric(text, "aethercore_webhook_failures_total", reason="endpoint_gone") >= 1
    assert metric(text, "aethercore_webhook_delivery_seconds_count") >= 5
    assert metric(text, "aethercore_dead_letters", queue="cpu") >= 3
    assert metric(text, "aethercore_dead_letters_total", queue="cpu", reason="expired_in_queue") >= 3
    assert metric(text, "aethercore_webhook_dispatchers") >= 1
    checks = requests.get(f"{env['api'].base}/health", headers=ADMIN, timeout=10).json()["checks"]
    assert checks["dead_letters"]["depth"]["cpu"] >= 3 and checks["webhooks"]["dispatchers"] >= 1


def test_every_key_the_features_write_is_bounded(env):
    """Deliveries, dead letters and their indexes all expire (docs/OPERATIONS.md: every key is bounded)."""
    r = env["redis"]
    for pattern in ("aethercore:webhook:delivery:*", "aethercore:dead-entry:*", "aethercore:dead:*"):
        for key in r.scan_iter(pattern):
            assert r.ttl(key) > 0, key
    assert os.environ.get("AETHERCORE_WEBHOOK_ALLOW") is None  # the test environment did not leak into the suite


def test_a_batch_has_its_webhook_and_files_and_batches_are_created_idempotently(env):
    import openai

    client = openai.OpenAI(base_url=f"{env['api'].base}/v1", api_key=USER_KEY, max_retries=0, timeout=60)
    lines = b"".join(
        b'{"custom_id": "%d", "method": "POST", "url": "/v1/embeddings", "body": {"model": "minilm", "input": "x"}}\n'
        % i
        for i in range(3)
    )
    key = {"Idempotency-Key": str(uuid.uuid4())}
    upload = client.files.create(file=("in.jsonl", lines), purpose="batch", extra_headers=key)
    again = client.files.with_raw_response.create(file=("in.jsonl", lines), purpose="batch", extra_headers=key)
    assert again.parse().id == upload.id and again.headers["Idempotency-Replayed"] == "true"

    key = {"Idempotency-Key": str(uuid.uuid4())}
    create = {
        "input_file_id": upload.id,
        "endpoint": "/v1/embeddings",
        "completion_window": "24h",
        "metadata": {"webhook_url": env["receiver"].url},
        "extra_headers": key,
    }
    batch = client.batches.create(**create)
    assert client.batches.create(**create).id == batch.id  # one batch
    request = delivered(env, batch.id, timeout=120)[0]
    payload = Receiver.verify(request, env["secret"])
    assert payload["type"] == "batch.completed" and payload["data"]["id"] == batch.id
    assert payload["data"]["request_counts"]["completed"] == 3
    line_jobs = [Receiver.payload(r)["data"] for r in env["receiver"].received if b'"type":"job.' in r["body"]]
    assert not [j for j in line_jobs if (j.get("request_id") or "").startswith(batch.id)]  # no delivery per line
