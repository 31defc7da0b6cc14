"""AETHERCORE_REDIS_MIN_REPLICAS_ACK: a 2xx only for writes a replica confirmed (Redis WAIT), a 503 `not_replicated`
with Retry-After when none does in time; a real primary and replica (redis-server), a real worker."""

from __future__ import annotations

import os
import signal

import pytest
import redis

from cli.supervise import RedisServer, wait_replicas_online
from tasks.failover import not_primary
from tests.conftest import client_for, settings_for
from tests.support import WorkerProcess, wait_until

pytestmark = pytest.mark.slow

MLP = {"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}}


@pytest.fixture(scope="module")
def pair():
    primary = RedisServer().start()
    replica = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(primary.port))).start()
    wait_replicas_online(primary.port, 1)
    yield primary, replica
    replica.cleanup()
    primary.cleanup()


def test_a_job_is_answered_once_a_replica_has_it_and_runs(pair):
    primary, replica = pair
    worker = WorkerProcess(primary.url(0), name="ack-worker", AETHERCORE_REDIS_MIN_REPLICAS_ACK="1").start()
    try:
        client = client_for(settings_for(primary.url(0), redis_min_replicas_ack=1))
        answer = client.post("/serve?wait=30", json=MLP)
        assert answer.status_code == 200, answer.get_json()
        job_id = answer.get_json()["job_id"]
        assert answer.get_json()["status"] == "succeeded"
        # What the client was told exists on the replica too: the job's record with its end.
        copy = redis.Redis(port=replica.port, decode_responses=True)
        assert copy.hget(f"aethercore:job:{job_id}", "status") == "succeeded"
    finally:
        worker.stop()


def test_no_replica_confirming_in_time_is_503_not_replicated_never_a_2xx(pair):
    primary, replica = pair
    client = client_for(settings_for(primary.url(0), redis_min_replicas_ack=1, redis_replica_ack_timeout_ms=300))
    os.kill(replica.proc.pid, signal.SIGSTOP)  # connected, but acknowledging nothing
    try:
        answer = client.post("/serve", json=MLP)
        assert answer.status_code == 503, answer.get_json()
        assert answer.get_json()["error"]["code"] == "not_replicated"
        assert answer.headers["Retry-After"]
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    answer = wait_until(lambda: (a := client.post("/serve", json=MLP)).status_code == 202 and a, 20, 0.2, "a 202")
    assert answer.get_json()["status"] == "queued"


def test_without_the_setting_nothing_waits_for_replicas(pair):
    primary, replica = pair
    client = client_for(settings_for(primary.url(0)))
    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        assert client.post("/serve", json=MLP).status_code == 202
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)


@pytest.mark.parametrize(
    "error, refused",
    [
        (redis.ResponseError("NOREPLICAS Not enough good replicas to write."), True),
        (redis.ReadOnlyError("You can't write against a read only replica."), True),
        (redis.ResponseError("UNBLOCKED force unblock from blocking operation"), True),
        (redis.ResponseError("ERR wrong number of arguments"), False),
        (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
    ],
)
def test_which_refusals_mean_not_the_primary(error, refused):
    assert not_primary(error) is refused
