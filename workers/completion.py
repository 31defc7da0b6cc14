"""How a job ends: written once, whichever path ran it (batch completion, generation, task thread, reaper).

A job's end is one Lua transition (tasks/jobs/lifecycle.py `end_jobs`): `finish` writes the ends of several jobs
in one round trip that also wakes the API processes waiting for them, retried while Redis cannot take it, and
counts them in the worker's metrics. Each end is built here from the job's typed context (`JobContext`):
`succeeded` (its result encoded once: arrays straight from numpy, or base64 if asked), `failed`, `expired`,
`cancelled`. `classify` turns the exception a job failed with into its `error` (a code of tasks/errors.py). A batch
job's items are gathered into its one result by `BatchItems`, whichever path ran them.
"""

from __future__ import annotations

import base64
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from loguru import logger

from config.models import ModelSpec
from tasks.deadletters import EXPIRED_IN_QUEUE
from tasks.deadletters import POISON as DEAD_POISON
from tasks.errors import CODES, INTERNAL_ERROR, INVALID_INPUT, POISON_JOB, error_body
from tasks.jobs.codec import encode
from tasks.jobs.lifecycle import JobEnd, Lifecycle
from tasks.metrics import INFERENCE_TIME, LANE_WAIT, QUEUE_WAIT, LocalMetrics, exemplar_of
from tasks.names import DEFAULT_LANE
from tasks.results import compact
from tasks.states import CANCELLED, EXPIRED, FAILED, SUCCEEDED
from tracing import spans
from workers.runtimes.base import InvalidInput

# How long a job's end is retried while Redis cannot take it (unreachable, or at its maxmemory).
RESULT_WRITE_RETRY_S = 300


@dataclass
class JobContext:
    """One job as its worker runs it: the job of the Celery message, and what the worker learnt starting it."""

    job: dict[str, Any]  # job_id, inputs, parameters, submitted_at, deadline, batch, isolate, autoload, ...
    attempts: int  # its delivery count (1 the first time)
    started: float  # epoch seconds, when this worker marked it running
    load_ms: float | None = None  # the lazy load it waited for
    chunks: int | None = None  # streamed chunks, for the waiting API process
    begin: float = field(default_factory=time.perf_counter)

    @property
    def job_id(self) -> str:
        return self.job["job_id"]

    @property
    def parameters(self) -> dict[str, Any]:
        return self.job.get("parameters") or {}

    @property
    def is_batch(self) -> bool:
        """A /serve/batch job: its inputs are items, each with its own output or error."""
        return bool(self.job.get("batch"))

    @property
    def lane(self) -> str:
        """Its priority lane (config/lanes.py LANES)."""
        return self.job.get("priority") or DEFAULT_LANE

    @property
    def isolate(self) -> bool:
        """Queued again after its worker died: it runs alone (it may be what killed it)."""
        return bool(self.job.get("isolate"))

    @property
    def autoload(self) -> bool:
        """Its caller may have a model loaded for it (set by the API; absent: no)."""
        return bool(self.job.get("autoload"))

    @property
    def trace(self) -> str | None:
        """Its W3C traceparent (set by the API when the job has a trace: tracing/)."""
        return self.job.get("traceparent")

    def log(self, model_id: str) -> Any:
        trace = self.trace
        return logger.bind(
            job_id=self.job_id,
            model_id=model_id,
            request_id=self.job.get("request_id"),
            trace_id=trace[3:35] if trace else None,
        )


@dataclass
class Ending:
    """One job's end, as `finish` writes it."""

    job_id: str
    status: str
    error: dict[str, str] | None = None
    result: Any = None  # an object (load/unload jobs)
    result_json: bytes | None = None  # an inference result, encoded once
    timings: dict[str, Any] | None = None  # for the metrics
    wake: dict[str, Any] = field(default_factory=dict)  # what a waiting API process needs besides result/error
    expired_in_queue: bool = False  # its deadline passed before a worker started it
    lane: str | None = None  # an inference job's priority lane (its queue wait is also counted per lane)
    request_id: str | None = None  # an inference job's request id, for the log line of its end
    trace: str | None = None  # its traceparent: its end is traced (`aethercore.job.end`), its timings are exemplars

    @property
    def code(self) -> str | None:
        return self.error["code"] if self.error else None

    @property
    def dead_letter(self) -> str | None:
        """Why this end makes the job a dead letter (tasks/deadletters.py), written with the end; None: it does not."""
        if self.code == POISON_JOB:
            return DEAD_POISON
        return EXPIRED_IN_QUEUE if self.expired_in_queue else None


