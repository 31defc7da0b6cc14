"""A batch's lines while it runs: submitting the lines taken up to the batch's room (each an ordinary inference job
of the batch's owner, in the `low` lane, through the one submission use case: batches/services.py `submit_line`),
a refusal for load holding the batch's submissions for its Retry-After, and collecting every submitted line whose
job ended: its answer (the /v1 response body, or the error /v1 would answer) written to the output or error file
exactly once. A mixin of the batch driver (batches/driver.py `BatchDriver`), whose store, files, job store and
submitting threads it uses.
May import config/, tasks/, protocols/ and batches/; never api or flask.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import marshmallow as ma
import orjson
from kombu.exceptions import OperationalError
from loguru import logger

from batches.files import FileStore
from batches.outputs import OUTPUT_LIMIT_REACHED, STOP_WHY, custom_id_of, line_entry, refused, stopped
from batches.store import NOT_SUBMITTED, OUTPUT, STOP_EXPIRE, Answer, BatchStore
from batches.validation import api_error, prepare
from config.settings import Settings
from protocols.errors import ApiError
from protocols.openai import Prepared
from tasks.jobs import Jobs
from tasks.jobs.records import JobNotFound
from tasks.states import CANCELLED as JOB_CANCELLED
from tasks.states import EXPIRED as JOB_EXPIRED
from tasks.states import SUCCEEDED, TERMINAL

if TYPE_CHECKING:
    from batches.services import DriverServices

STOP_PAGE = 1000  # lines answered per pass while a batch stops
CANCEL_EVERY_S = 2.0  # how often a stopping batch asks its unfinished jobs to stop
MAX_LINE_FAILURES = 3  # unexpected exceptions on one line before it is answered internal_error
INTERNAL_ERROR = "internal_error"


class Lines:
    """The driver's running steps (see the module's docstring)."""

    store: BatchStore
    files: FileStore
    settings: Settings
    jobs: Jobs
    services: DriverServices
    _pool: ThreadPoolExecutor

    def _submit(self, batch: dict[str, Any]) -> int:
        """Submit the lines taken and not submitted, and more while there is room; how many lines were handled."""
        now = time.time()
        if float(batch.get("hold_until") or 0) > now:
            return 0
        waiting = sorted(line for line, job in self.store.taken(batch["id"]).items() if job == NOT_SUBMITTED)
        waiting += self.store.claim(batch, self.services.line_room(batch), "room")
        if not waiting:
            return 0
        answers: list[Answer] = []
        work: list[tuple[int, Any, Prepared]] = []
        for line, text in zip(waiting, self.files.lines(batch["input_file_id"], waiting)):
            custom_id = custom_id_of(text)
            try:
                request = orjson.loads(text) if text else {}
                work.append((line, custom_id, prepare(batch["endpoint"], request.get("body"), self.services.catalog)))
            except (ApiError, ma.ValidationError) as exc:  # valid when validated: models.yaml changed since
                answers.append(refused(batch, line, custom_id, None, api_error(exc)))
            except Exception as exc:  # a bug: tried again a few times, then answered
                answers += self._broken_line(batch, line, custom_id, exc)
        # not started by the window's end: it expires (and the line with it), never runs for no one
        timeout = max(1.0, float(batch["expires_at"]) - now)
        outcomes = list(self._pool.map(lambda item: self._submit_one(batch, item[0], item[2], timeout), work))
        submitted: list[tuple[int, str]] = []
        held: Exception | None = None
        for (line, custom_id, _prepared), outcome in zip(work, outcomes):
            if isinstance(outcome, dict):
                submitted.append((line, outcome["job_id"]))
            elif isinstance(outcome, ApiError) and outcome.status not in (429, 503):
                answers.append(refused(batch, line, custom_id, None, outcome))  # what /v1 would answer
            else:  # load (rate limit, a full queue, no device, the broker away), not an answer: the line waits
                held = held or outcome
        if held is not None:
            retry = float(held.headers.get("Retry-After") or 1) if isinstance(held, ApiError) else 2.0
            self.store.hold(batch["id"], now + retry)
            logger.bind(batch_id=batch["id"]).info("batch {}: submissions held {:g} s ({})", batch["id"], retry, held)
        for (line, job_id), noted in zip(submitted, self.store.record_many(batch["id"], submitted)):
            if not noted:  # answered meanwhile (a cancel)
                self._cancel_job(job_id, f"its batch line {line} was answered meanwhile")
        return len(submitted) + self._write(batch, answers)

    def _submit_one(self, batch: dict[str, Any], line: int, prepared: Prepared, timeout: float) -> Any:
        """One line submitted as its owner (a submitting thread): its job, or the exception that refused it."""
        try:
            return self.services.submit_line(batch, line, prepared, timeout)
        except (ApiError, OperationalError, TimeoutError) as exc:
            return exc
        except Exception as exc:  # e.g. Redis away: the line waits, and the batch with it
            logger.bind(batch_id=batch["id"]).warning("batch {}: line {} not submitted: {!r}", batch["id"], line, exc)
            return exc

    def _collect(self, batch: dict[str, Any]) -> int:
        """Answer every submitted line whose job ended; how many were answered."""
        submitted = {line: job for line, job in self.store.taken(batch["id"]).items() if job != NOT_SUBMITTED}
        if not submitted:
            return 0
        lines = sorted(submitted)
        jobs = self.jobs.records.get_many([submitted[line] for line in lines])
        vanished = [line for line, job in zip(lines, jobs) if job is None]
        ended: list[tuple[int, dict[str, Any] | None]] = [
            (line, job) for line, job in zip(lines, jobs) if job is not None and job["status"] in TERMINAL
        ]
        if vanished and not batch.get("stopping"):
            # its record expired before it was read (no API process ran for longer than its retention): run it again
            self.store.put_back(batch["id"], vanished)
        elif vanished:
            ended += [(line, None) for line in vanished]
        if not ended:
            return 0
        texts = self.files.lines(batch["input_file_id"], [line for line, _job in ended])
        answers: list[Answer] = []
        for (line, job), text in zip(ended, texts):
            try:
                answers.append(self._answer(batch, line, text, job))
            except Exception as exc:  # a bug: its job stays taken, tried again a few times, then answered
                answers += self._broken_line(batch, line, custom_id_of(text), exc)
        return self._write(batch, answers)

    def _write(self, batch: dict[str, Any], answers: list[Answer]) -> int:
        """The answers written, each within the batch's output cap and its owner's quota; how many."""
        answered, limited = self.store.answer(batch, answers, self.settings.batch_output_max_bytes)
        if limited:
            logger.bind(batch_id=batch["id"]).info(
                "batch {}: {} answers beyond its output limits kept as {}", batch["id"], limited, OUTPUT_LIMIT_REACHED
            )
        return answered

    def _broken_line(self, batch: dict[str, Any], line: int, custom_id: Any, exc: Exception) -> list[Answer]:
        """A line whose preparation or answer raised unexpectedly: nothing while it may be tried again (counted in
        the batch's record), then its `internal_error` entry."""
        failures = self.store.failed(batch["id"], f"failures:{line}")
        logger.bind(batch_id=batch["id"]).opt(exception=exc).error(
            "batch {}: line {} failed unexpectedly ({} of {})", batch["id"], line, failures, MAX_LINE_FAILURES
        )
        if failures < MAX_LINE_FAILURES:
            return []
        message = f"this request failed unexpectedly {failures} times and was not run; the incident was logged"
        return [refused(batch, line, custom_id, None, ApiError(500, INTERNAL_ERROR, message))]

    def _answer(self, batch: dict[str, Any], line: int, text: bytes | None, job: dict[str, Any] | None) -> Answer:
        request = orjson.loads(text) if text else {}
        custom_id = request.get("custom_id")
        if job is None:
            return stopped(batch, line, custom_id)
        if job["status"] == SUCCEEDED:
            try:
                body = prepare(batch["endpoint"], request.get("body"), self.services.catalog).respond(job)
            except (ApiError, ma.ValidationError) as exc:  # a failed row of the request, or models.yaml changed
                return refused(batch, line, custom_id, job["job_id"], api_error(exc))
            entry = {
                "id": f"batch_req_{job['job_id']}",
                "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": job["job_id"], "body": body},
                "error": None,
            }
            usage = body.get("usage") or {}
            return line_entry(line, OUTPUT, entry, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        stopping = batch.get("stopping")
        if stopping and job["status"] in (JOB_CANCELLED, JOB_EXPIRED):
            return stopped(batch, line, custom_id, job["job_id"])
        if job["status"] == JOB_EXPIRED and time.time() >= float(batch["expires_at"]):
            return stopped(batch, line, custom_id, job["job_id"], STOP_EXPIRE)
        return refused(batch, line, custom_id, job["job_id"], self.services.ended_error(job))

    def _cancel_jobs(self, job_ids: list[str], why: str) -> None:
        for job_id in job_ids:
            self._cancel_job(job_id, why)

    def _cancel_job(self, job_id: str, why: str) -> None:
        try:
            self.jobs.lifecycle.request_cancel(job_id, why)
        except JobNotFound:
            pass

    def _stop(self, batch: dict[str, Any]) -> int:
        """Answer the lines that never ran; ask the submitted ones to stop (what already ended is kept). How many
        lines were answered."""
        self.store.claim(batch, STOP_PAGE, "all")
        taken = self.store.taken(batch["id"])
        waiting = sorted(line for line, job in taken.items() if job == NOT_SUBMITTED)[:STOP_PAGE]
        texts = self.files.lines(batch["input_file_id"], waiting)
        answers = [stopped(batch, line, custom_id_of(text)) for line, text in zip(waiting, texts)]
        answered = self._write(batch, answers)
        running = [job for job in taken.values() if job != NOT_SUBMITTED]
        if running and time.time() - float(batch.get("stop_sent_at") or 0) >= CANCEL_EVERY_S:
            self._cancel_jobs(running, STOP_WHY[batch["stopping"]])
            status = batch["status"]
            self.store.transition(batch["id"], (status,), status, stamp=False, stop_sent_at=time.time())
        return answered
