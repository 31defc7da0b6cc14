"""A job's transitions: a worker takes it (`mark_running`), it ends (`end_jobs`), a caller cancels it
(`request_cancel`). Used by the workers (workers/handlers.py starts the jobs of a message, workers/completion.py
writes every end a worker or its reaper decides) and by the API (cancel: DELETE /jobs, a closed stream, a protocol's
wait that ended, the batch driver; and the end of a job whose message could not be queued).

`end_jobs` is the ONE way a job ends, whatever its status: it takes the error code from the contract
(tasks/errors.py; a code outside it raises, before anything is written) and runs the one Lua transition
(lua/transition.lua) that ends a job exactly once — a redelivered or cancelled job cannot be finished twice — and,
in the same step, appends its `done` event, wakes the API processes waiting for it, makes its webhook delivery due
and writes its dead letter. tests/unit/test_job_end.py lists its callers and checks that nothing else ends a job.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from loguru import logger

from tasks.errors import CANCELLED as CANCELLED_CODE
from tasks.errors import error_body
from tasks.jobs.codec import encode
from tasks.jobs.records import JobNotFound
from tasks.jobs.scripts import BROKEN, REQUEST_CANCEL, TRANSITION
from tasks.names import job_events_key, job_key
from tasks.states import CANCELLED, RUNNING, SUCCEEDED, TERMINAL


@dataclass(frozen=True)
class JobEnd:
    """One job's end, as `end_jobs` writes it."""

    job_id: str
    status: str  # a terminal status (tasks/states.py TERMINAL)
    code: str | None = None  # its error code (tasks/errors.py): every end but `succeeded` has one, `succeeded` none
    message: str = ""  # with the code: what happened, and what the caller can do
    result: Any = None  # an object, or its JSON already encoded (bytes: an inference result, encoded once)
    # The JSON object of its ending fields for the API processes waiting for it (the script adds the result and the
    # error it writes); None: its id, status and finished_at.
    note: bytes | None = None
    dead: str | None = None  # it becomes a dead letter for this reason if it ends now (tasks/deadletters.py)


class Lifecycle:
    def __init__(self, client: redis.Redis, ttl_s: int, dead_letter_spec: str) -> None:
        """`dead_letter_spec`: the bounds of the dead letters an end writes (tasks/deadletters.py limits_arg)."""
        self.redis = client
        self.ttl_s = ttl_s
        self.dead_letter_spec = dead_letter_spec
        self._transition = client.register_script(TRANSITION)
        self._request_cancel = client.register_script(REQUEST_CANCEL)

    def mark_running(self, job_id: str, worker: str, payload: bytes) -> int:
        """The job's delivery count (1 the first time), or 0 when it already ended (a redelivery after its
        result was written, or it was cancelled) or a live worker runs it. `payload`: how to queue it again
        (tasks/jobs/inflight.py `requeue_payload`), kept in this worker's in-flight hash until the job ends."""
        return self.mark_running_many([(job_id, payload)], worker)[0]

    def mark_running_many(self, jobs: list[tuple[str, bytes]], worker: str) -> list[int]:
        """One round trip for the (job id, payload) pairs of one message: each job's delivery count, 0 if it
        is not to run here."""
        started = repr(time.time())
        calls = [
            (job_id, [RUNNING, str(self.ttl_s), "status", "", worker, payload, "started_at", started, "worker", worker])
            for job_id, payload in jobs
        ]
        return [max(0, outcome) for outcome in self._transitions(calls)]

    def end_jobs(self, ends: Sequence[JobEnd]) -> list[bool]:
        """End these jobs in one round trip: per job, whether it ended now (False: it had ended already, or is gone).
        Every end is checked before any is written: a status that is not terminal, a code outside tasks/errors.py,
        a failure without a code or a success with one raises ValueError."""
        now = time.time()
        calls = [(end.job_id, self._end_args(end, now)) for end in ends]
        return [outcome == 1 for outcome in self._transitions(calls)]

    def request_cancel(self, job_id: str, reason: str = "cancelled by the client") -> bool:
        """Cancel a queued job (it never runs) or ask a running one to stop; False if it already ended."""
        outcome = int(self._request_cancel(keys=[job_key(job_id)]))
        if outcome == -1:
            raise JobNotFound(job_id)
        if outcome == 2:
            [ended] = self.end_jobs([JobEnd(job_id, CANCELLED, CANCELLED_CODE, reason)])
            return ended or self.request_cancel(job_id, reason)  # it started meanwhile: ask it to stop
        return outcome == 1

    def _end_args(self, end: JobEnd, now: float) -> list[Any]:
        """transition.lua's arguments for one job's end (see the script)."""
        if end.status not in TERMINAL:
            raise ValueError(f"{end.status!r} is not a final status")
        if (end.status == SUCCEEDED) != (end.code is None):
            raise ValueError(f"a job ending {end.status} has an error code exactly when it did not succeed")
        note = end.note or encode({"job_id": end.job_id, "status": end.status, "finished_at": now})
        dead = end.dead or ""
        args: list[Any] = [end.status, str(self.ttl_s), "done", note, dead, self.dead_letter_spec if dead else ""]
        args += ["finished_at", repr(now)]
        if end.result is not None:
            args += ["result", end.result if isinstance(end.result, bytes) else encode(end.result)]
        if end.code is not None:
            args += ["error", encode(error_body(end.code, end.message))]  # error_body refuses a code outside it
        return args

    def _transitions(self, calls: list[tuple[str, list[Any]]]) -> list[int]:
        """Several jobs' transitions (job id, its arguments) in one call of transition.lua."""
        if not calls:
            return []
        keys: list[str] = []
        args: list[Any] = [len(calls)]
        for job_id, job_args in calls:
            keys += [job_key(job_id), job_events_key(job_id)]
            args += [len(job_args), *job_args]
        outcomes = []
        for (job_id, _), outcome in zip(calls, self._transition(keys=keys, args=args)):
            if isinstance(outcome, list):  # [BROKEN, the error]: see transition.lua
                logger.bind(job_id=job_id).error(
                    "job {}'s record breaks its transition ({}); left as it stands", job_id, outcome[1]
                )
                outcome = BROKEN
            outcomes.append(int(outcome))
        return outcomes
