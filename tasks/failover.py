"""Following a Sentinel failover in every Redis client of a process, within about a second of the promotion.

redis-py's Sentinel pool asks the sentinels for the master only when it opens a connection, and a connection to
a demoted master that refuses a write (READONLY) reconnects. That leaves the connections that never fail: a
subscription or a blocking read (the API's reply listener, the stream hub's XREAD, the batch driver's BLPOP)
on a primary that was frozen (SIGSTOP, a stalled VM) waits on it, and after it comes back as a replica reads its
copy, late. One thread per process asks the sentinels every second (CHECK_S) who the master is
(one round trip to one sentinel for every pool that watches the same master) and, once they name another, closes
every connection of those pools, idle or in use (`cut_off`): a blocked reader's read fails at once, and its owner
reconnects
(each one handles a lost connection already, as for a Redis restart) to the master the sentinels name.
"""

from __future__ import annotations

import socket
import threading
import weakref
from typing import Any

from loguru import logger
from redis.exceptions import ConnectionError, ReadOnlyError, RedisError, ResponseError
from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

CHECK_S = 1.0
# Error answers of a Redis that is not the writable primary (any more, or yet): a reason to reconnect and retry
# later, never a request's fault. NOREPLICAS: min-replicas-to-write, a primary cut off from its replicas.
NOT_PRIMARY = ("NOREPLICAS", "READONLY", "UNBLOCKED", "MASTERDOWN", "LOADING")


def not_primary(exc: BaseException) -> bool:
    """Whether Redis's error answer `exc` means that it is not the writable primary (see NOT_PRIMARY)."""
    if isinstance(exc, ReadOnlyError):
        return True
    code = getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]
    return code in NOT_PRIMARY


class PrimaryConnection(SentinelManagedConnection):
    """A Sentinel-managed connection on which a "not the writable primary" refusal is a lost connection: it is
    closed, its next use asks the sentinels for the master again, and its user handles it as it handles any
    lost connection (redis-py retries the command once; Celery's consumer reconnects). Such a refusal means the
    command did not run, so running it again cannot do it twice. redis-py does this for READONLY only."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not not_primary(exc):
                raise
            self.disconnect()
            raise ConnectionError(f"Redis is not the writable primary: {exc}") from exc


class PrimarySSLConnection(PrimaryConnection, SentinelManagedSSLConnection):
    """PrimaryConnection over TLS (AETHERCORE_REDIS_SENTINEL_TLS)."""


class _Watch:
    def __init__(self, sentinel: Any, service: str) -> None:
        self.sentinel = sentinel
        self.service = service
        self.pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self.master: tuple[str, int] | None = None

    def check(self) -> None:
        try:
            master = tuple(self.sentinel.discover_master(self.service))
        except RedisError:
            return  # no sentinel names a master it can reach: the connections fail on their own until one does
        if master == self.master:
            return
        before, self.master = self.master, master  # type: ignore[assignment]
        if before is None:
            return
        logger.warning("Redis failover: master {} is now {}:{}; reconnecting", self.service, *master)
        for pool in list(self.pools):
            try:
                cut_off(pool)
            except Exception as exc:  # one pool's trouble must not keep the others on the old master
                logger.warning("closing a pool's connections after the failover failed: {}", exc)


def cut_off(pool: Any) -> None:
    """Close the idle connections of a redis-py pool and shut the sockets of those in use down: their users'
    next read sees the end of the stream and fails as a lost connection, which every user handles (closing a
    socket under another thread's read instead raised TypeError inside redis-py's parser)."""
    pool.disconnect(inuse_connections=False)
    for connection in list(getattr(pool, "_in_use_connections", ())):
        sock = getattr(connection, "_sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed meanwhile


_watches: dict[tuple[tuple[tuple[str, int], ...], str], _Watch] = {}
_lock = threading.Lock()
_thread: threading.Thread | None = None
interval_s = CHECK_S


def watch_master(sentinel: Any, service: str, pool: Any) -> None:
    """Close `pool`'s connections whenever the sentinels of `sentinel` name a new master for `service`."""
    global _thread
    key = (_addresses(sentinel), service)
    with _lock:
        watch = _watches.get(key)
        if watch is None:
            watch = _watches[key] = _Watch(sentinel, service)
        watch.pools.add(pool)
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="redis-failover-watch", daemon=True)
            _thread.start()


def _addresses(sentinel: Any) -> tuple[tuple[str, int], ...]:
    return tuple(
        (s.connection_pool.connection_kwargs.get("host"), s.connection_pool.connection_kwargs.get("port"))
        for s in sentinel.sentinels
    )


def check_now() -> None:
    """One round of checks (the thread's, also for tests)."""
    with _lock:
        watches = list(_watches.values())
    for watch in watches:
        watch.check()


def _run() -> None:
    stop = threading.Event()
    while not stop.wait(interval_s):
        try:
            check_now()
        except Exception:
            logger.exception("the Redis failover watch failed a round; going on")
