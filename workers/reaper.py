"""No job stays `running` after its worker is gone, whatever the broker did with its message.

Every job a worker starts is recorded in that worker's in-flight hash (with what it takes to queue it
again) by the same Lua step that marks it running, and leaves it in the step that ends it
(tasks/jobs/inflight.py). Every worker runs this reaper: each `interval` it looks for holders of in-flight jobs
whose heartbeat key has expired (no heartbeat for AETHERCORE_WORKER_TTL seconds) and takes their jobs
over atomically (one reaper wins): each goes back to `queued` and is sent again on its device's queue
with `isolate`: it runs in a forward pass of its own (it may be what killed the worker). A job is charged a
crash only when it was alone in the forward pass its dead worker was running (the worker notes each pass
before it runs); after AETHERCORE_MAX_ATTEMPTS charges it fails as
`poison_job`. So a dead worker's jobs run again within worker TTL + interval (+ the time to run them),
not after the broker's visibility timeout, and a storm of worker deaths charges no bystander.

A job can also be lost before it starts: its message taken from the Redis list by a worker killed before
kombu recorded it as unacknowledged, or an API process killed between creating the job and publishing it.
Every job that has not started is in its queue's index with its payload (tasks/jobs/inflight.py); when the queue is
empty and a job has waited there longer than the worker TTL (at least 10 s), its message cannot be
anywhere but lost (a live worker starts what it takes at once), and the reaper sends it again. Only with a
Redis broker: RabbitMQ keeps an unacknowledged message until it is acknowledged, whoever dies.

Exactly-once in effect: if the broker redelivers the original message as well, whichever copy starts
first runs the job and the other is skipped (the job is running on a live worker) or finds it ended.

The backstop: a job can also be dropped by a worker that stays alive (a bug that lets an exception escape a
task thread after the job was marked running: the message is acknowledged, the holder's heartbeat goes on, and
the job would stay `running` until its record expires). Each worker's task threads add a job's id to its
`ActiveJobs` *before* marking it running and remove it only after their task returned (after its end was
written); with every heartbeat the worker publishes that set with the time it was taken (`active_jobs_key`).
So a job its holder works on is in every set published after it started. The reaper (on any worker) takes a
job back to `queued` when its live holder has had it in its in-flight hash for at least `grace_s` and it is
missing from two of the holder's published sets, both taken after the job started; one Lua step checks that
it is still running there, unchanged (tasks/jobs/lua/reclaim.lua). It is charged a crash, so a job that keeps
being dropped ends as `poison_job` after AETHERCORE_MAX_ATTEMPTS. Bound: grace (AETHERCORE_WORKER_TTL) + two
heartbeat intervals + one reaper interval.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import redis
from loguru import logger

from tasks.jobs import Jobs
from tasks.names import INFER, KIND_OF_TASK, active_jobs_key, inflight_key, worker_key
from tasks.states import FAILED, INFERENCE
from workers.completion import Ending
from workers.retry import RetryPolicy

Send = Callable[[str, str, dict[str, Any], str], None]  # (task, queue, kwargs, job id)
Finish = Callable[[str, str, list[Ending]], None]  # (kind, model id, endings): Completion.finish


class ActiveJobs:
    """The jobs this worker's task threads are working on. A task adds its jobs before it marks them running
    and removes them when it returns, so a job in this worker's in-flight hash that is not here was dropped."""

    def __init__(self) -> None:
        self._held: Counter[str] = Counter()  # a count: two copies of a message may hold one job for a moment
        self._lock = threading.Lock()

    @contextmanager
    def holding(self, job_ids: Iterable[str]) -> Iterator[None]:
        ids = list(job_ids)
        with self._lock:
            self._held.update(ids)
        try:
            yield
        finally:
            with self._lock:
                self._held.subtract(ids)
                for job_id in ids:
                    if self._held[job_id] <= 0:
                        del self._held[job_id]

    def snapshot(self) -> tuple[float, list[str]]:
        """(when, which): the time is taken first, so every job that started before it is in the list if a task
        still works on it."""
        at = time.time()
        with self._lock:
            return at, list(self._held)

    def publish(self, client: redis.Redis, worker: str, ttl_s: int) -> None:
        at, jobs = self.snapshot()
        client.set(active_jobs_key(worker), orjson.dumps({"at": at, "jobs": jobs}), ex=ttl_s)


