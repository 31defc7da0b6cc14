"""One listener per API process wakes every request that waits for a job (`?wait`, the sync endpoints).

A waiting request registers its job id here and sleeps on a lock; the job carries this process's
reply channel (`notify`), and the Lua step that ends the job (in the worker's one round trip per
finished batch) publishes the job's ending fields and result on that channel, one message for all the
jobs of a batch that this process waits for. One thread reads the channel and wakes the requests; nobody
holds a blocking Redis read per request, and the answer needs no read-back of the job. The same
connection also hears `models:changed`, which clears the API's short-lived caches.

Pub/sub drops messages while the listener reconnects, so a waiter also re-reads its job every
`RECHECK_S` seconds: a lost message costs latency, never an answer.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis
from loguru import logger

from tasks.jobs.codec import iso
from tasks.jobs.records import Records
from tasks.names import MODELS_CHANGED, reply_channel
from tasks.per_process import PerProcessThread
from tasks.results import expand
from tasks.states import TERMINAL

RECHECK_S = 1.0


class Waiter:
    """One waiting request. It sleeps on a bare lock held from birth, which `wake` releases: a waiting /serve
    costs one lock, not an Event's condition, lock and waiter list (those were ~5 % of an API process's CPU at
    GPU speed)."""

    __slots__ = ("job_id", "_signal", "note", "release")

    def __init__(self, job_id: str, release: Callable[[], None] = lambda: None) -> None:
        self.job_id = job_id
        self._signal = threading.Lock()
        self._signal.acquire()
        self.note: dict[str, Any] | None = None
        self.release = release  # gives back the admission the wait took (api/limits.py), once it ends

    def wake(self, note: dict[str, Any]) -> None:
        self.note = note
        try:
            self._signal.release()
        except RuntimeError:  # woken already (the same ending heard twice)
            pass

    def sleep(self, timeout_s: float) -> bool:
        """True once woken (at once if it was already), False after `timeout_s`."""
        return self._signal.acquire(timeout=timeout_s)


def merge(job: dict[str, Any], note: dict[str, Any]) -> dict[str, Any]:
    """The job as the API knew it, with the ending fields the worker (or a cancelling API) published."""
    ended = dict(job)
    ended.update(
        status=note["status"],
        result=expand(note.get("result")),
        error=note.get("error"),
        finished_at=iso(note.get("finished_at")),
    )
    for name in ("worker", "attempts", "chunks"):
        if note.get(name) is not None:
            ended[name] = note[name]
    if note.get("started_at") is not None:
        ended["started_at"] = iso(note["started_at"])
    return ended


class ReplyListener:
    def __init__(
        self,
        client: redis.Redis,
        jobs: Records,
        on_models_changed: Callable[[str | None], None] = lambda model_id: None,
        admit: Callable[[], Any] | None = None,
    ) -> None:
        self.redis = client
        self.jobs = jobs
        self.on_models_changed = on_models_changed
        # A waiting request holds a thread: `admit()` takes its slot (api/limits.py) or raises the refusal.
        self.admit = admit
        self._waiters: dict[str, Waiter] = {}
        self._lock = threading.Lock()
        self._channel = ""
        self._ready = threading.Event()
        self._thread = PerProcessThread("aethercore-replies", self._listen, self._reset)

    @property
    def channel(self) -> str:
        self._ensure_started()
        return self._channel

    # -- waiting ------------------------------------------------------------------------------
    def expect(self, job_id: str) -> Waiter:
        """Register before the job can end (i.e. before its message is published), and before the job exists:
        with `admit`, a request the process may not let wait is refused here (429/503), having created nothing.
        Every expect() is ended by forget() (wait() ends with it)."""
        self._ensure_started()
        slot = self.admit() if self.admit is not None else None
        waiter = Waiter(job_id, slot.release) if slot is not None else Waiter(job_id)
        with self._lock:
            self._waiters[job_id] = waiter
        return waiter

    def in_flight(self) -> int:
        """Requests of this process now waiting for a job: how loaded the process is."""
        return len(self._waiters)

    def forget(self, waiter: Waiter) -> None:
        with self._lock:
            if self._waiters.get(waiter.job_id) is waiter:
                del self._waiters[waiter.job_id]
        waiter.release()

    def wait(self, waiter: Waiter, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """The job once it ended, or as it stands after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if waiter.sleep(min(remaining, RECHECK_S)):
                    return merge(job, waiter.note) if waiter.note is not None else (self.jobs.get(job["job_id"]) or job)
                current = self.jobs.get(job["job_id"])  # a lost message must not cost the answer
                if current is None or current["status"] in TERMINAL:
                    return current or job
            return self.jobs.get(job["job_id"]) or job
        finally:
            self.forget(waiter)

    # -- the listening thread -----------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._thread.ensure():
            self._ready.wait(2.0)  # subscribed before the first job can be published

    def _reset(self) -> None:
        # One channel per process.
        self._channel = reply_channel(f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}")
        self._waiters = {}
        self._ready.clear()

    def _listen(self) -> None:
        failing = False
        while True:
            pubsub = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self._channel, MODELS_CHANGED)
                self.on_models_changed(None)  # whatever changed while we were not listening
                self._ready.set()
                failing = False
                while True:
                    message = pubsub.get_message(timeout=5.0)
                    if message is not None:
                        self._handle(message)
            except redis.RedisError as exc:
                if not failing:  # once per outage
                    logger.warning("reply listener: Redis unavailable ({}); reconnecting", exc)
                failing = True
                self._ready.set()
                threading.Event().wait(0.5)
            except Exception:
                logger.exception("reply listener failed; restarting it")
                threading.Event().wait(0.5)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass

    def _handle(self, message: dict[str, Any]) -> None:
        if message["channel"] == MODELS_CHANGED:
            self.on_models_changed(message["data"] or None)
            return
        # One job's ending is one JSON object; the jobs of a batch that ended together come as one array
        # (tasks/jobs/lua/transition.lua), so a waiting batch costs this thread one read, not one per job.
        decoded = orjson.loads(message["data"])
        notes = decoded if isinstance(decoded, list) else (decoded,)
        with self._lock:
            woken = [(self._waiters.get(note["job_id"]), note) for note in notes]
        for waiter, note in woken:
            if waiter is not None:
                waiter.wake(note)
