"""A real Redis failover: a primary, two replicas and three sentinels (Debian's redis-server on loopback); an API, a
worker and the webhook dispatcher on `sentinel://`, with replicated acknowledgement (MIN_REPLICAS_ACK=1).
The primary is SIGKILLed, then (the next one) frozen past the sentinels' down-after and resumed: each time a replica
is promoted and every process carries on without a restart (the worker's pid is the same), what was acknowledged
before is still there, jobs flow again, their webhooks arrive, and the gap is answered 503 with Retry-After, never
500. The storm with load and numbers is `python -m bench failover` (bench/failover.py)."""

from __future__ import annotations

import hashlib
import time

import pytest
import requests

from cli.supervise import SentinelGroup
from tasks.redis_client import make_redis
from tests.support import USER_KEY, ApiProcess, ManagedProcess, WorkerProcess, base_env, wait_until
from tests.webhook_receiver import Receiver
from webhooks.owners import WebhookOwners

pytestmark = pytest.mark.slow

USER = {"Authorization": f"Bearer {USER_KEY}"}
OWNER = f"env:{hashlib.sha256(USER_KEY.encode()).hexdigest()[:12]}"
MLP = {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}}
COMMON = {
    "AETHERCORE_REDIS_SENTINEL_MASTER": "aether",
    "AETHERCORE_REDIS_MIN_REPLICAS_ACK": "1",
    "AETHERCORE_WEBHOOK_RETRY_BASE": "0.3",
    "AETHERCORE_WEBHOOK_RETRY_MAX_DELAY": "1",
    "AETHERCORE_WEBHOOK_ALLOW": "127.0.0.1",
}


@pytest.fixture(scope="module")
def ha():
    group = SentinelGroup(replicas=2, sentinels=3, down_after_ms=1000, min_replicas_to_write=1).start()
    receiver = Receiver().start()
    processes = []
    try:
        worker = WorkerProcess(group.url, name="ha-worker", **COMMON).start()
        processes.append(worker)
        api = ApiProcess(group.url, name="ha-api", AETHERCORE_AUTH="true", **COMMON).start()
        processes.append(api)
        client = make_redis(group.url, "aether")
        dispatcher = ManagedProcess("ha-dispatcher", base_env(group.url, **COMMON)).spawn("dispatcher")
        processes.append(dispatcher)
        wait_until(lambda: client.zcard("aethercore:webhook:dispatchers") > 0, 30, 0.1, "the dispatcher")
        WebhookOwners(client).secret(OWNER, create=True)
        yield {"group": group, "api": api, "worker": worker, "dispatcher": dispatcher, "receiver": receiver}
    finally:
        for process in reversed(processes):
            process.stop()
        receiver.stop()
        group.stop()


def submit(ha, wait: float = 0) -> requests.Response:
    body = {**MLP, "webhook": {"url": ha["receiver"].url}}
    return requests.post(f"{ha['api'].base}/serve", params={"wait": wait}, json=body, headers=USER, timeout=60)


def job(ha, job_id: str) -> dict:
    answer = requests.get(f"{ha['api'].base}/jobs/{job_id}", headers=USER, timeout=10)
    assert answer.status_code in (200, 202), answer.text  # 202 while it has not ended
    return answer.json()


def accepted_after_the_gap(ha, timeout_s: float = 40) -> tuple[str, list[requests.Response]]:
    """Submit until the API accepts a job again; its id and every refusal on the way."""
    refusals: list[requests.Response] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            answer = submit(ha)
        except requests.RequestException:
            time.sleep(0.2)
            continue
        if answer.status_code == 202:
            return answer.json()["job_id"], refusals
        refusals.append(answer)
        time.sleep(0.2)
    raise AssertionError(f"no job accepted {timeout_s} s after the failover: {[r.text for r in refusals[-3:]]}")


def delivered(ha, job_id: str) -> None:
    receiver = ha["receiver"]
    wait_until(lambda: any(r["status"] < 300 for r in receiver.for_job(job_id)), 40, 0.2, f"{job_id}'s webhook")


def carries_on(ha, before: str, pid: int) -> None:
    """What was acknowledged before is there, a job submitted after the failover ends and its webhook arrives,
    the gap was 503 with Retry-After, and no process restarted."""
    after, refusals = accepted_after_the_gap(ha)
    for refusal in refusals:
        assert refusal.status_code == 503, refusal.text
        assert refusal.headers.get("Retry-After"), refusal.headers
    assert job(ha, before)["status"] == "succeeded"
    wait_until(lambda: job(ha, after)["status"] == "succeeded", 60, 0.2, "the job submitted after the failover")
    delivered(ha, after)
    # The API's reply listener follows too: a waiting request is answered at its job's end.
    waited = submit(ha, wait=30)
    assert waited.status_code == 200 and waited.json()["status"] == "succeeded", waited.text
    assert ha["worker"].proc.pid == pid and not ha["worker"].died(), ha["worker"].log()[-3000:]
    assert not ha["api"].died() and not ha["dispatcher"].died()
    health = wait_until(
        lambda: (r := requests.get(f"{ha['api'].base}/health", timeout=5)).status_code == 200 and r, 30, 0.5, "health"
    )
    assert health.json()["status"] == "ok"


def test_a_killed_primary_is_replaced_and_every_process_follows(ha):
    first = submit(ha, wait=30)
    assert first.status_code == 200 and first.json()["status"] == "succeeded", first.text
    delivered(ha, first.json()["job_id"])
    pid = ha["worker"].proc.pid
    old, new = ha["group"].kill_primary()
    assert old != new
    carries_on(ha, first.json()["job_id"], pid)


def test_a_frozen_primary_comes_back_as_a_replica_and_nobody_writes_to_it(ha):
    first = submit(ha, wait=30)
    assert first.status_code == 200, first.text
    pid = ha["worker"].proc.pid
    old, new = ha["group"].pause_primary()
    assert ha["group"].role(old) == "slave" and ha["group"].role(new) == "master"
    carries_on(ha, first.json()["job_id"], pid)
