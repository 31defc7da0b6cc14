"""The pieces that let a process ride out a Redis failover, each against a real Redis: a connection cut off under a
blocked reader fails that read at once (tasks/failover.py), and an ack on a channel whose connection Celery already
replaced is a connection error Celery logs, not kombu's AttributeError that stopped the worker (tasks/broker.py).
The whole failover, with real sentinels and processes: tests/integration/test_failover.py."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from kombu import Connection

from tasks.broker import TRANSPORT
from tasks.failover import cut_off


def test_a_reader_blocked_on_a_connection_that_is_cut_off_fails_at_once(main_redis_url):
    client = redis.Redis.from_url(main_redis_url, socket_timeout=30)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("aethercore:test:nothing-comes")
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            while True:
                pubsub.get_message(timeout=20)  # blocks: nothing is published
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.3)
    started = time.monotonic()
    cut_off(pubsub.connection_pool)  # the subscription's connection is one of the pool's, in use
    reader.join(5)
    assert not reader.is_alive(), "the blocked read did not notice its connection was cut off"
    assert time.monotonic() - started < 5
    assert isinstance(outcome[0], redis.ConnectionError), outcome


def test_an_ack_on_a_channel_whose_connection_was_replaced_is_a_connection_error(main_redis_url):
    connection = Connection(main_redis_url, transport=TRANSPORT)
    try:
        channel = connection.default_channel
        channel.connection.client = None  # what kombu's Connection.collect() leaves behind while Celery reconnects
        channel._pool = None
        channel._sync_client = None
        with pytest.raises(connection.connection_errors):
            channel.qos._remove_from_indices("a-delivery-tag")  # what basic_ack runs
    finally:
        connection.release()