class Reaper:
    def __init__(
        self,
        jobs: Jobs,
        name: str,
        queue: str,
        send: Send,
        finish: Finish,
        *,
        policy: RetryPolicy,
        interval_s: float,
        worker_ttl_s: float,
        sweep_queue: bool = True,
        grace_s: float | None = None,
        aging: Any = None,
    ) -> None:
        self.aging = aging  # workers/lanes.py LaneAging, or None (no lanes in Redis lists)
        self.jobs = jobs
        self.name = name
        self.queue = queue
        self.sweep_queue = sweep_queue
        self.send = send
        self.finish = finish
        self.policy = policy  # the worker's one RetryPolicy (WorkerService.policy)
        self.interval_s = max(0.2, interval_s)
        self.worker_ttl_s = worker_ttl_s
        # How long a job must have been running before its holder's silence about it counts (the backstop).
        self.grace_s = worker_ttl_s if grace_s is None else grace_s
        self._redis_failed_at = 0.0
        # (holder, job, its run's started_at) -> the published sets it was missing from
        self._misses: dict[tuple[str, str, str], set[float]] = {}

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            try:
                self.sweep()
            except redis.RedisError as exc:
                # After an outage every worker's heartbeat key may have lapsed: wait a whole worker TTL (time for
                # the live ones to beat again) before calling anyone dead.
                self._redis_failed_at = time.monotonic()
                logger.warning("reaper: Redis unavailable ({}); retrying", exc)
            except Exception:
                logger.exception("reaper pass failed")

    def sweep(self) -> int:
        """Take over and queue again the jobs of every dead holder; returns how many jobs were taken."""
        if time.monotonic() - self._redis_failed_at < self.worker_ttl_s:
            return 0
        taken = 0
        holders = self.jobs.inflight.holders()
        live: list[str] = []
        if holders:
            pipe = self.jobs.redis.pipeline(transaction=False)
            for holder in holders:
                pipe.exists(worker_key(holder))
            for holder, alive in zip(holders, pipe.execute()):
                if alive:
                    live.append(holder)
                    continue
                if holder == self.name:
                    continue  # this worker's own key lapsed (e.g. Redis was away): it is not dead
                jobs = self.jobs.inflight.reap(holder)
                if jobs:
                    logger.warning("worker {} is gone: queueing its {} running job(s) again", holder, len(jobs))
                for job_id, payload, crashes in jobs:
                    self._requeue(f"worker {holder} died", job_id, orjson.loads(payload), crashes)
                taken += len(jobs)
        taken += self.reclaim_dropped(live)
        if self.sweep_queue:
            # At least a worker TTL: by then a message a dead worker took is either started by a live one or lost.
            for job_id, payload in self.jobs.inflight.sweep_queued(self.queue, max(self.worker_ttl_s, 10.0)):
                self._requeue("its message was lost", job_id, orjson.loads(payload), 0)
                taken += 1
        if self.aging is not None:
            moved = self.aging.sweep()
            if moved:
                logger.info("{} message(s) waited past AETHERCORE_LANE_AGING_S: moved up a priority lane", moved)
        return taken

    def reclaim_dropped(self, live: list[str]) -> int:
        """The backstop (see the module's docstring): jobs that live holders keep in their in-flight hash but no
        longer work on, queued again. Returns how many were taken."""
        seen: set[tuple[str, str, str]] = set()
        taken = 0
        pipe = self.jobs.redis.pipeline(transaction=False)
        for holder in live:  # one round trip: the ids only (an in-flight entry holds the job's whole payload)
            pipe.hkeys(inflight_key(holder))
            pipe.get(active_jobs_key(holder))
        replies = pipe.execute() if live else []
        for holder, keys, raw in zip(live, replies[::2], replies[1::2]):
            try:
                taken += self._reclaim_from(holder, keys, raw, seen)
            except redis.RedisError:
                raise
            except Exception:  # e.g. a malformed active set: judge the other holders anyway
                logger.bind(holder=holder).exception("reaper: cannot judge worker {}'s jobs", holder)
        for key in set(self._misses) - seen:
            del self._misses[key]
        return taken

    def _reclaim_from(self, holder: str, keys: list[Any], raw: bytes | None, seen: set[tuple[str, str, str]]) -> int:
        """reclaim_dropped for one live holder: its in-flight job ids (`keys`) against its published set (`raw`)."""
        taken = 0
        inflight = [k.decode() if isinstance(k, bytes) else k for k in keys]
        if not inflight or raw is None:
            return 0  # nothing in flight, or a holder that publishes no active set: never judged
        published = orjson.loads(raw)
        at, active = float(published["at"]), set(published["jobs"])
        missing = [job_id for job_id in inflight if job_id not in active]
        for job_id, started in zip(missing, self.jobs.inflight.running_since(missing)):
            if started is None or float(started) >= at:
                continue  # ended, or started after that set was taken
            key = (holder, job_id, started)  # a miss from an earlier run of the job does not count
            seen.add(key)
            misses = self._misses.setdefault(key, set())
            misses.add(at)
            if len(misses) < 2 or at - float(started) < self.grace_s:
                continue
            reclaimed = self.jobs.inflight.reclaim(holder, job_id, started)
            self._misses.pop(key, None)
            if reclaimed is None:
                continue
            payload, crashes = reclaimed
            logger.bind(job_id=job_id).error(
                "worker {} is alive but no longer works on job {} (running since {:.0f} s); queueing it again",
                holder,
                job_id,
                at - float(started),
            )
            self._requeue(f"worker {holder} dropped it", job_id, orjson.loads(payload), crashes)
            taken += 1
        return taken

    def _requeue(self, why: str, job_id: str, payload: dict[str, Any], crashes: int) -> None:
        task, kwargs = payload["task"], payload["kwargs"]
        log = logger.bind(job_id=job_id, model_id=kwargs.get("model_id"))
        verdict = self.policy.charge(kwargs.get("model_id", ""), why, crashes)
        if not verdict.retry:
            log.error("job was lost {} time(s) while it ran alone; failing it as poison", crashes)
            self.finish(
                KIND_OF_TASK.get(task, INFERENCE),
                kwargs.get("model_id", ""),
                [Ending(job_id, FAILED, error=verdict.error)],
            )
            return
        if task == INFER and why.startswith("worker"):
            kwargs = {**kwargs, "jobs": [{**job, "isolate": True} for job in kwargs["jobs"]]}
        try:
            self.send(task, payload["queue"], kwargs, job_id)
        except Exception as exc:  # the broker is down: the job is `queued` in its index; a later sweep sends it
            log.warning("cannot queue the job again yet ({}): {}", why, exc)
            return
        log.info("queued again: {} (crashes charged: {})", why, crashes)