class BatchItems:
    """The items of one batch job (`batch: true`, /serve/batch): each item's output or its own error, in the
    items' order, gathered as they end (through the batcher, workers/handlers.py, or the running generation
    batch, workers/generation.py); the job succeeds with all of them once the last is in."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.inputs: list[Any] = ctx.job["inputs"]
        self.outputs: list[dict[str, Any] | None] = [None] * len(self.inputs)
        self.left = len(self.inputs)

    @property
    def complete(self) -> bool:
        return self.left == 0

    def put(self, index: int, output: Any = None, error: dict[str, str] | None = None) -> bool:
        """Item `index` ended with `output`, or with `error`. True when it was the last."""
        self.outputs[index] = {"error": error} if error is not None else {"output": output}
        self.left -= 1
        return self.complete

    def ending(self, completion: Completion, spec: ModelSpec, timings: dict[str, Any]) -> Ending:
        """The job's end: every item's output or error (`timings`: as the path that ran them measures them)."""
        return completion.succeeded(spec, self.ctx, {"outputs": self.outputs}, timings)


def classify(exc: BaseException) -> dict[str, str]:
    """The job's `error`: the caller's fault (invalid_input), a known condition (its own code), or a bug."""
    if isinstance(exc, InvalidInput):
        return error_body(INVALID_INPUT, str(exc))
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in CODES and code != INTERNAL_ERROR:
        return error_body(code, str(exc))
    return error_body(INTERNAL_ERROR, f"the worker failed to run the job ({type(exc).__name__}: {exc})")


def logged(log: Any, exc: BaseException) -> dict[str, str]:
    """Classify a job's failure and log it: a bug with its traceback, anything else in one line."""
    error = classify(exc)
    if error["code"] == INTERNAL_ERROR:
        log.opt(exception=exc).error("inference failed")
    else:
        log.info("inference failed: {}", error["message"])
    return error


def queue_ms(job: dict[str, Any], started: float) -> float | None:
    submitted = job.get("submitted_at")
    return round((started - submitted) * 1000, 3) if submitted else None


