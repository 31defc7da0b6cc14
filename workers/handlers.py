"""The Celery tasks a worker runs. Every outcome ends up in the job record; no exception kills the worker.

Each task holds its jobs in the worker's `ActiveJobs` from before it marks them running until it returns
(workers/reaper.py: a job its live worker no longer holds is reclaimed), and ends every job it marked running:
a job that cannot be served ends with the reason (workers/completion.py), and should a bug escape the serving
path, the jobs not yet ended end `internal_error` rather than staying `running`.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

from celery import Celery
from loguru import logger

from tasks.errors import DEADLINE_EXCEEDED, MODEL_NOT_FOUND, error_body
from tasks.jobs.inflight import requeue_payload
from tasks.names import DEFAULT_LANE, INFER, LOAD_MODEL, UNLOAD_MODEL, forced_unload_key
from tasks.states import FAILED, INFERENCE, LOAD, LOADED, SUCCEEDED, UNLOAD, UNLOADED, UNLOADING
from tracing import spans
from workers.batch_requests import ResultsNotWritten
from workers.cache import ModelLoadError
from workers.completion import BatchItems, Ending, JobContext, classify
from workers.generation import run_generation_jobs
from workers.residency import ModelNotLoaded
from workers.service import WorkerService

_service: WorkerService | None = None
# How long a forced unload's mark stays for the replicas that reconcile to it.
FORCED_UNLOAD_MARK_S = 60


def bind_service(service: WorkerService) -> None:
    global _service
    _service = service


def service() -> WorkerService:
    if _service is None:
        raise RuntimeError("the worker service is not started")
    return _service


def _run_batch_request(svc: WorkerService, spec: Any, runtime: Any, ctx: JobContext) -> Ending:
    """A /serve/batch job: every item goes through the batcher; each gets its output or its own error."""
    items = BatchItems(ctx)
    handed: list[tuple[int, Future]] = []
    for index, item in enumerate(items.inputs):
        try:
            future = svc.submit(
                spec, runtime, item, ctx.parameters, exclusive=ctx.isolate, lane=ctx.lane, trace=ctx.trace
            )
        except Exception as exc:  # the model is going away
            items.put(index, error=classify(exc))
            continue
        handed.append((index, future))
    sizes, inference_ms = [], 0.0
    for index, future in handed:
        try:
            outcome = future.result()
        except Exception as exc:
            items.put(index, error=classify(exc))
            continue
        items.put(index, outcome.output)
        sizes.append(outcome.batch_size)
        inference_ms = max(inference_ms, outcome.inference_ms)
    return items.ending(
        svc.completion, spec, {"inference_ms": round(inference_ms, 3), "batch_size": max(sizes, default=0)}
    )


def run_inference(model_id: str, jobs: list[dict[str, Any]]) -> None:
    """Run the inference jobs of one message (one or more, all for `model_id`).

    Each job is started, run and finished on its own terms: a job that already ended is skipped,
    a bad input fails only its job. Jobs of one message (and of concurrent messages) share forward
    passes through the model's batcher, which also writes their ends, a whole batch per round trip.
    The message is acknowledged when this returns, i.e. after every result is written.
    """
    svc = service()
    with svc.active.holding(job["job_id"] for job in jobs):
        active = _start(svc, model_id, jobs)
        if not active:
            return
        try:
            _serve(svc, model_id, active)
        except Exception as exc:  # a bug: no job it marked running is left so
            logger.bind(model_id=model_id).opt(exception=exc).error("serving a message failed; ending its jobs")
            svc.completion.finish(INFERENCE, model_id, [svc.completion.failed(ctx, classify(exc)) for ctx in active])


def _start(svc: WorkerService, model_id: str, jobs: list[dict[str, Any]]) -> list[JobContext]:
    """Mark the message's jobs running (one round trip); end at once those that may not run. The rest."""
    deliveries = svc.jobs.lifecycle.mark_running_many(
        [(j["job_id"], requeue_payload(INFER, svc.queue, {"model_id": model_id, "jobs": [j]})) for j in jobs], svc.name
    )
    if not all(deliveries):
        logger.bind(model_id=model_id).info(
            "{} job(s) already ended or running elsewhere; skipping them", deliveries.count(0)
        )
    started = time.time()
    active: list[JobContext] = []
    refused: list[Ending] = []
    for job, delivery in zip(jobs, deliveries):
        if delivery == 0:
            continue
        ctx = JobContext(job, delivery, started)
        poison = svc.policy.refuse_delivery(delivery)
        if poison is not None:
            refused.append(svc.completion.failed(ctx, poison))
        elif job.get("deadline") and started > job["deadline"]:
            refused.append(
                svc.completion.expired(
                    ctx,
                    error_body(
                        DEADLINE_EXCEEDED,
                        f"the job waited {started - job['submitted_at']:.1f} s in the queue, longer "
                        f"than its timeout of {job['deadline'] - job['submitted_at']:.1f} s; it was not run",
                    ),
                )
            )
        else:
            active.append(ctx)
    if refused:
        logger.bind(model_id=model_id).warning(
            "{} job(s) refused: {}", len(refused), ", ".join(f"{r.job_id} {r.code}" for r in refused)
        )
        svc.completion.finish(INFERENCE, model_id, refused)
    if spans.on():
        _trace_queued(svc, jobs, deliveries, started)
    return active


