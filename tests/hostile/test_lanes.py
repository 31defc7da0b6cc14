"""Case 2 and 3 of issue 34, attacked as an ordinary `user`: any user could submit to the `high` lane (every
tenant's traffic jumped ahead of everyone's), and a `low` backlog counted against the bound of the interactive
lanes, so one user flooding `low` made every other caller's `/serve` get 429 `queue_full`.

Now `high` is for admins, operators and callers granted it (403 naming the lane and how to be granted it), and the
`low` lane is bounded apart (AETHERCORE_LOW_LANE_QUEUE_DEPTH): a flood of it is refused on its own and never
reaches the interactive lanes' AETHERCORE_MAX_QUEUE_DEPTH.
"""

from __future__ import annotations

import time

import pytest
import redis
import requests
import yaml

from cli.supervise import REPO_ROOT
from tasks.names import job_key
from tests.hostile.conftest import VICTIM_MODEL, assert_still_serving, auth, ensure_loaded
from tests.support import OTHER_USER_KEY, USER_KEY, ApiProcess, RedisServer, WorkerProcess, wait_until

MODEL = "sim-h100"
SLOW = "sim-slow"  # a device a flood outruns: 4 jobs per 250 ms pass
DEPTH = 20  # both lanes' bounds in the flooded cluster
RESULT_TTL_S = 3


def test_a_user_asking_for_the_high_lane_gets_403(hostile_api, hostile_redis):
    body = {"model_id": MODEL, "inputs": {"text": "jump the queue"}, "priority": "high"}
    refused = requests.post(f"{hostile_api.base}/serve", headers=auth(USER_KEY), json=body, timeout=10)
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["details"]["lane"] == "high" and "--lanes" in error["message"]
    v1 = requests.post(
        f"{hostile_api.base}/v1/embeddings",
        headers=auth(USER_KEY),
        json={"model": MODEL, "input": "jump the queue", "service_tier": "priority"},
        timeout=10,
    )
    assert v1.status_code == 403 and v1.json()["error"]["type"] and "'high'" in v1.json()["error"]["message"]
    oip = requests.post(
        f"{hostile_api.base}/v2/models/{MODEL}/infer",
        headers=auth(USER_KEY),
        json={
            "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["jump"]}],
            "parameters": {"priority": "high"},
        },
        timeout=10,
    )
    assert oip.status_code == 403, oip.text
    assert_still_serving(hostile_api, hostile_redis)


@pytest.fixture()
def flooded_cluster(tmp_path):
    """A cluster whose device a flood outruns (one worker, four task threads, a model that takes 250 ms a pass),
    both lanes bounded at DEPTH, results kept RESULT_TTL_S."""
    models = yaml.safe_load((REPO_ROOT / "config" / "models.yaml").read_text())["models"]
    slow = {**models[MODEL], "device": "cpu", "max_batch_size": 4, "max_batch_delay_ms": 0}
    slow["simulate"] = {"base_ms": 250.0, "per_item_ms": 0.0, "dim": 8}
    victim = {**models[VICTIM_MODEL], "max_batch_size": 4}
    models_file = tmp_path / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": {SLOW: slow, VICTIM_MODEL: victim}}))
    server = RedisServer().start()
    env = {"AETHERCORE_MODELS_FILE": str(models_file), "AETHERCORE_RESULT_TTL": str(RESULT_TTL_S)}
    worker = WorkerProcess(server.url(0), name="flood-worker", AETHERCORE_WORKER_CONCURRENCY="4", **env).start()
    api = ApiProcess(
        server.url(0),
        name="flood-api",
        AETHERCORE_AUTH="true",
        AETHERCORE_WORKERS="1",
        AETHERCORE_MAX_QUEUE_DEPTH=str(DEPTH),
        AETHERCORE_LOW_LANE_QUEUE_DEPTH=str(DEPTH),
        **env,
    ).start()
    try:
        yield api, redis.Redis.from_url(server.url(0), decode_responses=True)
    finally:
        api.stop()
        worker.stop()
        server.cleanup()


@pytest.mark.slow
def test_a_user_flooding_the_low_lane_cannot_make_another_users_serve_get_429(flooded_cluster):
    api, client = flooded_cluster
    ensure_loaded(api, SLOW)
    ensure_loaded(api)  # the victim's stream model, before the baseline
    served = requests.post(
        f"{api.base}/serve?wait=30",
        headers=auth(OTHER_USER_KEY),
        json={"model_id": SLOW, "inputs": {"text": "warm"}},
        timeout=40,
    )
    assert served.json()["status"] == "succeeded", served.text
    time.sleep(RESULT_TTL_S + 1)
    baseline = int(client.info("memory")["used_memory"])

    flood, refused = [], None
    with requests.Session() as attacker:
        for _ in range(300):
            response = attacker.post(
                f"{api.base}/serve",
                headers=auth(USER_KEY),
                json={"model_id": SLOW, "inputs": {"text": "flood"}, "priority": "low"},
                timeout=10,
            )
            if response.status_code == 429:
                refused = response.json()["error"]
                break
            assert response.status_code == 202, response.text
            flood.append(response.json()["job_id"])
    assert refused is not None and refused["code"] == "queue_full", refused

    # The device holds the flood, beyond AETHERCORE_MAX_QUEUE_DEPTH: another user's interactive calls are served.
    victim = requests.post(
        f"{api.base}/serve?wait=30",
        headers=auth(OTHER_USER_KEY),
        json={"model_id": SLOW, "inputs": {"text": "interactive"}},
        timeout=40,
    )
    assert victim.status_code == 200 and victim.json()["status"] == "succeeded", victim.text
    assert refused["details"]["lane"] == "low"  # the flood was refused by its own lane's bound
    queued = [
        requests.post(
            f"{api.base}/serve",
            headers=auth(OTHER_USER_KEY),
            json={"model_id": SLOW, "inputs": {"text": "more"}},
            timeout=10,
        ).status_code
        for _ in range(5)
    ]
    assert queued == [202] * 5

    def flood_ended_and_expired() -> bool:
        return not any(client.exists(job_key(job_id)) for job_id in flood)

    wait_until(flood_ended_and_expired, 120, 0.5, "the flood's jobs to end and expire")
    time.sleep(RESULT_TTL_S + 1)  # the victim's jobs too
    assert int(client.info("memory")["used_memory"]) < baseline + 512 * 1024
    assert_still_serving(api, client)
