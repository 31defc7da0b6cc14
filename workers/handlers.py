"""The Celery tasks a worker runs. Every outcome ends up in the job record; no exception kills the worker."""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from loguru import logger

from tasks.jobs import CANCELLED, CHUNK_CANCELLED, CHUNK_NOT_RUNNING, FAILED, SUCCEEDED
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


def run_inference(job_id: str, model_id: str, inputs: Any, parameters: dict[str, Any],
                  submitted_at: float | None = None, batch: bool = False) -> None:
    svc = service()
    log = logger.bind(job_id=job_id, model_id=model_id)
    if not svc.jobs.mark_running(job_id, svc.name):
        log.info("job already ended; skipping")
        return
    started = time.time()
    parameters = parameters or {}
    try:
        spec = svc.models.get(model_id)
        if spec is None:
            svc.jobs.finish(job_id, FAILED, error=_error("model_not_found", f"model {model_id!r} is not configured"))
            return
        runtime, load_ms = svc.runtime_for(spec)
        if batch:
            outputs, batch_timings = _run_batch_request(svc, spec, runtime, inputs, parameters)
            body: dict[str, Any] = {"outputs": outputs}
        else:
            if spec.task == "text-generation":
                outcome = _stream_generation(svc, job_id, runtime, inputs, parameters)
            else:
                outcome = svc.infer(spec, runtime, inputs, parameters).result()
            body = {"output": outcome.output}
            batch_timings = {"batch_wait_ms": round(outcome.batch_wait_ms, 3),
                             "inference_ms": round(outcome.inference_ms, 3), "batch_size": outcome.batch_size}
    except GenerationCancelled:
        svc.jobs.finish(job_id, CANCELLED, error=_error("cancelled", "the job was cancelled while it ran"))
        log.info("generation cancelled")
        return
    except Exception as exc:
        error = _classify(exc)
        if error["code"] == "internal_error":
            log.opt(exception=exc).error("inference failed")
        else:
            log.info("inference failed: {}", error["message"])
        svc.jobs.finish(job_id, FAILED, error=error)
        return
    timings = {"queue_ms": round((started - submitted_at) * 1000, 3) if submitted_at else None, **batch_timings}
    if load_ms is not None:
        timings["load_ms"] = round(load_ms, 3)
    result = {"model_id": model_id, "task": spec.task, "device": svc.device, "worker": svc.name,
              "timings": timings, **body}
    svc.jobs.finish(job_id, SUCCEEDED, result=result, final_chunk=body)
    log.info("inference succeeded (batch of {}) in {:.1f} ms", timings["batch_size"], timings["inference_ms"])


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


def run_load(job_id: str, model_id: str, device: str) -> None:
    svc = service()
    log = logger.bind(job_id=job_id, model_id=model_id)
    if not svc.jobs.mark_running(job_id, svc.name):
        return
    spec = svc.models.get(model_id)
    if spec is None:
        svc.jobs.finish(job_id, FAILED, error=_error("model_not_found", f"model {model_id!r} is not configured"))
        return
    begin = time.perf_counter()
    generation = svc.cluster.desire(model_id, svc.device, job_id)
    svc.cluster.notify(svc.device)
    try:
        svc.ensure_loaded(spec, generation)
    except ModelLoadError as exc:
        svc.model_failed(model_id, str(exc), exc.code)
        svc.jobs.finish(job_id, FAILED, error=_error(exc.code, str(exc)))
        log.warning("load failed: {}", exc)
        return
    workers = svc.wait_for_replicas(model_id, generation, loaded=True, timeout_s=svc.settings.load_timeout)
    replicas, failures = _replica_view(model_id, workers)
    result = {"model_id": model_id, "state": "loaded", "device": svc.device, "replicas": replicas,
              "failed_replicas": failures, "load_ms": round((time.perf_counter() - begin) * 1000, 1)}
    svc.jobs.finish(job_id, SUCCEEDED, result=result)
    log.info("model loaded on {} replica(s)", len(replicas))


def run_unload(job_id: str, model_id: str, device: str) -> None:
    svc = service()
    if not svc.jobs.mark_running(job_id, svc.name):
        return
    svc.cluster.undesire(model_id)
    svc.cluster.notify(svc.device)
    svc.cache.unload(model_id)
    workers = svc.wait_for_replicas(model_id, 0, loaded=False, timeout_s=svc.settings.load_timeout)
    replicas, _ = _replica_view(model_id, workers)
    svc.jobs.finish(job_id, SUCCEEDED, result={"model_id": model_id, "state": "unloaded" if not replicas else
                                               "unloading", "device": svc.device, "replicas": replicas})
    logger.bind(job_id=job_id, model_id=model_id).info("model unloaded")


def register(app: Celery) -> None:
    """Register the handlers under the shared task names (tasks/names.py)."""
    app.task(name=INFER, ignore_result=True)(run_inference)
    app.task(name=LOAD_MODEL, ignore_result=True)(run_load)
    app.task(name=UNLOAD_MODEL, ignore_result=True)(run_unload)