def _trace_queued(svc: WorkerService, jobs: list[dict[str, Any]], deliveries: list[int], started: float) -> None:
    """Each traced job's `aethercore.queue` span: from its submission until this worker marked it running, in its
    lane of the device queue (the time the lanes' order and the workers' capacity cost it)."""
    for job, delivery in zip(jobs, deliveries):
        if delivery and job.get("submitted_at"):
            spans.record(
                "aethercore.queue",
                job.get("traceparent"),
                job["submitted_at"],
                started,
                {
                    "aethercore.queue": svc.queue,
                    "aethercore.lane": job.get("priority") or DEFAULT_LANE,
                    "aethercore.job.id": job["job_id"],
                    "aethercore.attempts": delivery,
                    "aethercore.worker": svc.name,
                },
            )


def _serve(svc: WorkerService, model_id: str, active: list[JobContext]) -> None:
    finish = svc.completion.finish
    spec = svc.models.get(model_id)
    if spec is None:
        error = error_body(MODEL_NOT_FOUND, f"model {model_id!r} is not configured")
        finish(INFERENCE, model_id, [svc.completion.failed(ctx, error) for ctx in active])
        return
    try:
        try:
            runtime, load_ms = svc.residency.runtime_for(spec, autoload=False)
        except ModelNotLoaded as exc:
            # Only the jobs whose callers may have the model loaded (`autoload`) load it; the others end here.
            finish(INFERENCE, model_id, [svc.completion.failed(c, classify(exc)) for c in active if not c.autoload])
            active = [ctx for ctx in active if ctx.autoload]
            if not active:
                return
            runtime, load_ms = svc.residency.runtime_for(spec, autoload=True)
    except Exception as exc:
        error = classify(exc)
        logger.bind(model_id=model_id).info("cannot serve: {}", error["message"])
        finish(INFERENCE, model_id, [svc.completion.failed(ctx, error) for ctx in active])
        return

    for ctx in active:
        ctx.load_ms = load_ms
    if spec.task == "text-generation":
        run_generation_jobs(svc, spec, runtime, active)
        return
    # Hand every batchable job over first (so they share batches), then run the batch requests here.
    handed: list[tuple[JobContext, Future]] = []
    own: list[JobContext] = []
    refused: list[Ending] = []
    for ctx in active:
        if ctx.is_batch:
            own.append(ctx)
            continue
        try:
            handed.append(
                (
                    ctx,
                    svc.submit(
                        spec, runtime, ctx.job["inputs"], ctx.parameters, ctx, exclusive=ctx.isolate, lane=ctx.lane
                    ),
                )
            )
        except Exception as exc:  # the model is going away
            refused.append(svc.completion.failed(ctx, classify(exc)))
    finish(INFERENCE, model_id, refused)
    for ctx in own:
        finish(INFERENCE, model_id, [_run_batch_request(svc, spec, runtime, ctx)])
    for ctx, future in handed:
        try:
            future.result()
        except ResultsNotWritten as exc:  # the completion could not write its end: try once more, failed
            ctx.log(model_id).error("{}; ending the job failed", exc)
            _end_best_effort(svc, INFERENCE, model_id, [svc.completion.failed(ctx, classify(exc))])
        except Exception:
            pass  # the job's failure is already written by the batcher's completion


