"""One reader per API process for every open stream (SSE, WebSocket): one XREAD for all of them.

A generation model's running batch writes one chunk to each of its streams at every decoding step, so
with one blocking XREAD per open stream an API process made one Redis round trip per chunk (64 streams x
32 tokens = 2,048 of them) and woke a thread per round trip. Here one thread reads every followed job
stream in one `XREAD BLOCK` call and hands each stream's new entries to its followers, so the round
trips per step are one per API process, however many streams are open.

A new follower is picked up by the next read, at most BLOCK_MS later (the read does not wait longer
than that, which also bounds what an idle hub costs: a few cheap calls per second).

One hub serves every stream of the process, so nothing one follower brings may stop it: a position is
checked (`position`) before it can reach the hub; a stream Redis refuses to read fails that follower alone
(the others are read again without it); any other error in the loop is logged and the loop goes on; and
should the thread die all the same, the next follower that finds nothing new, or the next subscriber, starts
it again (tasks/per_process.py) with every subscription kept.

Below HTTP (built once per API process by api/services.py): may import tasks/ and config/; never api or flask.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from typing import Any, cast

import redis
from loguru import logger

from tasks.names import job_events_key
from tasks.per_process import PerProcessThread

BLOCK_MS = 20
COUNT = 500

# A Redis Stream entry id: <milliseconds>-<sequence>, each an unsigned 64-bit number.
_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})", re.ASCII)
MAX_PART = 2**64 - 1


class InvalidPosition(ValueError):
    """Not a position in a Redis Stream (`<ms>-<seq>`, each part at most 2^64-1)."""


class SubscriptionFailed(RuntimeError):
    """Redis refused to read this follower's stream; the hub dropped it (the others go on)."""


def position(entry_id: str) -> tuple[int, int]:
    """A stream position as numbers: the one check every position passes before anything reads from it
    (a resume id from a client, a subscription's start). Raises InvalidPosition; never int()'s unbounded text."""
    match = _ENTRY_ID.fullmatch(entry_id) if isinstance(entry_id, str) else None
    if match is None:
        raise InvalidPosition("a stream position is <milliseconds>-<sequence>, two whole numbers")
    ms, seq = int(match[1]), int(match[2])
    if ms > MAX_PART or seq > MAX_PART:
        raise InvalidPosition("each part of a stream position is at most 2^64-1")
    return ms, seq


def canonical(entry_id: str) -> str:
    """The position as Redis writes it (no leading zeros), checked."""
    ms, seq = position(entry_id)
    return f"{ms}-{seq}"


class Subscription:
    """One follower of one job's stream: the entries after `position`, as the hub reads them."""

    def __init__(self, hub: StreamHub, key: str, last_id: str) -> None:
        self.hub = hub
        self.key = key
        self.position = last_id
        self.after = position(last_id)
        self.entries: deque = deque()
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.error: str | None = None

    def read(self, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        """The entries the hub delivered since the last read, waiting up to `block_ms` for the first. Raises
        SubscriptionFailed once the hub dropped this subscription."""
        if not self.ready.wait(block_ms / 1000):
            self.hub.ensure_running()  # nothing new: also the moment to notice a dead hub thread
            return []
        with self.lock:
            entries = list(self.entries)
            self.entries.clear()
            self.ready.clear()
        if not entries and self.error is not None:
            raise SubscriptionFailed(self.error)
        return entries

    def fail(self, error: str) -> None:
        with self.lock:
            self.error = error
            self.ready.set()


class StreamHub:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._subscriptions: dict[str, list[Subscription]] = {}
        self._lock = threading.Lock()
        self._someone = threading.Event()
        self._thread = PerProcessThread("aethercore-stream-hub", self._run, self._subscriptions.clear)

    def subscribe(self, job_id: str, last_id: str) -> Subscription:
        """Follow the job's stream after `last_id` (raises InvalidPosition for anything but a stream position)."""
        subscription = Subscription(self, job_events_key(job_id), canonical(last_id))
        self.ensure_running()
        with self._lock:
            self._subscriptions.setdefault(subscription.key, []).append(subscription)
        self._someone.set()
        return subscription

    def ensure_running(self) -> None:
        """Start the reading thread if this process has none, or if it died (subscriptions are kept)."""
        self._thread.ensure()

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
            try:
                failing = self._step(failing)
            except Exception:  # whatever it was, the other streams of the process must go on
                logger.exception("stream hub: a step failed; going on")
                threading.Event().wait(0.1)

    def _step(self, failing: bool) -> bool:
        """One read of every followed stream and its delivery; returns whether Redis is failing."""
        with self._lock:
            streams = {
                key: min(followers, key=lambda s: s.after).position
                for key, followers in self._subscriptions.items()
                if followers
            }
        if not streams:
            self._someone.wait(1.0)
            self._someone.clear()
            return failing
        try:
            reply: Any = self.redis.xread(cast(Any, streams), block=BLOCK_MS, count=COUNT)
        except redis.ResponseError:
            # Redis answered, refusing the read: one of the streams is at fault, not the connection.
            self._drop_refused(streams)
            return failing
        except redis.RedisError as exc:
            if not failing:  # once per outage; followers see the outage in their own reads of the job
                logger.warning("stream hub: Redis unavailable ({}); retrying", exc)
            threading.Event().wait(0.5)
            return True
        for key, entries in reply or []:
            self._deliver(key, entries)
        return False

    def _drop_refused(self, streams: dict[str, str]) -> None:
        """Read each stream alone (without blocking) and fail the followers of those Redis refuses."""
        for key, last_id in streams.items():
            try:
                self.redis.xread({key: last_id}, count=1)
            except redis.ResponseError as exc:
                with self._lock:
                    followers = self._subscriptions.pop(key, [])
                logger.warning(
                    "stream hub: Redis refuses to read {} ({}); its {} follower(s) fail", key, exc, len(followers)
                )
                for subscription in followers:
                    subscription.fail(f"the job's event stream cannot be read: {exc}")

    def _deliver(self, key: str, entries: list[tuple[str, Any]]) -> None:
        with self._lock:
            followers = list(self._subscriptions.get(key, []))
        for subscription in followers:
            with subscription.lock:
                new = [entry for entry in entries if position(entry[0]) > subscription.after]
                if new:
                    subscription.entries.extend(new)
                    subscription.position = new[-1][0]
                    subscription.after = position(subscription.position)
                    subscription.ready.set()
