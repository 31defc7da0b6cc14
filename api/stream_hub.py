"""One reader per API process for every open stream (SSE, WebSocket): one XREAD for all of them.

A generation model's running batch writes one chunk to each of its streams at every decoding step, so
with one blocking XREAD per open stream an API process made one Redis round trip per chunk (64 streams x
32 tokens = 2,048 of them) and woke a thread per round trip. Here one thread reads every followed job
stream in one `XREAD BLOCK` call and hands each stream's new entries to its followers, so the round
trips per step are one per API process, however many streams are open.

A new follower is picked up by the next read, at most BLOCK_MS later (the read does not wait longer
than that, which also bounds what an idle hub costs: a few cheap calls per second).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import redis
from loguru import logger

from api.per_process import PerProcessThread
from tasks.names import job_events_key

BLOCK_MS = 20
COUNT = 500


def _position(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Subscription:
    """One follower of one job's stream: the entries after `position`, as the hub reads them."""

    def __init__(self, key: str, last_id: str) -> None:
        self.key = key
        self.position = last_id
        self.entries: deque = deque()
        self.ready = threading.Event()
        self.lock = threading.Lock()

    def read(self, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        """The entries the hub delivered since the last read, waiting up to `block_ms` for the first."""
        if not self.ready.wait(block_ms / 1000):
            return []
        with self.lock:
            entries = list(self.entries)
            self.entries.clear()
            self.ready.clear()
        return entries


class StreamHub:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._subscriptions: dict[str, list[Subscription]] = {}
        self._lock = threading.Lock()
        self._someone = threading.Event()
        self._thread = PerProcessThread("aethercore-stream-hub", self._run, self._subscriptions.clear)

    def subscribe(self, job_id: str, last_id: str) -> Subscription:
        self._thread.ensure()
        subscription = Subscription(job_events_key(job_id), last_id)
        with self._lock:
            self._subscriptions.setdefault(subscription.key, []).append(subscription)
        self._someone.set()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            followers = self._subscriptions.get(subscription.key, [])
            if subscription in followers:
                followers.remove(subscription)
            if not followers:
                self._subscriptions.pop(subscription.key, None)

    def open_streams(self) -> int:
        return sum(len(followers) for followers in self._subscriptions.values())

    # -- the reading thread -------------------------------------------------------------------
    def _run(self) -> None:
        failing = False
        while True:
            with self._lock:
                streams = {
                    key: min((s.position for s in followers), key=_position)
                    for key, followers in self._subscriptions.items()
                    if followers
                }
            if not streams:
                self._someone.wait(1.0)
                self._someone.clear()
                continue
            try:
                reply = self.redis.xread(streams, block=BLOCK_MS, count=COUNT)
                failing = False
            except redis.RedisError as exc:
                if not failing:  # once per outage; followers see the outage in their own reads of the job
                    logger.warning("stream hub: Redis unavailable ({}); retrying", exc)
                failing = True
                threading.Event().wait(0.5)
                continue
            except Exception:
                logger.exception("stream hub failed a read; going on")
                threading.Event().wait(0.1)
                continue
            for key, entries in reply or []:
                self._deliver(key, entries)

    def _deliver(self, key: str, entries: list[tuple[str, Any]]) -> None:
        with self._lock:
            followers = list(self._subscriptions.get(key, []))
        for subscription in followers:
            with subscription.lock:
                after = _position(subscription.position)
                new = [entry for entry in entries if _position(entry[0]) > after]
                if new:
                    subscription.entries.extend(new)
                    subscription.position = new[-1][0]
                    subscription.ready.set()
