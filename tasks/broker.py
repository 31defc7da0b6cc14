"""kombu's Redis transport, with one redis-py client per channel for its synchronous calls, and its record of
an unacknowledged message written without waiting for Redis's answer.

kombu 5.7 builds a fresh `redis.Redis` for every publish, ack and delivery bookkeeping call
(`Channel.conn_or_acquire`), and a client's construction (its response-callback table) cost a worker
~12 % of its CPU per inference message at GPU speed. A client is only a view of its connection pool and
safe to share between threads, so the channel keeps one per pool; a new pool (after a reconnect or a
fork) gets a new client.

Every message a worker takes is first recorded as unacknowledged (kombu's `QoS.append`: one MULTI/EXEC round
trip) before Celery sees it: a lone request waited that round trip before its task could start. `QoS` sends the
same commands and reads their answer later, before anything else touches those records (the next delivery,
an ack, a reject, a restore): the record is on Redis's socket before the task starts, as it was in Redis before.
Everything else is kombu's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from time import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps
from loguru import logger
from redis.exceptions import ConnectionError as RedisConnectionError

from tasks.failover import PrimaryConnection, PrimarySSLConnection, watch_master
from tasks.redis_client import send_now_read_later

# Celery's `broker_transport` for redis:// and rediss:// brokers, and for sentinel:// ones (tasks/celery_app.py).
TRANSPORT = f"{__name__}:Transport"
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unread: list[tuple[str, Callable[[], list[Any]]]] = []
        self._unread_lock = threading.Lock()

    def append(self, message: Any, delivery_tag: str) -> None:
        """kombu's record of an unacknowledged message (the same commands as kombu_redis.QoS.append), sent
        without waiting: its answer is read by the next call that touches the records. A failure to send it
        (Redis unreachable) raises here, as kombu's did."""
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        self.drain()
        with self.channel.conn_or_acquire() as client:
            read = send_now_read_later(
                client,
                [
                    ("MULTI",),
                    ("ZADD", self.unacked_index_key, time(), delivery_tag),
                    ("HSET", self.unacked_key, delivery_tag, record),
                    ("EXEC",),
                ],
            )
        with self._unread_lock:
            self._unread.append((delivery_tag, read))
        virtual.QoS.append(self, message, delivery_tag)  # kombu's in-memory bookkeeping, without its write

    def drain(self) -> None:
        """Read the answers of the records sent so far. A record Redis refused, or whose answer was lost with
        its connection, is logged: its message was already handed to Celery, so raising would only fail
        whatever call came next; without the record kombu cannot restore that message, and the reaper's sweep
        of lost messages sends it again should its worker die (docs/ARCHITECTURE.md)."""
        with self._unread_lock:
            unread, self._unread = self._unread, []
        for delivery_tag, read in unread:
            try:
                replies = read()
                refused = [r for r in replies[-1] or () if isinstance(r, Exception)]  # EXEC's answers
            except Exception as exc:
                refused = [exc]
            if refused:
                logger.error(
                    "the broker's unacknowledged record of message {} was not written: {}", delivery_tag, refused[0]
                )

    def ack(self, delivery_tag: str) -> None:
        self.drain()
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self.drain()
        super().reject(delivery_tag, requeue)

    def restore_unacked(self, client: Any = None) -> None:
        self.drain()
        super().restore_unacked(client)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        self.drain()
        super().restore_by_tag(tag, client, leftmost)


class _ChannelMixin:
    """What both of our channels (plain and Sentinel) change in kombu's."""

    QoS = QoS
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        pool = self.pool  # type: ignore[attr-defined]
        client = self._sync_client
        if client is None or client.connection_pool is not pool:
            client = self._sync_client = super()._create_client()  # type: ignore[misc]
        return client

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        """kombu's, but a channel whose connection was closed raises a connection error (which Celery logs and
        recovers from) instead of AttributeError: while Celery replaces a lost connection (a Redis failover or
        restart), a task thread finishing its job still acknowledges on the old channel, whose pool is rebuilt
        from `connection.client`, already None; kombu's AttributeError reached the worker as "Unrecoverable
        error" and stopped it (2 of 3 Sentinel failovers). The message stays unacknowledged in Redis and is
        restored after the visibility timeout; its job has ended once already, so running it again ends
        nothing twice (tasks/jobs/lifecycle.py)."""
        if self.connection.client is None:  # type: ignore[attr-defined]
            raise RedisConnectionError("the broker connection was closed while this channel was in use")
        return super()._connparams(asynchronous)  # type: ignore[misc]


class Channel(_ChannelMixin, kombu_redis.Channel):
    pass


class SentinelChannel(_ChannelMixin, kombu_redis.SentinelChannel):
    # A refusal that means "not the writable primary" (a frozen primary's NOREPLICAS on the consumer's BRPOP or
    # on kombu's restore mutex, a demoted one's READONLY/UNBLOCKED) is a lost connection, which the consumer
    # recovers from through Sentinel; kombu let it through as a ResponseError that stopped the worker.
    connection_class = PrimaryConnection
    connection_class_ssl = PrimarySSLConnection  # type: ignore[assignment]  # AETHERCORE_REDIS_SENTINEL_TLS (kombu names its own, the same)

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        """kombu's pool, watched by tasks/failover.py like every other Redis client of the process."""
        pool = super()._sentinel_managed_pool(asynchronous)
        manager = self._async_sentinel_manager if asynchronous else self._sentinel_manager
        watch_master(manager, self.master_name, pool)  # type: ignore[attr-defined]
        return pool


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
