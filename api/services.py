"""What the API talks to, built once per app: Redis, the job store, the cluster view, the Celery producer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery
from flask import current_app, g

from api.dispatch import InferenceDispatcher
from api.errors import ApiError
from api.request_id import current_request_id
from config.models import ModelSpec
from config.settings import Settings
from tasks.cluster import ClusterState
from tasks.jobs import FAILED, JobStore
from tasks.names import TASK_FOR_KIND, queue_for_device
from tasks.routing import NoDeviceAvailable, resolve_device


@dataclass
class Services:
    settings: Settings
    models: dict[str, ModelSpec]
    jobs: JobStore
    cluster: ClusterState
    celery: Celery
    dispatcher: InferenceDispatcher

    def spec(self, model_id: str) -> ModelSpec:
        spec = self.models.get(model_id)
        if spec is None:
            raise ApiError(404, "model_not_found", f"model {model_id!r} is not configured; GET /models lists "
                           "the configured models", {"model_id": model_id})
        return spec

    def device_for(self, spec: ModelSpec, *desired: dict[str, Any] | None) -> str:
        """`desired` (optional): the model's desired-state entry, if the caller already read it."""
        try:
            return resolve_device(spec, self.cluster, self.settings.gpu_enabled, *desired)
        except NoDeviceAvailable as exc:
            raise ApiError(503, "no_device", str(exc), headers={"Retry-After": "5"}) from None

    def submit(self, kind: str, spec: ModelSpec, device: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Create the job record, then queue it on the device's queue.

        Load and unload jobs are one Celery task each (task id = job id). Inference jobs go through the
        dispatcher, which may carry several concurrent jobs in one message; streamed generations and
        batch requests always travel alone.
        """
        request_id = current_request_id()
        if kind == "inference":
            self._check_backpressure(device)
        who = g.get("principal")
        job = self.jobs.create(kind=kind, model_id=spec.id, device=device, request_id=request_id,
                               owner=who.id if who is not None else None)
        try:
            if kind == "inference":
                work = {"job_id": job["job_id"], "submitted_at": job["_created_ts"], "request_id": request_id,
                        **payload}
                if payload.get("timeout"):
                    work["deadline"] = job["_created_ts"] + payload.pop("timeout")
                    work.pop("timeout", None)
                coalesce = spec.task != "text-generation" and not payload.get("batch")
                self.dispatcher.publish(spec.id, device, work, coalesce=coalesce)
            else:
                self.celery.send_task(
                    TASK_FOR_KIND[kind],
                    kwargs={"job_id": job["job_id"], "model_id": spec.id, "request_id": request_id, **payload},
                    queue=queue_for_device(device), task_id=job["job_id"],
                    kwargsrepr=repr({"job_id": job["job_id"], "model_id": spec.id, "kind": kind}),
                )
        except Exception:
            self.jobs.finish(job["job_id"], FAILED, error={"code": "broker_unavailable",
                                                           "message": "the job could not be queued"})
            raise
        return job

    def _check_backpressure(self, device: str) -> None:
        depth = self.cluster.redis.llen(queue_for_device(device))
        if depth >= self.settings.max_queue_depth:
            raise ApiError(429, "queue_full", f"the {device} queue holds {depth} jobs, at its limit "
                           f"(AETHERCORE_MAX_QUEUE_DEPTH={self.settings.max_queue_depth}); retry later",
                           {"queue": queue_for_device(device), "depth": depth}, headers={"Retry-After": "5"})

    def wait(self, job: dict[str, Any], wait_s: float) -> dict[str, Any]:
        wait_s = min(wait_s, self.settings.max_wait)
        if wait_s <= 0:
            return job
        return self.jobs.wait(job["job_id"], wait_s) or job


def services() -> Services:
    return current_app.extensions["aethercore"]

