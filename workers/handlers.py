"""The Celery tasks a worker runs. Every outcome ends up in the job record; no exception kills the worker."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

from celery import Celery
from loguru import logger

from tasks.jobs import CANCELLED, CHUNK_CANCELLED, CHUNK_NOT_RUNNING, EXPIRED, FAILED, SUCCEEDED
from tasks.metrics import INFERENCE_TIME, QUEUE_WAIT, count_job, observe
from tasks.names import INFER, LOAD_MODEL, UNLOAD_MODEL
from workers.batcher import BatchOutcome
from workers.cache import ModelLoadError
from workers.runtimes.base import InvalidInput
from workers.service import ModelNotLoaded, WorkerService

_service: WorkerService | None = None


def bind_service(service: WorkerService) -> None:
    global _service
    _service = service


def service() -> WorkerService:
    if _service is None:
        raise RuntimeError("the worker service is not started")
    return _service


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def _classify(exc: Exception) -> dict[str, str]:
    if isinstance(exc, InvalidInput):
        return _error("invalid_input", str(exc))
    if isinstance(exc, (ModelLoadError, ModelNotLoaded)):
        return _error(exc.code, str(exc))
    return _error("internal_error", f"the worker failed to run the job ({type(exc).__name__}: {exc})")


class GenerationCancelled(Exception):
    """Raised from the token callback to stop generate() when the job was cancelled."""


def _stream_generation(svc: WorkerService, job_id: str, runtime: Any, inputs: Any,
                       parameters: dict[str, Any]) -> BatchOutcome:
    index = 0

    def on_text(piece: str) -> None:
        nonlocal index
        outcome = svc.jobs.append_chunk(job_id, index, {"text": piece})
        if outcome in (CHUNK_CANCELLED, CHUNK_NOT_RUNNING):
            raise GenerationCancelled()
        index += 1

    svc.record_batch(runtime.spec.id, 1)
    begin = time.perf_counter()
    output = runtime.stream(inputs, parameters, on_text)
    return BatchOutcome(output, 1, 0.0, (time.perf_counter() - begin) * 1000)


def _run_batch_request(svc: WorkerService, spec: Any, runtime: Any, items: list[Any],
                       parameters: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A /serve/batch job: every item goes through the batcher; each gets its output or its own error."""
    futures = [svc.infer(spec, runtime, item, parameters) for item in items]
    outputs, sizes, inference_ms = [], [], 0.0
    for future in futures:
        try:
            outcome = future.result()
        except Exception as exc:
            outputs.append({"error": _classify(exc)})
            continue
        outputs.append({"output": outcome.output})
        sizes.append(outcome.batch_size)
        inference_ms = max(inference_ms, outcome.inference_ms)
    return outputs, {"inference_ms": round(inference_ms, 3), "batch_size": max(sizes, default=0)}


def _finish(svc: WorkerService, kind: str, model_id: str, outcomes: list[dict[str, Any]]) -> None:
    """Write the jobs' ends and their metrics in one round trip (each job counted once, as it ends)."""

    def metrics(pipe: Any) -> None:
        for item in outcomes:
            count_job(pipe, kind, model_id, item["status"])
            timings = (item.get("result") or {}).get("timings") or {}
            if timings.get("queue_ms") is not None:
                observe(pipe, QUEUE_WAIT, model_id, timings["queue_ms"] / 1000)
            if timings.get("inference_ms") is not None:
                observe(pipe, INFERENCE_TIME, model_id, timings["inference_ms"] / 1000)

    svc.jobs.finish_many(outcomes, also=metrics)


def _fail_all(svc: WorkerService, jobs: list[dict[str, Any]], error: dict[str, str], model_id: str) -> None:
    _finish(svc, "inference", model_id, [{"job_id": j["job_id"], "status": FAILED, "error": error} for j in jobs])


def run_inference(model_id: str, jobs: list[dict[str, Any]]) -> None:
    """Run the inference jobs of one message (one or more, all for `model_id`).

    Each job is started, run and finished on its own terms: a job that already ended is skipped,
    a bad input fails only its job. Jobs of one message (and of concurrent messages) share forward
    passes through the model's batcher. The message is acknowledged when this returns, i.e. after
    every result is written.
    """
    svc = service()
    deliveries = svc.jobs.mark_running_many([j["job_id"] for j in jobs], svc.name)
    if not all(deliveries):
        logger.bind(model_id=model_id).info("{} job(s) already ended; skipping them", deliveries.count(0))
    started = time.time()
    active, refused = [], []
    for job, delivery in zip(jobs, deliveries):
        if delivery == 0:
            continue
        if delivery > svc.settings.max_attempts:
            # Delivered again and again because its worker died each time: a poison input.
            refused.append({"job_id": job["job_id"], "status": FAILED, "error": _error(
                "poison_job", f"the job was delivered {delivery - 1} times and its worker died each time; "
                "it is not retried again (AETHERCORE_MAX_ATTEMPTS)")})
        elif job.get("deadline") and started > job["deadline"]:
            refused.append({"job_id": job["job_id"], "status": EXPIRED, "error": _error(
                "deadline_exceeded", f"the job waited {started - job['submitted_at']:.1f} s in the queue, longer "
                f"than its timeout of {job['deadline'] - job['submitted_at']:.1f} s; it was not run")})
        else:
            active.append(job)
    if refused:
        logger.bind(model_id=model_id).warning("{} job(s) refused: {}", len(refused),
                                               ", ".join(f"{r['job_id']} {r['error']['code']}" for r in refused))
        _finish(svc, "inference", model_id, refused)
    if not active:
        return
    spec = svc.models.get(model_id)
    if spec is None:
        _fail_all(svc, active, _error("model_not_found", f"model {model_id!r} is not configured"), model_id)
        return
    try:
        runtime, load_ms = svc.runtime_for(spec)
    except Exception as exc:
        error = _classify(exc)
        logger.bind(model_id=model_id).info("cannot serve: {}", error["message"])
        _fail_all(svc, active, error, model_id)
        return

    # Hand every job over first (so they can share batches), then collect.
    pending = []
    for job in active:
        if job.get("batch"):
            pending.append((job, None))
        elif spec.task == "text-generation":
            pending.append((job, None))
        else:
            pending.append((job, svc.infer(spec, runtime, job["inputs"], job.get("parameters") or {})))
    outcomes = [_collect(svc, spec, runtime, job, future, started, load_ms) for job, future in pending]
    _finish(svc, "inference", model_id, outcomes)


