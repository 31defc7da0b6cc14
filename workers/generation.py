"""Generation jobs of one message: every one joins the model's running batch at once; each ends on its own.

The model process serves text generation by continuous batching (workers/runtimes/decoding.py), so a
task thread does not run a generation: it hands each of its message's jobs to the running batch (a
/serve/batch job: each of its items) and ends each job the moment its request ends, several in one
Redis round trip when they end together. The streamed text goes from the model process's reader thread
straight to the jobs' streams (workers/streams.py); the message stays unacknowledged until every job
of it has ended, so a worker crash redelivers them and the chunk index keeps the stream exactly-once.

A crash or hang of the model process fails every request in its batch: each is tried again on a fresh
process *alone* (`exclusive`: it runs with no companions), so only a job that brings the model down
when it runs alone is charged, and after `max_attempts` such crashes it fails as `poison_job`.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

import redis
from loguru import logger

from config.models import ModelSpec
from tasks.states import CANCELLED, EXPIRED, INFERENCE
from workers.model_process import (
    CallCancelled,
    DeadlineExceeded,
    GenerationCall,
    ModelProcessDied,
    ModelTimeout,
    RemoteRuntime,
    StreamTarget,
)
from workers.outcomes import classify, error_body, logged
from workers.service import WorkerService


@dataclass
class _Request:
    """One request in the running batch: a job, or one item of a /serve/batch job."""

    ctx: dict[str, Any]
    inputs: Any
    item: int | None = None  # index in a batch job's items; None for a job of its own
    call: GenerationCall | None = None
    stream: StreamTarget | None = None
    crashes: int = 0  # crashes charged to it (only those it was alone in)


@dataclass
class _BatchJob:
    outputs: list[Any]
    left: int
    tokens_max: int = 0
    begin: float = field(default_factory=time.perf_counter)


def run_generation_jobs(
    svc: WorkerService, spec: ModelSpec, runtime: RemoteRuntime, contexts: list[dict[str, Any]]
) -> None:
    requests: list[_Request] = []
    batches: dict[str, _BatchJob] = {}
    for ctx in contexts:
        job = ctx["job"]
        ctx["begin"] = time.perf_counter()
        if job.get("batch"):
            batches[job["job_id"]] = _BatchJob([None] * len(job["inputs"]), len(job["inputs"]))
            requests += [_Request(ctx, item, index) for index, item in enumerate(job["inputs"])]
        else:
            requests.append(_Request(ctx, job["inputs"]))
    ended = [outcome for outcome in (_empty_batch(svc, spec, ctx, batches) for ctx in contexts) if outcome]
    svc.finish(INFERENCE, spec.id, ended)

    waiting: dict[Future, _Request] = {}
    for request in requests:
        # A job queued again after its worker died runs alone: it may be what killed it.
        _send(svc, runtime, request, exclusive=bool(request.ctx["job"].get("isolate")))
        waiting[request.call.future] = request
    while waiting:
        done, _ = wait(list(waiting), return_when=FIRST_COMPLETED)
        outcomes = []
        for future in done:
            request = waiting.pop(future)
            outcome = _settle(svc, spec, runtime, request, batches)
            if outcome is _AGAIN:
                waiting[request.call.future] = request
            elif outcome is not None:
                outcomes.append(outcome)
        svc.finish(INFERENCE, spec.id, outcomes)


_AGAIN = object()


def _send(svc: WorkerService, runtime: RemoteRuntime, request: _Request, exclusive: bool) -> None:
    job = request.ctx["job"]
    if request.item is None:
        # A fresh target on every try: chunk indexes restart at 0, so what an earlier try already
        # published is skipped (by index) and readers see each chunk once.
        first = request.stream.first_piece_at if request.stream else None
        request.stream = StreamTarget(job["job_id"], runtime.spec.id, job.get("submitted_at"), first_piece_at=first)
        try:  # what the reaper charges if the worker dies now: a row alone in its batch, never a companion
            svc.jobs.mark_forward([job["job_id"]], alone=exclusive)
        except redis.RedisError:
            pass
    request.call = runtime.generate(
        request.inputs, job.get("parameters") or {}, request.stream, exclusive=exclusive, deadline=job.get("deadline")
    )


def _empty_batch(svc: WorkerService, spec: ModelSpec, ctx: dict[str, Any], batches: dict[str, _BatchJob]) -> Any:
    batch = batches.get(ctx["job"]["job_id"])
    if batch is None or batch.left:
        return None
    return svc.succeeded(spec, ctx, {"outputs": []}, {"inference_ms": 0.0, "batch_size": 0})


def _settle(
    svc: WorkerService, spec: ModelSpec, runtime: RemoteRuntime, request: _Request, batches: dict[str, _BatchJob]
) -> Any:
    """The end of one request: the job's outcome to write, _AGAIN if it was sent again, or None."""
    ctx, job = request.ctx, request.ctx["job"]
    log = logger.bind(job_id=job["job_id"], model_id=spec.id, request_id=job.get("request_id"))
    try:
        output = request.call.future.result()
    except (ModelProcessDied, ModelTimeout) as exc:
        if request.call.exclusive:
            request.crashes += 1
        if not runtime.revive_all():
            return _item_or_job(
                svc,
                spec,
                request,
                batches,
                error_body("model_process_died", f"{exc}; the model could not be restarted"),
            )
        if request.crashes >= svc.settings.max_attempts:
            return _item_or_job(
                svc,
                spec,
                request,
                batches,
                error_body(
                    "poison_job",
                    f"the job brought down the process of model {spec.id!r} {request.crashes} times "
                    f"when it ran alone ({exc}); it is not retried again",
                ),
            )
        log.warning("generation lost its model process ({}); trying it again alone", exc)
        _send(svc, runtime, request, exclusive=True)
        return _AGAIN
    except CallCancelled:
        log.info("generation cancelled")
        return {
            "job_id": job["job_id"],
            "status": CANCELLED,
            "wake": svc.wake(ctx),
            "error": error_body("cancelled", "the job was cancelled while it ran"),
        }
    except DeadlineExceeded as exc:
        error = error_body(
            "deadline_exceeded", f"{exc} (its timeout was {job['deadline'] - job['submitted_at']:.1f} s)"
        )
        if request.item is not None:
            return _item_or_job(svc, spec, request, batches, error)
        return {**svc.failed(ctx, error), "status": EXPIRED}
    except Exception as exc:
        if request.item is None:
            return svc.failed(ctx, logged(log, exc))
        return _item_or_job(svc, spec, request, batches, classify(exc))
    svc.metrics.count_tokens(spec.id, int(output.get("tokens", 0)))
    if request.item is not None:
        return _item_or_job(svc, spec, request, batches, None, output)
    running = request.call.process.generation.get("running", 1)
    ctx["chunks"] = request.stream.index
    inference_ms = (time.perf_counter() - ctx["begin"]) * 1000
    return svc.succeeded(
        spec,
        ctx,
        {"output": output},
        {"batch_wait_ms": 0.0, "inference_ms": round(inference_ms, 3), "batch_size": running},
    )


def _item_or_job(
    svc: WorkerService,
    spec: ModelSpec,
    request: _Request,
    batches: dict[str, _BatchJob],
    error: dict[str, Any] | None,
    output: Any = None,
) -> Any:
    """A request's end: the job's own end, or one item of a batch job (which ends with its last item)."""
    ctx = request.ctx
    if request.item is None:
        return svc.failed(ctx, error)
    batch = batches[ctx["job"]["job_id"]]
    batch.outputs[request.item] = {"error": error} if error is not None else {"output": output}
    batch.left -= 1
    if batch.left:
        return None
    inference_ms = (time.perf_counter() - ctx["begin"]) * 1000
    return svc.succeeded(
        spec,
        ctx,
        {"outputs": batch.outputs},
        {"inference_ms": round(inference_ms, 3), "batch_size": len(batch.outputs)},
    )
