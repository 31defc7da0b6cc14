"""kombu's Redis transport as the workers use it (tasks/broker.py), against a real redis-server: a message taken
from its queue is recorded as unacknowledged before the consumer's callback runs (written without waiting for
Redis's answer), the ack removes the record, and a reject or restore puts the message back on its queue."""

from __future__ import annotations

import time

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tasks.broker import TRANSPORT
from tests.conftest import DB_SCRATCH

QUEUE = Queue("broker-test", Exchange("broker-test", type="direct"), routing_key="broker-test")


@pytest.fixture()
def connection(redis_server, scratch_redis):
    with Connection(redis_server.url(DB_SCRATCH), transport=TRANSPORT) as conn:
        yield conn


def take_one(connection, scratch_redis):
    """Publish one message, consume it without acking; returns the message and whether its unacknowledged
    record was in Redis while the callback ran."""
    channel = connection.default_channel
    Producer(channel).publish({"n": 1}, exchange=QUEUE.exchange, routing_key="broker-test", declare=[QUEUE])
    taken, recorded = [], []

    def in_redis(tag):
        return scratch_redis.type("unacked") == "hash" and scratch_redis.hexists("unacked", tag)

    def callback(body, message):
        deadline = time.monotonic() + 2
        while not in_redis(message.delivery_tag) and time.monotonic() < deadline:
            time.sleep(0.001)
        recorded.append(in_redis(message.delivery_tag))
        taken.append(message)

    with Consumer(channel, [QUEUE], callbacks=[callback], accept=["json"]):
        connection.drain_events(timeout=5)
    return channel, taken[0], recorded[0]


def test_a_taken_message_is_recorded_as_unacknowledged_until_its_ack(connection, scratch_redis):
    channel, message, recorded = take_one(connection, scratch_redis)
    assert recorded  # in Redis before the task would start
    assert scratch_redis.zscore("unacked_index", message.delivery_tag) is not None
    message.ack()
    assert not scratch_redis.hexists("unacked", message.delivery_tag)
    assert scratch_redis.zscore("unacked_index", message.delivery_tag) is None
    assert channel.qos._unread == []  # every answer read: no connection held


def test_a_rejected_message_goes_back_to_its_queue(connection, scratch_redis):
    _channel, message, _ = take_one(connection, scratch_redis)
    message.reject(requeue=True)
    assert scratch_redis.llen("broker-test") == 1
    assert not scratch_redis.hexists("unacked", message.delivery_tag)


def test_unacknowledged_messages_are_restored_when_the_consumer_stops(connection, scratch_redis):
    channel, message, _ = take_one(connection, scratch_redis)
    channel.qos.restore_unacked()
    assert scratch_redis.llen("broker-test") == 1
    assert not scratch_redis.hexists("unacked", message.delivery_tag)


def test_a_record_redis_refuses_is_logged_and_the_next_calls_go_on(connection, scratch_redis):
    from loguru import logger

    scratch_redis.set("unacked", "not a hash")  # HSET inside the record's MULTI/EXEC fails with WRONGTYPE
    logged = []
    sink = logger.add(lambda m: logged.append(str(m)), level="ERROR")
    try:
        channel, message, recorded = take_one(connection, scratch_redis)
        assert not recorded
        channel.qos.drain()
        assert any("unacknowledged record of message" in line and "WRONGTYPE" in line for line in logged), logged
        scratch_redis.delete("unacked")
        message.ack()  # not failed by the earlier record's answer
        assert channel.qos._unread == [] and scratch_redis.zscore("unacked_index", message.delivery_tag) is None
    finally:
        logger.remove(sink)
