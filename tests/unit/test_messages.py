"""The task message the API pushes without kombu (tasks/messages.py) is the one kombu writes: same envelope,
headers, properties and body, only the random ids differ. (That Celery workers run it is what every
integration test through /serve shows.)"""

from __future__ import annotations

import base64

import orjson
import pytest
import redis
from celery import Celery

from tasks.messages import TaskMessages
from tests.support import RedisServer

QUEUE = "probe-queue"
KWARGS = {"model_id": "minilm", "jobs": [{"job_id": "a" * 32, "inputs": {"text": "hi"}, "parameters": {}}]}


@pytest.fixture()
def broker(redis_server: RedisServer):
    url = redis_server.url(9)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url, client
    client.flushdb()


def _through_kombu(url: str, client: redis.Redis, **options) -> dict:
    app = Celery("aethercore", broker=url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_send_sent_event=False)
    try:
        app.send_task("aethercore.infer", kwargs=KWARGS, queue=QUEUE, **options)
    finally:
        app.close()
    return orjson.loads(client.rpop(QUEUE))


def _comparable(message: dict) -> dict:
    message = orjson.loads(orjson.dumps(message))
    message["body"] = orjson.loads(base64.b64decode(message["body"]))
    for key in ("reply_to", "delivery_tag"):
        message["properties"][key] = "<random>"
    message["headers"]["origin"] = message["headers"]["origin"].split("@")[0][:3]
    return message


@pytest.mark.parametrize("task_id", ["b" * 32, None])
def test_the_message_is_kombus(broker, task_id):
    url, client = broker
    options = {"kwargsrepr": "{'job_ids': [...]}"} | ({"task_id": task_id} if task_id else {})
    kombu = _through_kombu(url, client, **options)
    ours = orjson.loads(TaskMessages().build("aethercore.infer", KWARGS, QUEUE, task_id, options["kwargsrepr"]))
    if task_id is None:  # kombu made up an id: take it, to compare the rest
        ours = orjson.loads(
            TaskMessages().build("aethercore.infer", KWARGS, QUEUE, kombu["headers"]["id"], options["kwargsrepr"])
        )
    assert _comparable(ours) == _comparable(kombu)


def test_ids_are_fresh_per_message():
    messages = TaskMessages()
    first, second = (orjson.loads(messages.build("t", {}, QUEUE)) for _ in range(2))
    assert first["headers"]["id"] != second["headers"]["id"]
    assert first["properties"]["delivery_tag"] != second["properties"]["delivery_tag"]
    assert first["properties"]["reply_to"] == second["properties"]["reply_to"]  # one per process, as kombu's
