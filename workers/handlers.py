"""The Celery tasks a worker runs. Every outcome ends up in the job record; no exception kills the worker."""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from loguru import logger

from tasks.jobs import FAILED, SUCCEEDED
from tasks.names import INFER, LOAD_MODEL, UNLOAD_MODEL
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


def run_inference(job_id: str, model_id: str, inputs: Any, parameters: dict[str, Any],
                  submitted_at: float | None = None) -> None:
    svc = service()
    log = logger.bind(job_id=job_id, model_id=model_id)
    if not svc.jobs.mark_running(job_id, svc.name):
        log.info("job already ended; skipping")
        return
    started = time.time()
    try:
        spec = svc.models.get(model_id)
        if spec is None:
            svc.jobs.finish(job_id, FAILED, error=_error("model_not_found", f"model {model_id!r} is not configured"))
            return
        runtime, load_ms = svc.runtime_for(spec)
        begin = time.perf_counter()
        output = runtime.run(inputs, parameters or {})
        inference_ms = (time.perf_counter() - begin) * 1000
    except Exception as exc:
        error = _classify(exc)
        if error["code"] == "internal_error":
            log.opt(exception=exc).error("inference failed")
        else:
            log.info("inference failed: {}", error["message"])
        svc.jobs.finish(job_id, FAILED, error=error)
        return
    timings = {
        "queue_ms": round((started - submitted_at) * 1000, 3) if submitted_at else None,
        "inference_ms": round(inference_ms, 3),
        "batch_size": 1,
    }
    if load_ms is not None:
        timings["load_ms"] = round(load_ms, 3)
    result = {"model_id": model_id, "task": spec.task, "device": svc.device, "worker": svc.name,
              "timings": timings, "output": output}
    svc.jobs.finish(job_id, SUCCEEDED, result=result)
    log.info("inference succeeded in {:.1f} ms", inference_ms)


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