def _collect(svc: WorkerService, spec: Any, runtime: Any, job: dict[str, Any], future: Future | None,
             started: float, load_ms: float | None) -> dict[str, Any]:
    job_id, parameters = job["job_id"], job.get("parameters") or {}
    log = logger.bind(job_id=job_id, model_id=spec.id, request_id=job.get("request_id"))
    try:
        if job.get("batch"):
            outputs, batch_timings = _run_batch_request(svc, spec, runtime, job["inputs"], parameters)
            body: dict[str, Any] = {"outputs": outputs}
        else:
            if future is None:
                outcome = _stream_generation(svc, job_id, runtime, job["inputs"], parameters)
            else:
                outcome = future.result()
            body = {"output": outcome.output}
            batch_timings = {"batch_wait_ms": round(outcome.batch_wait_ms, 3),
                             "inference_ms": round(outcome.inference_ms, 3), "batch_size": outcome.batch_size}
    except GenerationCancelled:
        log.info("generation cancelled")
        return {"job_id": job_id, "status": CANCELLED,
                "error": _error("cancelled", "the job was cancelled while it ran")}
    except Exception as exc:
        error = _classify(exc)
        if error["code"] == "internal_error":
            log.opt(exception=exc).error("inference failed")
        else:
            log.info("inference failed: {}", error["message"])
        return {"job_id": job_id, "status": FAILED, "error": error}
    submitted = job.get("submitted_at")
    timings = {"queue_ms": round((started - submitted) * 1000, 3) if submitted else None, **batch_timings}
    if load_ms is not None:
        timings["load_ms"] = round(load_ms, 3)
    result = {"model_id": spec.id, "task": spec.task, "device": svc.device, "worker": svc.name,
              "timings": timings, **body}
    log.info("inference succeeded: batch of {}, {:.1f} ms", timings["batch_size"], timings["inference_ms"] or 0)
    return {"job_id": job_id, "status": SUCCEEDED, "result": result, "final_chunk": body}


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
    if not svc.jobs.mark_running(job_id, svc.name):
        return
    spec = svc.models.get(model_id)
    if spec is None:
        _finish(svc, "load", model_id, [{"job_id": job_id, "status": FAILED,
                                         "error": _error("model_not_found", f"model {model_id!r} is not configured")}])
        return
    begin = time.perf_counter()
    generation = svc.cluster.desire(model_id, svc.device, job_id)
    svc.cluster.notify(svc.device)
    try:
        svc.ensure_loaded(spec, generation)
    except ModelLoadError as exc:
        svc.model_failed(model_id, str(exc), exc.code)
        _finish(svc, "load", model_id, [{"job_id": job_id, "status": FAILED, "error": _error(exc.code, str(exc))}])
        log.warning("load failed: {}", exc)
        return
    workers = svc.wait_for_replicas(model_id, generation, loaded=True, timeout_s=svc.settings.load_timeout)
    replicas, failures = _replica_view(model_id, workers)
    result = {"model_id": model_id, "state": "loaded", "device": svc.device, "replicas": replicas,
              "failed_replicas": failures, "load_ms": round((time.perf_counter() - begin) * 1000, 1)}
    _finish(svc, "load", model_id, [{"job_id": job_id, "status": SUCCEEDED, "result": result}])
    log.info("model loaded on {} replica(s)", len(replicas))


def run_unload(job_id: str, model_id: str, device: str, request_id: str | None = None) -> None:
    svc = service()
    if not svc.jobs.mark_running(job_id, svc.name):
        return
    svc.cluster.undesire(model_id)
    svc.cluster.notify(svc.device)
    svc.cache.unload(model_id)
    workers = svc.wait_for_replicas(model_id, 0, loaded=False, timeout_s=svc.settings.load_timeout)
    replicas, _ = _replica_view(model_id, workers)
    result = {"model_id": model_id, "state": "unloaded" if not replicas else "unloading", "device": svc.device,
              "replicas": replicas}
    _finish(svc, "unload", model_id, [{"job_id": job_id, "status": SUCCEEDED, "result": result}])
    logger.bind(job_id=job_id, model_id=model_id, request_id=request_id).info("model unloaded")


def register(app: Celery) -> None:
    """Register the handlers under the shared task names (tasks/names.py)."""
    app.task(name=INFER, ignore_result=True)(run_inference)
    app.task(name=LOAD_MODEL, ignore_result=True)(run_load)
    app.task(name=UNLOAD_MODEL, ignore_result=True)(run_unload)
