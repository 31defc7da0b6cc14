"""No job stays `running` after its worker is gone, whatever the broker did with its message.

Every job a worker starts is recorded in that worker's in-flight hash (with what it takes to queue it
again) by the same Lua step that marks it running, and leaves it in the step that ends it
(tasks/jobs.py). Every worker runs this reaper: each `interval` it looks for holders of in-flight jobs
whose heartbeat key has expired (no heartbeat for AETHERCORE_WORKER_TTL seconds) and takes their jobs
over atomically (one reaper wins): each goes back to `queued` and is sent again on its device's queue
with `isolate`: it runs in a forward pass of its own (it may be what killed the worker). A job is charged a
crash only when it was alone in the forward pass its dead worker was running (the worker notes each pass
before it runs); after AETHERCORE_MAX_ATTEMPTS charges it fails as
`poison_job`. So a dead worker's jobs run again within worker TTL + interval (+ the time to run them),
not after the broker's visibility timeout, and a storm of worker deaths charges no bystander.

A job can also be lost before it starts: its message taken from the Redis list by a worker killed before
kombu recorded it as unacknowledged, or an API process killed between creating the job and publishing it.
Every job that has not started is in its queue's index with its payload (tasks/jobs.py); when the queue is
empty and a job has waited there longer than the worker TTL (at least 10 s), its message cannot be
anywhere but lost (a live worker starts what it takes at once), and the reaper sends it again. Only with a
Redis broker: RabbitMQ keeps an unacknowledged message until it is acknowledged, whoever dies.

Exactly-once in effect: if the broker redelivers the original message as well, whichever copy starts
first runs the job and the other is skipped (the job is running on a live worker) or finds it ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis
from loguru import logger

from tasks.jobs import JobStore
from tasks.names import INFER, KIND_OF_TASK, worker_key
from tasks.states import FAILED, INFERENCE
from workers.outcomes import error_body

Send = Callable[[str, str, dict[str, Any], str], None]  # (task, queue, kwargs, job id)
Finish = Callable[[str, str, list[dict[str, Any]]], None]  # (kind, model id, outcomes): WorkerService.finish


class Reaper:
    def __init__(
        self,
        jobs: JobStore,
        name: str,
        queue: str,
        send: Send,
        finish: Finish,
        *,
        max_attempts: int,
        interval_s: float,
        worker_ttl_s: float,
        sweep_queue: bool = True,
    ) -> None:
        self.jobs = jobs
        self.name = name
        self.queue = queue
        self.sweep_queue = sweep_queue
        self.send = send
        self.finish = finish
        self.max_attempts = max_attempts
        self.interval_s = max(0.2, interval_s)
        self.worker_ttl_s = worker_ttl_s
        self._redis_failed_at = 0.0

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
        holders = [h for h in self.jobs.inflight_holders() if h != self.name]
        if holders:
            pipe = self.jobs.redis.pipeline(transaction=False)
            for holder in holders:
                pipe.exists(worker_key(holder))
            for holder, alive in zip(holders, pipe.execute()):
                if alive:
                    continue
                jobs = self.jobs.reap(holder)
                if jobs:
                    logger.warning("worker {} is gone: queueing its {} running job(s) again", holder, len(jobs))
                for job_id, payload, crashes in jobs:
                    self._requeue(f"worker {holder} died", job_id, orjson.loads(payload), crashes)
                taken += len(jobs)
        if self.sweep_queue:
            # At least a worker TTL: by then a message a dead worker took is either started by a live one or lost.
            for job_id, payload in self.jobs.sweep_queued(self.queue, max(self.worker_ttl_s, 10.0)):
                self._requeue("its message was lost", job_id, orjson.loads(payload), 0)
                taken += 1
        return taken

    def _requeue(self, why: str, job_id: str, payload: dict[str, Any], crashes: int) -> None:
        task, kwargs = payload["task"], payload["kwargs"]
        log = logger.bind(job_id=job_id, model_id=kwargs.get("model_id"))
        if crashes >= self.max_attempts:
            log.error("job was running alone on {} dead worker(s); failing it as poison", crashes)
            self.finish(
                KIND_OF_TASK.get(task, INFERENCE),
                kwargs.get("model_id", ""),
                [
                    {
                        "job_id": job_id,
                        "status": FAILED,
                        "error": error_body(
                            "poison_job",
                            f"the job was the only one running on its worker when the worker died, "
                            f"{crashes} times; it is not retried again (AETHERCORE_MAX_ATTEMPTS)",
                        ),
                    }
                ],
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
