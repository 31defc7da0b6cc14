"""Coalesce concurrent inference submissions of this API process into fewer Celery messages.

Every /serve request still gets its own job (own id, record, result); what is shared is the Celery
message that carries jobs to the device queue. Publishing is flat-combined: a request that finds no
publish in progress publishes itself, with whatever else is waiting; requests that arrive while a
publish is in progress queue up and leave together in the next one, one message per (model, device),
sent by whichever of them gets there first. At low load a message carries one job and leaves from
the request's own thread, with no hand-over; under load the per-message costs (publish, consume, task
events, ack) are paid once per group instead of once per request. The worker's dynamic batcher then
merges jobs across messages as before.

Where the broker is the jobs' Redis, a submission may also bring its job's record (`record`): the group's jobs
are then created, counted against their callers' rate limits and queued in ONE Lua step
(tasks/jobs/records.py `create_and_push`) instead of one round trip per request to create each job and one per group to
push the message: a job exists exactly when its message is queued, and a job refused by its rate limit is in no
message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from tasks.jobs.records import RateLimited, Records
from tasks.messages import TaskMessages, trace_headers
from tasks.names import DEFAULT_LANE, INFER, LANE_PRIORITY, lane_list, queue_for_device

# What a submission with a record gets back: its job as created and the use of each of its rate limits.
Created = tuple[dict[str, Any], list[int]]

MAX_JOBS_PER_MESSAGE = 64
PUBLISH_TIMEOUT_S = 10.0
# Under load (at least this many requests of this process waiting for their jobs) the publishing request
# waits AETHERCORE_DISPATCH_LINGER_MS for companions before it sends: clients answered together come back
# together, and one message for them costs the API, Redis and the worker far less than one each.
LOAD_IN_FLIGHT = 4


@dataclass
class _Pending:
    model_id: str
    device: str
    job: dict[str, Any]
    lane: str = DEFAULT_LANE
    record: dict[str, Any] | None = None  # Records.create_and_push's entry: the job is created as it is queued
    done: bool = False
    error: BaseException | None = None
    created: Created | None = None


class InferenceDispatcher:
    def __init__(
        self,
        celery: Celery,
        max_jobs: int = MAX_JOBS_PER_MESSAGE,
        linger_ms: float = 0.0,
        in_flight: Callable[[], int] = lambda: 0,
        jobs: Records | None = None,
    ) -> None:
        self.celery = celery
        # The job store when the broker is the jobs' Redis: messages are pushed directly (tasks/messages.py), in
        # the step that creates their jobs.
        self.jobs = jobs
        self.messages = TaskMessages()
        self.max_jobs = max_jobs
        self.linger_s = linger_ms / 1000
        self.in_flight = in_flight
        self._waiting: list[_Pending] = []
        self._cond = threading.Condition()
        self._publishing = False

    @property
    def creates(self) -> bool:
        """Whether `publish` takes a job's record (the broker is the jobs' Redis)."""
        return self.jobs is not None

    def publish(
        self,
        model_id: str,
        device: str,
        job: dict[str, Any],
        coalesce: bool = True,
        lane: str = DEFAULT_LANE,
        record: dict[str, Any] | None = None,
    ) -> Created | None:
        """Return once the job's message is in the broker (in its priority lane); raise if it could not be. With
        `record` (only where `creates`), the job is created in the same step: returns it as created, or raises
        RateLimited (then nothing of it was written)."""
        if record is not None and self.jobs is None:
            raise ValueError("jobs are created with their message only when the broker is the jobs' Redis")
        pending = _Pending(model_id, device, job, lane, record)
        if not coalesce:
            self._send_group([pending])
            if pending.error is not None:
                raise pending.error
            return pending.created
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        with self._cond:
            self._waiting.append(pending)
            while True:
                if pending.done:
                    break
                if not self._publishing:
                    self._publishing = True
                    if self.linger_s > 0 and len(self._waiting) < self.max_jobs and self.in_flight() >= LOAD_IN_FLIGHT:
                        self._cond.wait(self.linger_s)  # others queue meanwhile (the lock is released)
                    group, self._waiting = self._waiting[: self.max_jobs], self._waiting[self.max_jobs :]
                    self._cond.release()
                    try:
                        self._send_group(group)
                    finally:
                        self._cond.acquire()
                        self._publishing = False
                        self._cond.notify_all()
                    continue
                if not self._cond.wait(max(0.0, deadline - time.monotonic())) and not pending.done:
                    if pending in self._waiting:
                        self._waiting.remove(pending)
                    raise TimeoutError("the job could not be handed to the broker in time")
        if pending.error is not None:
            raise pending.error
        return pending.created

    def _send_group(self, group: list[_Pending]) -> None:
        by_target: dict[tuple[str, str, str], list[_Pending]] = {}
        for pending in group:
            by_target.setdefault((pending.model_id, pending.device, pending.lane), []).append(pending)
        for (model_id, device, lane), items in by_target.items():
            try:
                self._send(model_id, device, lane, items)
            except Exception as exc:  # the broker is down: every waiting request answers 503
                for p in items:
                    p.error = exc
            for p in items:
                p.done = True

    def _send(self, model_id: str, device: str, lane: str, items: list[_Pending]) -> None:
        queue = queue_for_device(device)
        if self.jobs is None:
            jobs = [p.job for p in items]
            task_id, kwargsrepr = self._names(model_id, jobs)
            self.celery.send_task(
                INFER,
                kwargs={"model_id": model_id, "jobs": jobs},
                queue=queue,
                task_id=task_id,
                kwargsrepr=kwargsrepr,
                priority=LANE_PRIORITY[lane],
                headers=trace_headers(_one_trace(jobs)),
            )
            return
        created = [p for p in items if p.record is not None]
        queued = [p.job for p in items if p.record is None]  # created already (e.g. with an Idempotency-Key)

        def message(live: list[int]) -> bytes | None:
            jobs = queued + [created[at].job for at in live]
            if not jobs:
                return None
            task_id, kwargsrepr = self._names(model_id, jobs)
            kwargs = {"model_id": model_id, "jobs": jobs}
            return self.messages.build(INFER, kwargs, queue, task_id, kwargsrepr, LANE_PRIORITY[lane], _one_trace(jobs))

        entries = [p.record for p in created]
        outcome = self.jobs.create_and_push(device, lane_list(queue, lane), entries, message)  # type: ignore[arg-type]
        for pending, result in zip(created, outcome):
            if isinstance(result, RateLimited):
                pending.error = result
            else:
                pending.created = result

    @staticmethod
    def _names(model_id: str, jobs: list[dict[str, Any]]) -> tuple[str | None, str]:
        # A message with one job carries the job's id, so Flower and the API name the same thing; kwargsrepr is
        # what Flower and logs show instead of the inputs themselves.
        task_id = jobs[0]["job_id"] if len(jobs) == 1 else None
        return task_id, repr({"model_id": model_id, "job_ids": [j["job_id"] for j in jobs]})


def _one_trace(jobs: list[dict[str, Any]]) -> str | None:
    """The message's trace header: its job's context when it carries one job (each job's is in its entry)."""
    return jobs[0].get("traceparent") if len(jobs) == 1 else None
