"""AETHERCORE_BROKER_URL separate from Redis: RabbitMQ carries the jobs, Redis keeps results and state."""

import socket

import pytest

from tests.conftest import client_for, settings_for
from tests.support import WorkerProcess

BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def rabbitmq_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
        return True
    except OSError:
        return False


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not rabbitmq_up(), reason="needs RabbitMQ on 127.0.0.1:5672")]


def test_jobs_travel_through_rabbitmq(redis_server):
    url = redis_server.url(21)
    worker = WorkerProcess(url, name="amqp-worker", AETHERCORE_BROKER_URL=BROKER).start()
    try:
        client = client_for(settings_for(url, broker_url=BROKER))
        job = client.post("/serve?wait=60", json={"model_id": "tiny-mlp", "inputs": {"features": [[1, 2, 3, 4]]}})
        assert job.get_json()["status"] == "succeeded"
        assert client.post("/models/tiny-mlp/unload?wait=60").get_json()["status"] == "succeeded"
        # Nothing was queued in Redis: the device queue lives in RabbitMQ.
        assert not worker_redis_list(url)
    finally:
        worker.stop()


def worker_redis_list(url: str) -> list:
    import redis

    return redis.Redis.from_url(url).lrange("cpu", 0, -1)