def _end_best_effort(svc: WorkerService, kind: str, model_id: str, endings: list[Ending]) -> None:
    """End jobs after a failure; if even that cannot be written (Redis down), log it: the reaper's backstop
    (workers/reaper.py) takes over the jobs no longer held."""
    try:
        svc.completion.finish(kind, model_id, endings)
    except Exception as exc:
        logger.bind(model_id=model_id).opt(exception=exc).error(
            "cannot end job(s) {}", ", ".join(e.job_id for e in endings)
        )


def _replica_view(model_id: str, workers: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    replicas, failures = [], []
    for record in workers:
        info = record.get("models", {}).get(model_id)
        failure = record.get("failures", {}).get(model_id)
        if info:
            replicas.append({"worker": record["name"], "device": record["device"], **info})
        elif failure:
            failures.append({"worker": record["name"], "message": failure["message"]})
    return replicas, failures


def _mark_running(svc: WorkerService, task: str, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """A load or unload job marked running: the wake fields of its end, or None when it is not to run here."""
    attempts = svc.jobs.lifecycle.mark_running(kwargs["job_id"], svc.name, requeue_payload(task, svc.queue, kwargs))
    return {"attempts": attempts, "started_at": time.time()} if attempts else None


def run_load(
    job_id: str, model_id: str, device: str, request_id: str | None = None, traceparent: str | None = None
) -> None:
    svc = service()
    kwargs = {"job_id": job_id, "model_id": model_id, "device": device, "request_id": request_id}
    if traceparent:
        kwargs["traceparent"] = traceparent
    with svc.active.holding([job_id]), logger.contextualize(trace_id=traceparent[3:35] if traceparent else None):
        wake = _mark_running(svc, LOAD_MODEL, kwargs)
        if wake is None:
            return
        try:
            _load(svc, job_id, model_id, request_id, wake)
        except Exception as exc:  # Redis, or a bug: the job it marked running ends rather than stays so
            logger.bind(job_id=job_id, model_id=model_id).opt(exception=exc).error("load job failed")
            _end_best_effort(svc, LOAD, model_id, [Ending(job_id, FAILED, error=classify(exc), wake=wake)])


def _load(svc: WorkerService, job_id: str, model_id: str, request_id: str | None, wake: dict[str, Any]) -> None:
    log = logger.bind(job_id=job_id, model_id=model_id, request_id=request_id)
    spec = svc.models.get(model_id)
    if spec is None:
        error = error_body(MODEL_NOT_FOUND, f"model {model_id!r} is not configured")
        svc.completion.finish(LOAD, model_id, [Ending(job_id, FAILED, error=error, wake=wake)])
        return
    begin = time.perf_counter()
    generation = svc.cluster.desire(model_id, svc.device, job_id)
    svc.cluster.notify(svc.device)
    try:
        svc.residency.ensure_loaded(spec, generation)
    except ModelLoadError as exc:
        svc.residency.model_failed(model_id, str(exc), exc.code)
        error = error_body(exc.code, str(exc))
        svc.completion.finish(LOAD, model_id, [Ending(job_id, FAILED, error=error, wake=wake)])
        log.warning("load failed: {}", exc)
        return
    workers = svc.residency.wait_for_replicas(model_id, generation, loaded=True, timeout_s=svc.settings.load_timeout)
    replicas, failures = _replica_view(model_id, workers)
    result = {
        "model_id": model_id,
        "state": LOADED,
        "device": svc.device,
        "replicas": replicas,
        "failed_replicas": failures,
        "load_ms": round((time.perf_counter() - begin) * 1000, 1),
    }
    svc.completion.finish(LOAD, model_id, [Ending(job_id, SUCCEEDED, result=result, wake=wake)])
    log.info("model loaded on {} replica(s)", len(replicas))


def run_unload(
    job_id: str,
    model_id: str,
    device: str,
    request_id: str | None = None,
    force: bool = False,
    traceparent: str | None = None,
) -> None:
    """Unload the model from every worker of the device. Its running jobs are drained (they may end for
    AETHERCORE_UNLOAD_DRAIN seconds; the rest fail `model_unloaded`), or with `force` ended at once. `traceparent`:
    the job's trace context (its log lines carry the trace id)."""
    svc = service()
    kwargs = {"job_id": job_id, "model_id": model_id, "device": device, "request_id": request_id, "force": force}
    if traceparent:
        kwargs["traceparent"] = traceparent
    with svc.active.holding([job_id]), logger.contextualize(trace_id=traceparent[3:35] if traceparent else None):
        wake = _mark_running(svc, UNLOAD_MODEL, kwargs)
        if wake is None:
            return
        try:
            _unload(svc, job_id, model_id, request_id, force, wake)
        except Exception as exc:  # Redis, or a bug: the job it marked running ends rather than stays so
            logger.bind(job_id=job_id, model_id=model_id).opt(exception=exc).error("unload job failed")
            _end_best_effort(svc, UNLOAD, model_id, [Ending(job_id, FAILED, error=classify(exc), wake=wake)])


def _unload(
    svc: WorkerService, job_id: str, model_id: str, request_id: str | None, force: bool, wake: dict[str, Any]
) -> None:
    svc.cluster.undesire(model_id)
    if force:  # the other replicas, reconciling to it, end the model's jobs at once too
        svc.redis.set(forced_unload_key(model_id), "1", ex=FORCED_UNLOAD_MARK_S)
    else:
        svc.redis.delete(forced_unload_key(model_id))
    svc.cluster.notify(svc.device)
    svc.residency.unload(model_id, force)
    drain = 0.0 if force else svc.settings.unload_drain
    workers = svc.residency.wait_for_replicas(model_id, 0, loaded=False, timeout_s=svc.settings.load_timeout + drain)
    replicas, _ = _replica_view(model_id, workers)
    result = {
        "model_id": model_id,
        "state": UNLOADED if not replicas else UNLOADING,
        "device": svc.device,
        "replicas": replicas,
        "force": force,
    }
    svc.completion.finish(UNLOAD, model_id, [Ending(job_id, SUCCEEDED, result=result, wake=wake)])
    logger.bind(job_id=job_id, model_id=model_id, request_id=request_id).info("model unloaded")


def register(app: Celery, task_events: str = "control") -> None:
    """Register the handlers under the shared task names (tasks/names.py). Inference messages send Flower
    events only with AETHERCORE_TASK_EVENTS=all: at GPU speed their three events per message were a quarter
    of the worker's CPU (kombu publishes each on a fresh client), plus Flower's own."""
    # shared=False: registered in this app only (a shared task is built again in every app that finalizes later).
    app.task(name=INFER, ignore_result=True, send_events=task_events == "all", shared=False)(run_inference)
    app.task(name=LOAD_MODEL, ignore_result=True, shared=False)(run_load)
    app.task(name=UNLOAD_MODEL, ignore_result=True, shared=False)(run_unload)
