"""The Celery tasks a worker runs. Every outcome ends up in the job record; no exception kills the worker."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

from celery import Celery
from loguru import logger

from tasks.jobs import requeue_payload
from tasks.names import INFER, LOAD_MODEL, UNLOAD_MODEL
from tasks.states import EXPIRED, FAILED, INFERENCE, LOAD, LOADED, SUCCEEDED, UNLOAD, UNLOADED, UNLOADING
from workers.cache import ModelLoadError
from workers.generation import run_generation_jobs
from workers.outcomes import classify, error_body
from workers.service import WorkerService

_service: WorkerService | None = None
# A job started by this many workers per allowed attempt, each of which died under it, is not started again.
MAX_TAKEOVERS_PER_ATTEMPT = 4


def bind_service(service: WorkerService) -> None:
    global _service
    _service = service


def service() -> WorkerService:
    if _service is None:
        raise RuntimeError("the worker service is not started")
    return _service


def _run_batch_request(svc: WorkerService, spec: Any, runtime: Any, ctx: dict[str, Any]) -> dict[str, Any]:
    """A /serve/batch job: every item goes through the batcher; each gets its output or its own error."""
    job = ctx["job"]
    parameters = job.get("parameters") or {}
    futures = [
        svc.submit(spec, runtime, item, parameters, exclusive=bool(job.get("isolate"))) for item in job["inputs"]
    ]
    outputs, sizes, inference_ms = [], [], 0.0
    for future in futures:
        try:
            outcome = future.result()
        except Exception as exc:
            outputs.append({"error": classify(exc)})
            continue
        outputs.append({"output": outcome.output})
        sizes.append(outcome.batch_size)
        inference_ms = max(inference_ms, outcome.inference_ms)
    return svc.succeeded(
        spec, ctx, {"outputs": outputs}, {"inference_ms": round(inference_ms, 3), "batch_size": max(sizes, default=0)}
    )


def run_inference(model_id: str, jobs: list[dict[str, Any]]) -> None:
    """Run the inference jobs of one message (one or more, all for `model_id`).

    Each job is started, run and finished on its own terms: a job that already ended is skipped,
    a bad input fails only its job. Jobs of one message (and of concurrent messages) share forward
    passes through the model's batcher, which also writes their ends, a whole batch per round trip.
    The message is acknowledged when this returns, i.e. after every result is written.
    """
    svc = service()
    deliveries = svc.jobs.mark_running_many(
        [(j["job_id"], requeue_payload(INFER, svc.queue, {"model_id": model_id, "jobs": [j]})) for j in jobs], svc.name
    )
    if not all(deliveries):
        logger.bind(model_id=model_id).info(
            "{} job(s) already ended or running elsewhere; skipping them", deliveries.count(0)
        )
    started = time.time()
    active, refused = [], []
    for job, delivery in zip(jobs, deliveries):
        if delivery == 0:
            continue
        ctx = {"job": job, "attempts": delivery, "started": started}
        if delivery > MAX_TAKEOVERS_PER_ATTEMPT * svc.settings.max_attempts:
            # Charges go to a job that was alone on a worker that died (workers/reaper.py); this bounds a job
            # that takes its worker down while others are always beside it.
            refused.append(
                svc.failed(
                    ctx,
                    error_body(
                        "poison_job",
                        f"the job was started by {delivery} workers and each of them died before it "
                        "ended; it is not retried again (AETHERCORE_MAX_ATTEMPTS)",
                    ),
                )
            )
        elif job.get("deadline") and started > job["deadline"]:
            refused.append(
                {
                    **svc.failed(
                        ctx,
                        error_body(
                            "deadline_exceeded",
                            f"the job waited {started - job['submitted_at']:.1f} s in the queue, longer "
                            f"than its timeout of {job['deadline'] - job['submitted_at']:.1f} s; it was not run",
                        ),
                    ),
                    "status": EXPIRED,
                }
            )
        else:
            active.append(ctx)
    if refused:
        logger.bind(model_id=model_id).warning(
            "{} job(s) refused: {}", len(refused), ", ".join(f"{r['job_id']} {r['error']['code']}" for r in refused)
        )
        svc.finish(INFERENCE, model_id, refused)
    if not active:
        return
    spec = svc.models.get(model_id)
    if spec is None:
        error = error_body("model_not_found", f"model {model_id!r} is not configured")
        svc.finish(INFERENCE, model_id, [svc.failed(ctx, error) for ctx in active])
        return
    try:
        runtime, load_ms = svc.runtime_for(spec)
    except Exception as exc:
        error = classify(exc)
        logger.bind(model_id=model_id).info("cannot serve: {}", error["message"])
        svc.finish(INFERENCE, model_id, [svc.failed(ctx, error) for ctx in active])
        return

    for ctx in active:
        ctx["load_ms"] = load_ms
    if spec.task == "text-generation":
        run_generation_jobs(svc, spec, runtime, active)
        return
    # Hand every batchable job over first (so they share batches), then run the batch requests here.
    handed: list[Future] = []
    own: list[dict[str, Any]] = []
    refused = []
    for ctx in active:
        job = ctx["job"]
        if job.get("batch"):
            own.append(ctx)
            continue
        try:
            handed.append(
                svc.submit(
                    spec, runtime, job["inputs"], job.get("parameters") or {}, ctx, exclusive=bool(job.get("isolate"))
                )
            )
        except Exception as exc:  # unloaded meanwhile
            refused.append(svc.failed(ctx, classify(exc)))
    svc.finish(INFERENCE, model_id, refused)
    for ctx in own:
        svc.finish(INFERENCE, model_id, [_run_batch_request(svc, spec, runtime, ctx)])
    for future in handed:
        try:
            future.result()
        except Exception:
            pass  # the job's failure is already written by the batcher's completion


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


def run_load(job_id: str, model_id: str, device: str, request_id: str | None = None) -> None:
    svc = service()
    log = logger.bind(job_id=job_id, model_id=model_id, request_id=request_id)
    attempts = svc.jobs.mark_running(
        job_id,
        svc.name,
        requeue_payload(
            LOAD_MODEL, svc.queue, {"job_id": job_id, "model_id": model_id, "device": device, "request_id": request_id}
        ),
    )
    if not attempts:
        return
    wake = {"attempts": attempts, "started_at": time.time()}
    spec = svc.models.get(model_id)
    if spec is None:
        svc.finish(
            LOAD,
            model_id,
            [
                {
                    "job_id": job_id,
                    "status": FAILED,
                    "wake": wake,
                    "error": error_body("model_not_found", f"model {model_id!r} is not configured"),
                }
            ],
        )
        return
    begin = time.perf_counter()
    generation = svc.cluster.desire(model_id, svc.device, job_id)
    svc.cluster.notify(svc.device)
    try:
        svc.ensure_loaded(spec, generation)
    except ModelLoadError as exc:
        svc.model_failed(model_id, str(exc), exc.code)
        svc.finish(
            LOAD,
            model_id,
            [{"job_id": job_id, "status": FAILED, "wake": wake, "error": error_body(exc.code, str(exc))}],
        )
        log.warning("load failed: {}", exc)
        return
    workers = svc.wait_for_replicas(model_id, generation, loaded=True, timeout_s=svc.settings.load_timeout)
    replicas, failures = _replica_view(model_id, workers)
    result = {
        "model_id": model_id,
        "state": LOADED,
        "device": svc.device,
        "replicas": replicas,
        "failed_replicas": failures,
        "load_ms": round((time.perf_counter() - begin) * 1000, 1),
    }
    svc.finish(LOAD, model_id, [{"job_id": job_id, "status": SUCCEEDED, "result": result, "wake": wake}])
    log.info("model loaded on {} replica(s)", len(replicas))


def run_unload(job_id: str, model_id: str, device: str, request_id: str | None = None) -> None:
    svc = service()
    attempts = svc.jobs.mark_running(
        job_id,
        svc.name,
        requeue_payload(
            UNLOAD_MODEL,
            svc.queue,
            {"job_id": job_id, "model_id": model_id, "device": device, "request_id": request_id},
        ),
    )
    if not attempts:
        return
    wake = {"attempts": attempts, "started_at": time.time()}
    svc.cluster.undesire(model_id)
    svc.cluster.notify(svc.device)
    svc.cache.unload(model_id)
    workers = svc.wait_for_replicas(model_id, 0, loaded=False, timeout_s=svc.settings.load_timeout)
    replicas, _ = _replica_view(model_id, workers)
    result = {
        "model_id": model_id,
        "state": UNLOADED if not replicas else UNLOADING,
        "device": svc.device,
        "replicas": replicas,
    }
    svc.finish(UNLOAD, model_id, [{"job_id": job_id, "status": SUCCEEDED, "result": result, "wake": wake}])
    logger.bind(job_id=job_id, model_id=model_id, request_id=request_id).info("model unloaded")


def register(app: Celery) -> None:
    """Register the handlers under the shared task names (tasks/names.py)."""
    app.task(name=INFER, ignore_result=True)(run_inference)
    app.task(name=LOAD_MODEL, ignore_result=True)(run_load)
    app.task(name=UNLOAD_MODEL, ignore_result=True)(run_unload)
