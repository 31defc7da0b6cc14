"""What moves every batch forward: validation, submitting its lines, collecting their answers, cancel, the window's
end, and the output and error files. It runs in a process of its own, `manage.py batches` (`run_batch_driver`;
`manage.py up` and compose's `batches` service start one), never in an API process; all of a batch's state is in
Redis (api/batches.py), so any number of drivers may run.

Each pass (every TICK_S while batches are unfinished) the driver takes, for each unfinished batch, its lease (a
Redis key with a LEASE_MS TTL, renewed each pass by its holder) and, holding it, runs the batch's next step:

```
validating   read the input file, check every line exactly as /v1 checks the same request (the same schemas and
             translation, openai_compat.py BATCH_ENDPOINTS) -> failed (errors.data[] with line numbers) or
             in_progress (total, model)
in_progress  collect: every submitted line whose job ended gets its answer (output or error file, exactly once)
             submit: lines taken and not answered up to the batch's room (api/lanes.py `batch_line_room`: its
             share of its device queue's watermark, at most AETHERCORE_BATCH_MAX_IN_FLIGHT), each submitted as an
             ordinary inference job of the batch's owner (`submit_line`); a refusal for load (429 rate limit or
             queue_full, 503 no_device / redis_full / broker down) answers nothing: the line waits and the batch
             holds its submissions for the Retry-After
             the window ends -> `stopping` = expire
stopping     (cancelled, or its window ended) lines never submitted are answered batch_cancelled / batch_expired
             without running; submitted ones are cancelled (a queued job never runs, a running one is asked to stop)
             and whatever ends is collected as usual: what finished is kept
all answered in_progress -> finalizing -> completed; cancelling -> cancelled; the window -> expired; the output
             and error files are published, the batch leaves the active set (its webhook due in the same step)
```

Every step first checks that the batch's owner is still a valid principal (api/auth.py `Authenticator.current`):
a revoked key's batch is cancelled (`stopping` = revoked), its lines not run answered `batch_cancelled` naming
the revocation. Every state has a deadline, so none of the owner's AETHERCORE_BATCH_MAX_ACTIVE slots is held for
longer than the window plus FINISH_GRACE_S: a validation still running at the window's end ends `expired`; lines
still unanswered FINISH_GRACE_S after the window's end (or the cancel) are abandoned and the batch ends. An
unexpected exception is retried a bounded number of times, counted in the batch's record: a line's
(MAX_LINE_FAILURES, then it is answered `internal_error`), a whole step's (MAX_STEP_FAILURES in a row, then the
batch ends `failed` with an `internal_error` in its errors).

Why the API's code: a line must run exactly what the same /v1 request runs (its translation and checks, the owner's
role deciding autoload, the owner's rate limit counted as the job is created, backpressure, the dispatcher), and
all of that lives in the API package, which never imports a worker (and the workers never import the API). Until
that submission path is a use case below HTTP, the driver builds the Flask app for it (`submission_app`).

Why a process of its own, and a niced one (AETHERCORE_BATCH_DRIVER_NICE): a driver's pass is CPU in bursts
(answers collected 256 at a time, their JSON, Lua round trips). As a thread of every API process, under gevent, such
a burst held that process's other requests: measured with bench/lanes.py (sim-h100, 3 owners x 6000 lines, 2
cores), interactive /serve p99 beside the backlog was 4.4x its no-backlog p99 at 1 client and 3.35x at 8; the same
driver in a process of its own at nice 10 gave 2.45x and 1.94x: the kernel gives the API and the worker the CPU
first. A new or cancelled batch wakes an idle driver at once (the API pushes a note to BATCHES_WAKE, the driver's
idle wait is a BLPOP on it).

Any driver drives any batch: one that dies loses its leases within LEASE_MS and the others (or it, restarted) carry
on from Redis; one that stops gives its leases up. Every step is idempotent: answers are written once per line
(api/batches.py `answer`), a line is submitted again only if its job was never recorded or has vanished, and the
ends are compare-and-set transitions.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import marshmallow as ma
import orjson
import redis
from flask import Flask, g
from kombu.exceptions import OperationalError
from loguru import logger

from api.auth import SERVE, Principal
from api.batches import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    ENDED,
    ERROR,
    EXPIRED,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    NOT_SUBMITTED,
    OUTPUT,
    STOP_CANCEL,
    STOP_EXPIRE,
    STOP_REVOKED,
    VALIDATING,
    Answer,
    BatchStore,
)
from api.blueprints.openai_compat import BATCH_ENDPOINTS, Prepared, openai_error
from api.errors import ApiError, refused_error
from api.files import FileStore, is_request_line
from api.json_provider import JsonBodyError, loads_bounded
from api.lanes import batch_line_room
from api.services import Services, services
from api.submitting import ended_error, request_for
from config.logging import setup_logging
from config.models import ModelSpec
from config.settings import Settings
from submission.admission import BATCH_LANE
from submission.errors import Refused
from tasks.jobs.records import JobNotFound
from tasks.results import compact
from tasks.states import CANCELLED as JOB_CANCELLED
from tasks.states import EXPIRED as JOB_EXPIRED
from tasks.states import SUCCEEDED, TERMINAL

TICK_S = 0.2  # between passes while some batch is unfinished and the last pass found nothing to do
BUSY_S = 0.02  # between passes while lines end and are submitted
IDLE_S = 1.0  # between passes otherwise (a new batch or a cancel wakes an idle driver at once: BATCHES_WAKE)
# Pauses this short are slept, not waited for with BLPOP: Redis ends a blocking command's timeout at its next cron
# tick (hz 10), so on an idle Redis a BLPOP of 0.02 s returned after 0.12 s.
BLOCK_MIN_S = 0.1
HEARTBEAT_S = 2.0  # the driver's heartbeat (BATCH_DRIVERS): the healthcheck's `batches` and /health read it
LEASE_MS = 10_000  # a driver that died stops holding its batches after this
MAX_ERRORS = 100  # validation errors reported per batch (then one saying how many more)
MESSAGE_MAX = 512  # characters of one error's message
VALUE_MAX = 64  # characters of a caller's value echoed in a message (its repr, cut), or of an error's param
MAX_LINE_FAILURES = 3  # unexpected exceptions on one line before it is answered internal_error
MAX_STEP_FAILURES = 5  # unexpected exceptions of a batch's steps in a row before it ends failed
# Lines still running at a batch's deadline (its window's end, or its cancel) have this long to end and be
# collected; then the batch ends without them and its slot is free.
FINISH_GRACE_S = 600
SWEEP_EVERY_S = 60.0  # how often a driver takes expired objects out of the owners' accounts (tasks/holdings.py)
# A Redis refusal that says Redis is unavailable, not that a step's data is wrong: the pass is retried as a whole.
_OUTAGE = ("OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS")
VALIDATE_PAGE = 1000  # input lines read per round trip while validating
STOP_PAGE = 1000  # lines answered per pass while a batch stops
CANCEL_EVERY_S = 2.0  # how often a stopping batch asks its unfinished jobs to stop
# Lines of a batch submitted at once by each driver: their round trips overlap, and lines that leave together share
# Celery messages (submission/dispatch.py).
SUBMITTERS = 8
MAX_CUSTOM_ID = 512
LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})

# The line errors a batch's validation reports (errors.data[].code), besides /v1's own for a line's body
# (validation_error, model_not_found, model_not_supported, too_many_inputs).
INVALID_JSON_LINE = "invalid_json_line"
INVALID_REQUEST = "invalid_request"
DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
MISMATCHED_URL = "mismatched_url"
MISMATCHED_MODEL = "mismatched_model"
REQUEST_TOO_LARGE = "request_too_large"
EMPTY_FILE = "empty_file"
TOO_MANY_REQUESTS = "too_many_requests"
TOO_MANY_ERRORS = "too_many_errors"
FILE_NOT_FOUND = "file_not_found"
# Why a batch ended early (errors.data[].code): its window ended before its input was validated or its lines
# ended, its owner's credentials were revoked, its steps kept failing.
BATCH_EXPIRED = "batch_expired"
OWNER_REVOKED = "owner_revoked"
INTERNAL_ERROR = "internal_error"
OUTPUT_LIMIT_REACHED = "output_limit_reached"
# A line that never ran (the `error` of its entry in the error file, OpenAI's codes).
STOPPED = {
    STOP_CANCEL: ("batch_cancelled", "This request was not executed: the batch was cancelled."),
    STOP_EXPIRE: ("batch_expired", "This request could not be executed before the completion window expired."),
    STOP_REVOKED: (
        "batch_cancelled",
        "This request was not executed: the batch was cancelled because its owner's API key was revoked.",
    ),
}


def submit_line(svc: Services, spec: ModelSpec, payload: dict[str, Any]) -> dict[str, Any]:
    """Submit one batch line as an ordinary inference job of its owner, exactly as the same /v1 request would be:
    routed to the model's device queue, counted in the owner's rate limit (with the job's creation), checked
    against the queue's depth, published through the dispatcher — in the `low` priority lane, so a backlog of batch
    work never delays interactive callers (and moves up only by aging, AETHERCORE_LANE_AGING_S)."""
    request = request_for(spec.id, checked=True, lane=BATCH_LANE, default_webhook=False, **_line_fields(payload))
    try:
        return svc.submitter.submit(request)
    except Refused as exc:
        raise refused_error(exc) from None


def _line_fields(payload: dict[str, Any]) -> dict[str, Any]:
    """A line's payload (its /v1 fields, and `timeout`) as a submission's fields."""
    fields = {key: value for key, value in payload.items() if key != "timeout"}
    return {**fields, "timeout_s": payload.get("timeout")}


_SCHEMAS: dict[str, ma.Schema] = {}  # one instance per endpoint's request schema (loading keeps no state in it)


def prepare(endpoint: str, body: Any) -> Prepared:
    """A line's body checked and translated as its endpoint's /v1 view does (ValidationError or ApiError if not)."""
    schema_class, translate = BATCH_ENDPOINTS[endpoint]
    if isinstance(body, dict) and body.get("stream"):
        raise ApiError(422, "validation_error", "stream is not supported in a batch", {"stream": ["not in a batch"]})
    schema = _SCHEMAS.get(endpoint)
    if schema is None:
        schema = _SCHEMAS[endpoint] = schema_class()
    return translate(schema.load(body))


def _api_error(exc: Exception) -> ApiError:
    """A line's refusal as the /v1 route would answer it."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ma.ValidationError):
        details = exc.messages if isinstance(exc.messages, dict) else {"body": exc.messages}
        return ApiError(422, "validation_error", "the request is invalid; see details for each field", details)
    return ApiError(500, "internal_error", "internal error; the incident was logged")


class BatchDriver:
    def __init__(self, app: Flask, store: BatchStore, files: FileStore, name: str | None = None) -> None:
        self.app = app
        self.store = store
        self.files = files
        self.name = name or f"batches.{os.getpid()}@{socket.gethostname()}"
        self.holder = f"{self.name}#{secrets.token_hex(4)}"
        self._pool = ThreadPoolExecutor(SUBMITTERS, thread_name_prefix="batch-submit")
        self._owners: dict[tuple[str, str], Principal | None] = {}  # this pass's answers of the authenticator
        self._swept_at = 0.0
        self._stopping = threading.Event()  # `run`'s: set when the process is asked to stop

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Passes until `stop` is set; then the submitting threads end, the leases still held are given up and the
        heartbeat leaves."""
        self._stopping = stop
        beat = threading.Thread(target=self._heartbeat, args=(stop,), name="batch-heartbeat", daemon=True)
        beat.start()
        failing = False
        while not stop.is_set():
            pause = IDLE_S
            try:
                active, progressed = self.tick()
                pause = BUSY_S if progressed else TICK_S if active else IDLE_S
                self._sweep()
                failing = False
            except redis.RedisError as exc:
                if not failing:  # once per outage
                    logger.warning("batch driver: Redis unavailable ({}); retrying", exc)
                failing = True
            except Exception:
                logger.exception("batch driver pass failed")
            self._pause(pause, stop)
        logger.info("batch driver {} stopping: its submitting threads end, its leases are given up", self.name)
        self._pool.shutdown(wait=True)
        beat.join()
        try:
            released = self.store.release(self.store.active(), self.holder)
            self.store.stopped(self.name)
        except redis.RedisError as exc:  # its leases lapse by themselves
            logger.warning("batch driver {}: leases not given up ({})", self.name, exc)
            return
        logger.info("batch driver {} stopped ({} leases given up)", self.name, released)

    def _pause(self, seconds: float, stop: threading.Event) -> None:
        """Until the next pass: `seconds`, or less when a batch is created or cancelled (a wake note)."""
        if seconds >= BLOCK_MIN_S:
            try:
                self.store.wait_for_work(seconds)
                return
            except redis.RedisError:  # Redis away: the next pass says so
                pass
        stop.wait(seconds)

    def _heartbeat(self, stop: threading.Event) -> None:
        while True:
            try:
                self.store.beat(self.name)
            except redis.RedisError:
                pass
            if stop.wait(HEARTBEAT_S):
                return

    def _sweep(self) -> None:
        """Expired objects out of the owners' accounts now and then (each account also drops its own lazily)."""
        if time.monotonic() - self._swept_at >= SWEEP_EVERY_S:
            self._swept_at = time.monotonic()
            self.store.holdings.sweep()

    def tick(self) -> tuple[bool, bool]:
        """One pass over the unfinished batches: whether there were any, and whether a step of this process did
        something (lines answered or submitted, a status moved)."""
        ids = self.store.active()
        progressed = False
        self._owners = {}
        for batch_id in ids:
            if self._stopping.is_set():  # the rest are the next driver's
                break
            if self.store.lease(batch_id, self.holder, LEASE_MS):
                progressed = self._step_counted(batch_id) or progressed
        return bool(ids), progressed

    def _step_counted(self, batch_id: str) -> bool:
        """`step`, its unexpected failures counted (`_step_failed`) and never in the way of the other batches'."""
        try:
            return self.step(batch_id)
        except Exception as exc:
            if _outage(exc):
                raise
            failure = exc
        try:
            self._step_failed(batch_id, failure)
        except Exception as exc:
            if _outage(exc):
                raise
            logger.bind(batch_id=batch_id).exception("batch {}: not ended after its failures", batch_id)
        return False

    # -- one step of one batch ---------------------------------------------------------------------------------
    def step(self, batch_id: str) -> bool:
        """The batch's next step; whether it did something."""
        batch = self.store.get(batch_id)
        if batch is None or batch["status"] in ENDED:
            self.store.forget(batch_id)
            return False
        batch = self._as_current_owner(batch)
        with self._as_owner(batch):
            done = self._advance(batch)
        if batch.get("step_failures"):
            self.store.recovered(batch_id)
        return done

    def _advance(self, batch: dict[str, Any]) -> bool:
        batch_id = batch["id"]
        now = time.time()
        if batch["status"] == VALIDATING:
            if now >= float(batch["expires_at"]):
                return self._expire_validation(batch)
            self._validate(batch)
            return True
        if now >= _deadline(batch):
            return self._abandon(batch, *self._late(batch))
        window_ended = now >= float(batch["expires_at"])
        if batch["status"] == IN_PROGRESS and not batch.get("stopping") and window_ended:
            self.store.transition(batch_id, (IN_PROGRESS,), IN_PROGRESS, stamp=False, stopping=STOP_EXPIRE)
            logger.bind(batch_id=batch_id).info("batch {}: its completion window ended", batch_id)
            batch = self.store.get(batch_id) or batch
        done = self._collect(batch)
        if batch.get("stopping"):
            done += self._stop(batch)
        elif batch["status"] == IN_PROGRESS:
            done += self._submit(batch)
        return self._finish(batch_id) or done > 0

    @contextmanager
    def _as_owner(self, batch: dict[str, Any]) -> Iterator[None]:
        """The batch's work runs as a request of its owner would: their principal (role: autoload), their rate
        limit's caller (their address when unauthenticated), /v1's error shape."""
        environ = {"REMOTE_ADDR": batch.get("address") or "127.0.0.1"}
        with self.app.test_request_context("/v1/batches", environ_base=environ):
            g.principal = Principal(batch["owner"], batch["role"])
            g.request_id = batch["id"]
            yield

    # -- its owner ---------------------------------------------------------------------------------------------
    def _as_current_owner(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with its owner's role as it is now; a batch whose owner was revoked is cancelled first."""
        key = (batch["owner"], batch["role"])
        if key not in self._owners:  # once per pass for all of an owner's batches
            self._owners[key] = self.app.extensions["aethercore_auth"].current(*key)
        who = self._owners[key]
        if who is not None and who.role in SERVE:
            return {**batch, "role": who.role}
        if batch["status"] in (VALIDATING, IN_PROGRESS) and not batch.get("stopping"):
            self._revoke(batch)
            return self.store.get(batch["id"]) or batch
        return batch

    def _revoke(self, batch: dict[str, Any]) -> None:
        message = (
            f"the batch was cancelled: its owner {_clip(batch['owner'])}'s credentials were revoked (or may no "
            "longer run batches); requests not yet run were not executed"
        )
        errors = orjson.dumps([_error(OWNER_REVOKED, message, None)]).decode()
        outcome = self.store.transition(
            batch["id"], (VALIDATING, IN_PROGRESS), CANCELLING, stopping=STOP_REVOKED, errors=errors
        )
        if outcome == "":
            logger.bind(batch_id=batch["id"]).warning(
                "batch {}: its owner {} was revoked; cancelling it", batch["id"], batch["owner"]
            )

    # -- validating ----------------------------------------------------------------------------------------------
    def _validate(self, batch: dict[str, Any]) -> None:
        settings = services().settings
        errors: list[dict[str, Any]] = []
        more = 0
        total, first_model = 0, {}  # the first line's model (and its line): the batch's
        meta = self.files.get(batch["input_file_id"])
        if meta is None:
            errors.append(_error(FILE_NOT_FOUND, "the input file no longer exists", "input_file_id"))
        elif int(meta["lines"]) > settings.batch_max_lines:
            errors.append(
                _error(
                    TOO_MANY_REQUESTS,
                    f"the input file has {meta['lines']} lines; a batch takes at most {settings.batch_max_lines} "
                    "(AETHERCORE_BATCH_MAX_LINES): split it",
                    None,
                )
            )
        else:
            count = int(meta["lines"])
            seen: dict[str, int] = {}
            blank: list[int] = []  # blank lines so far: errors if a request follows them, else the file's end
            for start in range(0, count, VALIDATE_PAGE):
                indexes = list(range(start, min(count, start + VALIDATE_PAGE)))
                for index, text in zip(indexes, self.files.lines(meta["id"], indexes)):
                    line = index + 1
                    if text is None or not is_request_line(text):
                        blank.append(line)
                        continue
                    for empty in blank:
                        message = "this line is empty; every line is one request"
                        more += _add(errors, _error(INVALID_JSON_LINE, message, None, empty))
                    blank = []
                    total = line
                    for problem in self._check_line(text, line, batch["endpoint"], seen, first_model):
                        more += _add(errors, problem)
                if not self._still_validating(batch):
                    return
            if total == 0:
                errors.append(_error(EMPTY_FILE, "the input file holds no request", None))
        if more:
            errors.append(_error(TOO_MANY_ERRORS, f"{more} more errors not listed; fix the ones above first", None))
        log = logger.bind(batch_id=batch["id"])
        if errors:
            outcome = self.store.end(batch, (VALIDATING,), FAILED, final=True, errors=orjson.dumps(errors).decode())
            if outcome == "":
                log.info("batch {}: the input file failed validation ({} errors)", batch["id"], len(errors))
            return
        model = first_model.get("model", "")
        outcome = self.store.transition(batch["id"], (VALIDATING,), IN_PROGRESS, total=total, model=model, next_line=0)
        if outcome == "":
            log.info("batch {}: {} requests for {}, in progress", batch["id"], total, model)

    def _still_validating(self, batch: dict[str, Any]) -> bool:
        """Between pages of a long input file: the batch kept (its lease), and whether its validation goes on (not
        cancelled meanwhile, its window not ended: then it ends `expired` here; this driver not stopping: the next
        driver validates it from the start)."""
        if self._stopping.is_set():
            return False
        self.store.lease(batch["id"], self.holder, LEASE_MS)
        current = self.store.get(batch["id"])
        if current is None or current["status"] != VALIDATING:
            return False  # cancelled (or its owner revoked): the stop path ends it
        if time.time() >= float(current["expires_at"]):
            self._expire_validation(batch)
            return False
        return True

    def _expire_validation(self, batch: dict[str, Any]) -> bool:
        message = "the completion window ended before the input file was validated; no request was run"
        errors = orjson.dumps([_error(BATCH_EXPIRED, message, None)]).decode()
        if self.store.end(batch, (VALIDATING,), EXPIRED, final=True, errors=errors) != "":
            return False
        logger.bind(batch_id=batch["id"]).info("batch {}: its window ended while validating", batch["id"])
        return True

    def _check_line(
        self, text: bytes, line: int, endpoint: str, seen: dict[str, int], first_model: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """A line's problems, as errors.data[] entries (none: it runs as the same /v1 request would). A value of the
        caller's is never echoed whole (`_clip`): the errors are kept, listed and sent in the batch's webhook."""
        settings = services().settings
        size = len(text)
        if size > settings.max_request_bytes:
            limit = settings.max_request_bytes
            message = f"this request is {size} bytes; at most {limit} (AETHERCORE_MAX_REQUEST_BYTES)"
            return [_error(REQUEST_TOO_LARGE, message, None, line)]
        try:
            request = loads_bounded(text, settings.max_json_depth)
        except JsonBodyError as exc:
            return [_error(INVALID_JSON_LINE, f"this line is {exc}", None, line)]
        if not isinstance(request, dict):
            return [_error(INVALID_JSON_LINE, "this line is not a JSON object", None, line)]
        problems = []
        unknown = sorted(set(request) - LINE_KEYS)
        if unknown:
            named = ", ".join(_clip(key) for key in unknown[:3]) + (
                f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            )
            message = f"unknown field(s) {named}; a line holds custom_id, method, url and body"
            problems.append(_error(INVALID_REQUEST, message, unknown[0], line))
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            message = f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters"
            problems.append(_error(INVALID_REQUEST, message, "custom_id", line))
        elif custom_id in seen:
            message = f"custom_id {_clip(custom_id)} is also on line {seen[custom_id]}; each request needs its own"
            problems.append(_error(DUPLICATE_CUSTOM_ID, message, "custom_id", line))
        else:
            seen[custom_id] = line
        if request.get("method") != "POST":
            problems.append(_error(INVALID_REQUEST, "method must be POST", "method", line))
        url = request.get("url")
        if url != endpoint:
            message = (
                f"url {_clip(url)} is not the batch's endpoint {endpoint}: every line of a batch calls its endpoint"
            )
            problems.append(_error(MISMATCHED_URL, message, "url", line))
        body = request.get("body")
        if not isinstance(body, dict):
            problems.append(_error(INVALID_REQUEST, "body must be a JSON object: the endpoint's request", "body", line))
            return problems
        model = body.get("model")
        if isinstance(model, str):
            first, first_line = first_model.setdefault("model", model), first_model.setdefault("line", line)
            if model != first:
                message = (
                    f"model {_clip(model)} differs from {_clip(first)} (line {first_line}): a batch runs one model"
                )
                problems.append(_error(MISMATCHED_MODEL, message, "model", line))
        if url == endpoint:
            try:
                prepare(endpoint, body)
            except (ApiError, ma.ValidationError) as exc:
                refusal = _api_error(exc)
                error = openai_error(refusal.status, refusal.code, refusal.message, refusal.details)["error"]
                problems.append(_error(error["code"], error["message"], error["param"], line))
        return problems

    # -- running -----------------------------------------------------------------------------------------------
    def _submit(self, batch: dict[str, Any]) -> int:
        """Submit the lines taken and not submitted, and more while there is room; how many lines were handled."""
        now = time.time()
        if float(batch.get("hold_until") or 0) > now:
            return 0
        svc = services()
        waiting = sorted(line for line, job in self.store.taken(batch["id"]).items() if job == NOT_SUBMITTED)
        waiting += self.store.claim(batch, batch_line_room(svc, batch), "room")
        if not waiting:
            return 0
        answers: list[Answer] = []
        work: list[tuple[int, Any, Prepared]] = []
        for line, text in zip(waiting, self.files.lines(batch["input_file_id"], waiting)):
            custom_id = _custom_id(text)
            try:
                request = orjson.loads(text) if text else {}
                work.append((line, custom_id, prepare(batch["endpoint"], request.get("body"))))
            except (ApiError, ma.ValidationError) as exc:  # valid when validated: models.yaml changed since
                answers.append(self._refused(batch, line, custom_id, None, _api_error(exc)))
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
                answers.append(self._refused(batch, line, custom_id, None, outcome))  # what /v1 would answer
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
            with self._as_owner(batch):
                g.request_id = f"{batch['id']}.{line}"
                return submit_line(services(), prepared.spec, {**prepared.payload, "timeout": timeout})
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
        jobs = services().jobs.records.get_many([submitted[line] for line in lines])
        vanished = [line for line, job in zip(lines, jobs) if job is None]
        ended = [(line, job) for line, job in zip(lines, jobs) if job is not None and job["status"] in TERMINAL]
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
                answers += self._broken_line(batch, line, _custom_id(text), exc)
        return self._write(batch, answers)

    def _write(self, batch: dict[str, Any], answers: list[Answer]) -> int:
        """The answers written, each within the batch's output cap and its owner's quota; how many."""
        answered, limited = self.store.answer(batch, answers, services().settings.batch_output_max_bytes)
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
        return [self._refused(batch, line, custom_id, None, ApiError(500, INTERNAL_ERROR, message))]

    def _answer(self, batch: dict[str, Any], line: int, text: bytes | None, job: dict[str, Any] | None) -> Answer:
        request = orjson.loads(text) if text else {}
        custom_id = request.get("custom_id")
        if job is None:
            return self._stopped(batch, line, custom_id)
        if job["status"] == SUCCEEDED:
            try:
                body = prepare(batch["endpoint"], request.get("body")).respond(job)
            except (ApiError, ma.ValidationError) as exc:  # a failed row of the request, or models.yaml changed
                return self._refused(batch, line, custom_id, job["job_id"], _api_error(exc))
            entry = {
                "id": f"batch_req_{job['job_id']}",
                "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": job["job_id"], "body": body},
                "error": None,
            }
            usage = body.get("usage") or {}
            return _entry(line, OUTPUT, entry, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        stopping = batch.get("stopping")
        if stopping and job["status"] in (JOB_CANCELLED, JOB_EXPIRED):
            return self._stopped(batch, line, custom_id, job["job_id"])
        if job["status"] == JOB_EXPIRED and time.time() >= float(batch["expires_at"]):
            return self._stopped(batch, line, custom_id, job["job_id"], STOP_EXPIRE)
        return self._refused(batch, line, custom_id, job["job_id"], ended_error(job))

    def _refused(self, batch: dict[str, Any], line: int, custom_id: Any, job_id: str | None, exc: ApiError) -> Answer:
        """A line answered as its /v1 request would be refused: the status and OpenAI's error body."""
        ident = job_id or _line_id(batch, line)
        body = openai_error(exc.status, exc.code, exc.message, exc.details)
        entry = {
            "id": f"batch_req_{ident}",
            "custom_id": custom_id,
            "response": {"status_code": exc.status, "request_id": ident, "body": body},
            "error": None,
        }
        return _entry(line, ERROR, entry)

    def _stopped(
        self, batch: dict[str, Any], line: int, custom_id: Any, job_id: str | None = None, why: str | None = None
    ) -> Answer:
        """A line that did not run because its batch stopped (OpenAI's non-HTTP `error`)."""
        code, message = STOPPED[why or batch.get("stopping") or STOP_CANCEL]
        entry = {
            "id": f"batch_req_{job_id or _line_id(batch, line)}",
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
        return _entry(line, ERROR, entry)

    # -- stopping and ending -------------------------------------------------------------------------------------
    def _stop(self, batch: dict[str, Any]) -> int:
        """Answer the lines that never ran; ask the submitted ones to stop (what already ended is kept). How many
        lines were answered."""
        self.store.claim(batch, STOP_PAGE, "all")
        taken = self.store.taken(batch["id"])
        waiting = sorted(line for line, job in taken.items() if job == NOT_SUBMITTED)[:STOP_PAGE]
        texts = self.files.lines(batch["input_file_id"], waiting)
        answers = [self._stopped(batch, line, _custom_id(text)) for line, text in zip(waiting, texts)]
        answered = self._write(batch, answers)
        running = [job for job in taken.values() if job != NOT_SUBMITTED]
        if running and time.time() - float(batch.get("stop_sent_at") or 0) >= CANCEL_EVERY_S:
            self._cancel_jobs(running, _STOP_WHY[batch["stopping"]])
            status = batch["status"]
            self.store.transition(batch["id"], (status,), status, stamp=False, stop_sent_at=time.time())
        return answered

    def _cancel_jobs(self, job_ids: list[str], why: str) -> None:
        for job_id in job_ids:
            self._cancel_job(job_id, why)

    def _cancel_job(self, job_id: str, why: str) -> None:
        try:
            services().jobs.lifecycle.request_cancel(job_id, why)
        except JobNotFound:
            pass

    def _finish(self, batch_id: str) -> bool:
        """End a batch whose every line is answered: its files published, its final status. Whether it ended."""
        batch = self.store.get(batch_id)
        if batch is None or not _all_answered(batch) or self.store.taken(batch_id):
            return False
        status = batch["status"]
        if status == IN_PROGRESS and not batch.get("stopping"):
            if self.store.end(batch, (IN_PROGRESS,), FINALIZING, final=False) != "":
                return False
            status = FINALIZING
        target = {FINALIZING: COMPLETED, CANCELLING: CANCELLED, IN_PROGRESS: EXPIRED}.get(status)
        if target is None:
            return False
        fields = self._publish(batch)
        if self.store.end(batch, (status,), target, final=True, **fields) != "":
            return False
        logger.bind(batch_id=batch_id).info(
            "batch {}: {} ({} completed, {} failed)", batch_id, target, batch.get("completed"), batch.get("failed")
        )
        return True

    def _publish(self, batch: dict[str, Any]) -> dict[str, str]:
        """The batch's output and error files that hold answers, published: their ids, as the batch's fields."""
        fields = {}
        for name, count, size, file_id in (
            ("output", "completed", "output_bytes", batch["output_file"]),
            ("error", "failed", "error_bytes", batch["error_file"]),
        ):
            if int(batch.get(count) or 0) > 0:
                filename = f"{batch['id']}_{name}.jsonl"
                lines = int(batch.get("total") or 0)
                self.files.publish(file_id, batch["owner"], filename, int(batch.get(size) or 0), lines)
                fields[f"{name}_file_id"] = file_id
        return fields

    # -- deadlines and failures ----------------------------------------------------------------------------------
    def _late(self, batch: dict[str, Any]) -> tuple[str, str, str]:
        """Where a batch past its deadline ends, and why (its errors entry: code, message)."""
        unanswered = int(batch.get("total") or 0) - int(batch.get("completed") or 0) - int(batch.get("failed") or 0)
        after = "its cancel" if batch["status"] == CANCELLING else "its completion window ended"
        message = (
            f"{max(unanswered, 0)} requests were still unanswered {FINISH_GRACE_S} s after {after}: the batch "
            "ended without them (their jobs were asked to stop)"
        )
        if batch["status"] == CANCELLING:
            return CANCELLED, STOPPED[STOP_CANCEL][0], message
        return EXPIRED, BATCH_EXPIRED, message

    def _step_failed(self, batch_id: str, exc: Exception) -> None:
        """A step raised unexpectedly (logged here): counted in the batch's record; MAX_STEP_FAILURES in a row end
        the batch `failed`, so a bug never holds one of its owner's slots for good."""
        failures = self.store.failed(batch_id, "step_failures")
        logger.bind(batch_id=batch_id).opt(exception=exc).error(
            "batch {}: step failed ({} of {} in a row)", batch_id, failures, MAX_STEP_FAILURES
        )
        if failures < MAX_STEP_FAILURES:
            return
        batch = self.store.get(batch_id)
        if batch is None or batch["status"] in ENDED:
            return
        what = "validating its input file" if batch["status"] == VALIDATING else "running it"
        message = f"{what} failed unexpectedly {failures} times in a row (the incident was logged); the batch ended"
        with self._as_owner(batch):
            self._abandon(batch, FAILED, INTERNAL_ERROR, message)

    def _abandon(self, batch: dict[str, Any], to: str, code: str, message: str) -> bool:
        """End a batch now, whatever is unanswered (its deadline passed, or its steps keep failing): jobs still
        running asked to stop, the files of what was answered published, `message` added to its errors, its slot
        free. Whether it ended here."""
        running = [job for job in self.store.taken(batch["id"]).values() if job != NOT_SUBMITTED]
        self._cancel_jobs(running, f"its batch ended: {message}")
        try:
            fields = self._publish(batch)
        except (ValueError, TypeError, KeyError):  # its record is what broke the steps: end it without its files
            logger.bind(batch_id=batch["id"]).exception("batch {}: its files could not be published", batch["id"])
            fields = {}
        errors = _errors(batch) + [_error(code, message, None)]
        fields["errors"] = orjson.dumps(errors).decode()
        outcome = self.store.end(batch, (batch["status"],), to, final=True, force=True, **fields)
        if outcome == "":
            logger.bind(batch_id=batch["id"]).warning("batch {}: ended {}: {}", batch["id"], to, message)
        return outcome == ""


_STOP_WHY = {
    STOP_CANCEL: "its batch was cancelled",
    STOP_EXPIRE: "its batch's window ended",
    STOP_REVOKED: "its batch's owner was revoked",
}


def _deadline(batch: dict[str, Any]) -> float:
    """When the batch ends at the latest, whatever its lines: FINISH_GRACE_S after its window's end or its cancel."""
    end = float(batch["expires_at"])
    if batch.get("cancelling_at"):
        end = min(end, float(batch["cancelling_at"]))
    return end + FINISH_GRACE_S


def _outage(exc: Exception) -> bool:
    """Redis unavailable (the pass is retried as a whole), not a step that fails on its data."""
    if not isinstance(exc, redis.RedisError):
        return False
    return not isinstance(exc, redis.ResponseError) or str(exc).startswith(_OUTAGE)


def _all_answered(batch: dict[str, Any]) -> bool:
    answered = int(batch.get("completed") or 0) + int(batch.get("failed") or 0)
    return answered >= int(batch.get("total") or 0)


def _line_id(batch: dict[str, Any], line: int) -> str:
    return f"{batch['id'].removeprefix('batch_')}-{line}"


def _custom_id(text: bytes | None) -> Any:
    """A stored line's custom_id, None if the line is not what validation let through."""
    try:
        request = orjson.loads(text) if text else {}
    except orjson.JSONDecodeError:
        return None
    return request.get("custom_id") if isinstance(request, dict) else None


def _errors(batch: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        errors = orjson.loads(batch["errors"]) if batch.get("errors") else []
    except orjson.JSONDecodeError:
        return []
    return errors if isinstance(errors, list) else []


def _entry(line: int, file: str, entry: dict[str, Any], input_tokens: int = 0, output_tokens: int = 0) -> Answer:
    """A line's entry as stored (float arrays as their bytes, api/files.py) and its size as read, with the short
    entry that replaces it when it does not fit the batch's output limits."""
    size = len(orjson.dumps(entry, option=orjson.OPT_SERIALIZE_NUMPY)) + 1
    stored = orjson.dumps(compact(entry)).decode() + "\n"
    short = orjson.dumps(
        {
            "id": entry["id"],
            "custom_id": entry["custom_id"],
            "response": None,
            "error": {"code": OUTPUT_LIMIT_REACHED, "message": _LIMITED},
        }
    )
    return Answer(line, file, stored, size, short.decode() + "\n", len(short) + 1, input_tokens, output_tokens)


_LIMITED = (
    "This request's answer was not kept: the batch's output and error files reached AETHERCORE_BATCH_OUTPUT_MAX_BYTES, "
    "or its owner's reached AETHERCORE_OUTPUTS_QUOTA."
)


def _clip(value: Any) -> str:
    """A caller's value as a message shows it: its repr, cut to VALUE_MAX characters."""
    shown = repr(value)
    return shown if len(shown) <= VALUE_MAX else shown[:VALUE_MAX] + "…"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error(code: str, message: str, param: str | None, line: int | None = None) -> dict[str, Any]:
    """An errors.data[] entry, its message and param bounded whatever they quote."""
    return {
        "code": _cut(code, VALUE_MAX),
        "message": _cut(message, MESSAGE_MAX),
        "param": None if param is None else _cut(str(param), VALUE_MAX),
        "line": line,
    }


def _add(errors: list[dict[str, Any]], problem: dict[str, Any]) -> int:
    """Add a validation error unless MAX_ERRORS are listed; 1 if it was left out."""
    if len(errors) < MAX_ERRORS:
        errors.append(problem)
        return 0
    return 1


# -- the process ------------------------------------------------------------------------------------------------------
def submission_app(settings: Settings) -> Flask:
    """The Flask app whose services a batch line is submitted through (the /v1 path: `submit_line`, `prepare`, the
    owner's principal in a request context). The driver serves no request with it; it is built here only until the
    submission use case lives below HTTP (the next issue), as the in-API driver thread used its process's app."""
    from api import create_app

    return create_app(settings)


def lower_priority(increment: int) -> int:
    """Lower this process's CPU priority by `increment` (0: unchanged); its niceness now. On Linux a niceness is a
    thread's (os.nice changes the caller's only) and a new thread inherits its creator's: the threads that exist
    already (numpy starts its BLAS pool at import) are lowered to the same niceness, and every later one inherits it.
    """
    niceness = os.nice(increment)
    threads = "/proc/self/task"
    for tid in os.listdir(threads) if increment and os.path.isdir(threads) else ():
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), niceness)
        except ProcessLookupError:  # it ended meanwhile
            pass
    return niceness


def run_batch_driver(settings: Settings) -> None:
    niceness = lower_priority(settings.batch_driver_nice)
    setup_logging("batches", settings.log_level, settings.log_format)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()  # no logging here: the handler may run while this thread holds the log's lock (`run` logs it)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app = submission_app(settings)
    ext = app.extensions["aethercore_batches"]
    driver = BatchDriver(app, ext["batches"], ext["files"])
    logger.info(
        "batch driver {} running at nice {} (AETHERCORE_BATCH_DRIVER_NICE={}): the API and the workers get the CPU "
        "first",
        driver.name,
        niceness,
        settings.batch_driver_nice,
    )
    driver.run(stop)
