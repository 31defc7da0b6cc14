"""kombu's Redis transport, with one redis-py client per channel for its synchronous calls.

kombu 5.7 builds a fresh `redis.Redis` for every publish, ack and delivery bookkeeping call
(`Channel.conn_or_acquire`), and a client's construction (its response-callback table) cost a worker
~12 % of its CPU per inference message at GPU speed. A client is only a view of its connection pool and
safe to share between threads, so the channel keeps one per pool; a new pool (after a reconnect or a
fork) gets a new client. Everything else is kombu's.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

# Celery's `broker_transport` for redis:// and rediss:// brokers (tasks/celery_app.py).
TRANSPORT = f"{__name__}:Transport"


class Channel(kombu_redis.Channel):
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._sync_client
        if client is None or client.connection_pool is not pool:
            client = self._sync_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel
