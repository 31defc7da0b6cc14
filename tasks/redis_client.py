"""Redis connections with short timeouts, so an unreachable Redis is an error in ~1 s, never a hang."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

CONNECT_TIMEOUT_S = 1.0
SOCKET_TIMEOUT_S = 5.0
# One connection per thread that talks to Redis at the same moment: an API process has AETHERCORE_API_THREADS
# (256 by default) request threads plus its listeners. redis-py 8 caps a pool at 100 by default and fails the
# 101st concurrent command at once ("Too many connections"), which answered requests 503 under a burst of
# streams; this bound is far above any thread count, and Redis's own `maxclients` stays the real limit.
MAX_CONNECTIONS = 8192


def text(value: Any) -> str:
    """A reply's string, whether the client decodes replies (make_redis's do) or not (a raw client's)."""
    return value.decode() if isinstance(value, bytes) else value


def sentinel_hosts(url: str) -> tuple[list[tuple[str, int]], int]:
    """`sentinel://h1:26379;sentinel://h2:26379/0` -> ([(h1, 26379), (h2, 26379)], db 0)."""
    hosts, db = [], 0
    for part in url.split(";"):
        parsed = urlparse(part.strip())
        hosts.append((parsed.hostname or "127.0.0.1", parsed.port or 26379))
        if parsed.path.strip("/"):
            db = int(parsed.path.strip("/"))
    return hosts, db


def make_redis(url: str, sentinel_master: str = "mymaster", **kwargs) -> redis.Redis:
    options = {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "health_check_interval": 30,
        "decode_responses": True,
        # redis-py 8 retries failed commands by default; one quick retry keeps failures fast.
        "retry": Retry(NoBackoff(), 1),
        "max_connections": MAX_CONNECTIONS,
    }
    options.update(kwargs)
    if url.startswith("sentinel://"):
        hosts, db = sentinel_hosts(url)
        sentinel = Sentinel(hosts, socket_timeout=CONNECT_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S)
        # The master is looked up again on reconnect, so a failover is followed without a restart.
        options.pop("health_check_interval", None)
        return sentinel.master_for(sentinel_master, db=db, **options)
    return redis.Redis.from_url(url, **options)


def send_now_read_later(client: redis.Redis, commands: list[tuple[Any, ...]]) -> Callable[[], list[Any]]:
    """Write `commands` to Redis at once and return a call that reads their replies.

    For a write that must reach Redis before something slow starts but whose answer nobody needs until it
    ends (a forward pass's note): the commands are on Redis's socket when this returns, so the slow part does
    not wait a round trip first. The returned call must be made exactly once (it gives the connection back);
    it raises the first error reply, or what the connection raised (RedisError either way).
    """
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(conn.pack_commands(commands))
    except BaseException:
        pool.release(conn)
        raise

    def read() -> list[Any]:
        replies = []
        try:
            for _ in commands:
                replies.append(conn.read_response())
        except BaseException:
            conn.disconnect()  # replies left unread on it: it must not serve another command
            raise
        finally:
            pool.release(conn)
        return replies

    return read