def _base64_arrays(value: Any) -> Any:
    """Float arrays in an output as base64 of their little-endian float32 bytes (`encoding_format: base64`)."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return base64.b64encode(value.astype("<f4").tobytes()).decode("ascii")
    if isinstance(value, dict):
        return {k: _base64_arrays(v) for k, v in value.items()}
    if isinstance(value, list):  # /serve/batch: {"outputs": [...]}
        return [_base64_arrays(v) for v in value]
    return value


class Completion:
    """Builds and writes jobs' ends for one worker (`name`, on `device`)."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        metrics: LocalMetrics,
        name: str,
        device: str,
        stop: threading.Event,
        before_end: Callable[[], None] = lambda: None,
    ) -> None:
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.name = name
        self.device = device
        self._stop = stop
        # Run before every end is written, and retried with it (workers/streams.py JobStreams.flush): what a job
        # streamed reaches Redis before its end does.
        self.before_end = before_end

    # -- building ends ---------------------------------------------------------------------------
    @staticmethod
    def wake(ctx: JobContext) -> dict[str, Any]:
        wake: dict[str, Any] = {"attempts": ctx.attempts, "started_at": ctx.started}
        if ctx.chunks is not None:
            wake["chunks"] = ctx.chunks
        return wake

    def failed(self, ctx: JobContext, error: dict[str, str], status: str = FAILED) -> Ending:
        return Ending(ctx.job_id, status, error=error, wake=self.wake(ctx), trace=ctx.trace)

    def expired(self, ctx: JobContext, error: dict[str, str]) -> Ending:
        ending = self.failed(ctx, error, EXPIRED)
        # Past its deadline when this worker took it: it expired in the queue, never run (a dead letter).
        deadline = ctx.job.get("deadline") or None
        ending.expired_in_queue = deadline is not None and ctx.started > deadline
        return ending

    def cancelled(self, ctx: JobContext, error: dict[str, str]) -> Ending:
        return self.failed(ctx, error, CANCELLED)

    def succeeded(self, spec: ModelSpec, ctx: JobContext, body: dict[str, Any], timings: dict[str, Any]) -> Ending:
        timings = {"queue_ms": queue_ms(ctx.job, ctx.started), **timings}
        if ctx.load_ms is not None:
            timings["load_ms"] = round(ctx.load_ms, 3)
        return Ending(
            ctx.job_id,
            SUCCEEDED,
            timings=timings,
            wake=self.wake(ctx),
            result_json=self.result_for(spec, ctx.job, body, timings),
            lane=ctx.lane,
            request_id=ctx.job.get("request_id"),
            trace=ctx.trace,
        )

    def result_for(self, spec: ModelSpec, job: dict[str, Any], body: dict[str, Any], timings: dict[str, Any]) -> bytes:
        """A job's result as JSON bytes, encoded once (arrays straight from numpy, or base64 if asked)."""
        body = _base64_arrays(body) if job.get("encoding_format") == "base64" else compact(body)
        return encode(
            {
                "model_id": spec.id,
                "task": spec.task,
                "device": self.device,
                "worker": self.name,
                "timings": timings,
                **body,
            }
        )

    # -- writing them ----------------------------------------------------------------------------
    def finish(self, kind: str, model_id: str, endings: list[Ending]) -> None:
        """End jobs in one round trip that also wakes the API processes waiting for them; count them (in memory)."""
        if not endings:
            return
        now = time.time()
        items = [
            JobEnd(
                e.job_id,
                e.status,
                e.code,
                e.error["message"] if e.error else "",
                result=e.result_json if e.result_json is not None else e.result,
                note=self._wake_note(e, now),
                dead=e.dead_letter,
            )
            for e in endings
        ]
        succeeded: list[Ending] = []
        began = time.time_ns() if spans.on() else 0
        written = self._write_ends(items)
        if began:
            self._trace_ends(endings, written, began)
        for ending, ended in zip(endings, written):
            if not ended:
                continue
            if ending.status == SUCCEEDED and ending.timings is not None:
                succeeded.append(ending)
            self.metrics.count_job(kind, model_id, ending.status)
            timings = ending.timings or {}
            exemplar = exemplar_of(ending.trace)
            if timings.get("queue_ms") is not None:
                self.metrics.observe(QUEUE_WAIT, model_id, timings["queue_ms"] / 1000, exemplar=exemplar)
                if ending.lane:  # per priority lane: its count is the lane's jobs
                    self.metrics.observe(LANE_WAIT, ending.lane, timings["queue_ms"] / 1000, exemplar=exemplar)
            if timings.get("inference_ms") is not None:
                self.metrics.observe(INFERENCE_TIME, model_id, timings["inference_ms"] / 1000, exemplar=exemplar)
        if succeeded:
            _log_succeeded(model_id, succeeded)

    def _trace_ends(self, endings: list[Ending], written: list[bool], began: int) -> None:
        """One `aethercore.job.end` span per traced job this call ended: the write of its end (status, error code)."""
        ended_ns = time.time_ns()
        for ending, ended in zip(endings, written):
            span = spans.start(
                "aethercore.job.end",
                ending.trace,
                start_ns=began,
                attributes={
                    "aethercore.job.id": ending.job_id,
                    "aethercore.job.status": ending.status if ended else "already_ended",
                    "aethercore.worker": self.name,
                },
            )
            if span is not None and ending.code:
                span.set_attribute("aethercore.job.error_code", ending.code)
            spans.end(span, ending.code if ended else None, end_ns=ended_ns)

    def _write_ends(self, items: list[JobEnd]) -> list[bool]:
        """Write the jobs' ends, retried while Redis is unreachable or refuses writes (at its maxmemory: results
        expiring free room) for up to RESULT_WRITE_RETRY_S: the caller (a model's completion thread) waits, so
        the model takes no new work meanwhile, and no job is left half-written. Each retry is safe: a job that
        already ended is not ended twice."""
        deadline = time.monotonic() + RESULT_WRITE_RETRY_S
        for attempt in itertools.count():
            try:
                self.before_end()  # the chunks streamed before these ends, kept while Redis did not take them
                return self.lifecycle.end_jobs(items)
            except redis.RedisError as exc:
                if time.monotonic() > deadline or self._stop.is_set():
                    raise
                if attempt == 0:
                    logger.warning(
                        "cannot write the end of {} job(s) ({}); retrying until Redis takes it", len(items), exc
                    )
                time.sleep(min(2.0, 0.1 * 2**attempt))
        raise AssertionError("unreachable")

    def _wake_note(self, ending: Ending, finished_at: float) -> bytes:
        """What a waiting API process needs to answer without reading the job back: its ending fields (the
        Lua step that ends the job adds the result and the error it writes)."""
        return encode(
            {
                "job_id": ending.job_id,
                "status": ending.status,
                "worker": self.name,
                "finished_at": finished_at,
                **ending.wake,
            }
        )


def _log_succeeded(model_id: str, endings: list[Ending]) -> None:
    """One line for the inference jobs one call ended (a batch): its `job_id` and `request_id` hold the jobs' ids,
    comma-separated in the same order (one id for a lone job), so `grep <request id>` still finds a job's end. One
    line per job cost the worker a sixth of its CPU per request at GPU speed (loguru formats and writes each)."""
    first = endings[0].timings or {}
    traced = any(e.trace for e in endings)
    logger.bind(
        model_id=model_id,
        job_id=",".join(e.job_id for e in endings),
        request_id=",".join(e.request_id or "-" for e in endings),
        trace_id=",".join(e.trace[3:35] if e.trace else "-" for e in endings) if traced else None,
    ).info(
        "inference succeeded: {} job(s), batch of {}, {:.1f} ms",
        len(endings),
        first.get("batch_size"),
        first.get("inference_ms") or 0,
    )
