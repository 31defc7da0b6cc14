"""Redis connections with short timeouts, so an unreachable Redis is an error in ~1 s, never a hang; through
Sentinel, connections that follow a failover (tasks/failover.py); and, when asked, writes acknowledged by replicas
before they count (`min_replicas_ack`: every Lua step waits for that many replicas, WAIT, on its own connection).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from tasks.failover import PrimaryConnection, PrimarySSLConnection, watch_master

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
    hosts, db, _ = sentinel_hosts_and_password(url)
    return hosts, db


def sentinel_hosts_and_password(url: str) -> tuple[list[tuple[str, int]], int, str | None]:
    """The sentinels, the db and the data nodes' password of `sentinel://[:password@]h1:26379;...[/db]` (kombu's
    meaning of the URL's password: the master's and replicas', not the sentinels'; theirs is
    AETHERCORE_REDIS_SENTINEL_PASSWORD)."""
    hosts, db, password = [], 0, None
    for part in url.split(";"):
        parsed = urlparse(part.strip())
        hosts.append((parsed.hostname or "127.0.0.1", parsed.port or 26379))
        if parsed.path.strip("/"):
            db = int(parsed.path.strip("/"))
        password = password or parsed.password
    return hosts, db, password


def sentinel_options(password: str | None, tls: dict[str, Any]) -> dict[str, Any]:
    """The connection options for the sentinels themselves (redis-py's, kombu's and the rate limiter's
    `sentinel_kwargs`): short timeouts, their own password (None: none, never the data nodes'), TLS if the data nodes
    have it (AETHERCORE_REDIS_SENTINEL_TLS)."""
    options: dict[str, Any] = {
        "socket_timeout": CONNECT_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "password": password or None,
    }
    if tls:
        options.update(ssl=True, **tls)
    return options


class NotReplicated(redis.ConnectionError):
    """A write Redis made but fewer replicas than AETHERCORE_REDIS_MIN_REPLICAS_ACK confirmed in time: it may be
    lost in a failover, so it must not be answered 2xx (the API answers 503 `not_replicated` with Retry-After)."""


class ReplicatedRedis(redis.Redis):
    """A client whose every Lua step (EVALSHA: job creation with its queue message, a job's end with its webhook
    delivery, idempotency claims, file and batch creation...) is followed, on the same connection and in the same
    round trip, by `WAIT replicas timeout`. WAIT covers every write Redis made before the step, whichever
    connection made it (replication is one ordered stream), so a request's earlier plain writes are covered too."""

    replicas_ack = 0
    ack_timeout_ms = 1000

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:  # type: ignore[override]
        if not self.replicas_ack:
            return super().evalsha(sha, numkeys, *keys_and_args)
        pipe = self.pipeline(transaction=False)
        pipe.evalsha(sha, numkeys, *keys_and_args)
        pipe.execute_command("WAIT", self.replicas_ack, self.ack_timeout_ms)
        reply, acked = pipe.execute(raise_on_error=False)
        if isinstance(reply, Exception):
            raise reply  # NoScriptError included: redis-py's Script loads it and calls again
        check_acked(acked, self.replicas_ack)
        return reply


def check_acked(acked: Any, wanted: int) -> None:
    """Raise NotReplicated unless WAIT's answer `acked` counts at least `wanted` replicas."""
    if isinstance(acked, Exception):
        raise NotReplicated(f"WAIT failed: {acked}")
    if int(acked) < wanted:
        raise NotReplicated(f"{acked} of {wanted} replica(s) confirmed the write in time")


def make_redis(
    url: str,
    sentinel_master: str = "mymaster",
    *,
    min_replicas_ack: int = 0,
    replica_ack_timeout_ms: int = 1000,
    sentinel_password: str | None = None,
    **kwargs: Any,
) -> redis.Redis:
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
    client: redis.Redis
    if url.startswith("sentinel://"):
        hosts, db, password = sentinel_hosts_and_password(url)
        # TLS options (AETHERCORE_REDIS_SENTINEL_TLS): for the sentinels and for the data nodes alike.
        tls = {key: options[key] for key in list(options) if key.startswith("ssl")}
        sentinel = Sentinel(
            hosts,
            socket_timeout=CONNECT_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            sentinel_kwargs=sentinel_options(sentinel_password, tls),
        )
        # The master is looked up again on every new connection; tasks/failover.py closes this client's
        # connections (blocked reads and subscriptions included) once the sentinels name another master.
        options.pop("health_check_interval", None)
        if password:
            options.setdefault("password", password)
        options.pop("ssl", None)  # the connection class says it
        options["connection_class"] = PrimarySSLConnection if tls else PrimaryConnection
        client = sentinel.master_for(sentinel_master, redis_class=ReplicatedRedis, db=db, **options)
        watch_master(sentinel, sentinel_master, client.connection_pool)
    else:
        client = ReplicatedRedis.from_url(url, **options)
    if min_replicas_ack:
        client.replicas_ack = min_replicas_ack  # type: ignore[attr-defined]
        client.ack_timeout_ms = replica_ack_timeout_ms  # type: ignore[attr-defined]
    return client


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
