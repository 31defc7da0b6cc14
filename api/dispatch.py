"""Coalesce concurrent inference submissions of this API process into fewer Celery messages.

Every /serve request still gets its own job (own id, record, result); what is shared is the Celery
message that carries jobs to the device queue. One sender thread per API process publishes: while
it publishes one message, new submissions queue up behind it and leave together in the next one,
one message per (model, device). At low load a message carries one job and leaves at once, so no
request waits for company here; under load the per-message costs (publish, consume, task events,
ack) are paid once per group instead of once per request. The worker's dynamic batcher then merges
jobs across messages as before.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from tasks.names import INFER, queue_for_device

MAX_JOBS_PER_MESSAGE = 64
PUBLISH_TIMEOUT_S = 10.0


@dataclass
class _Pending:
    model_id: str
    device: str
    job: dict[str, Any]
    future: Future = field(default_factory=Future)


class InferenceDispatcher:
    def __init__(self, celery: Celery, max_jobs: int = MAX_JOBS_PER_MESSAGE) -> None:
        self.celery = celery
        self.max_jobs = max_jobs
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def publish(self, model_id: str, device: str, job: dict[str, Any], coalesce: bool = True) -> None:
        """Return once the job's message is in the broker; raise if it could not be published."""
        if not coalesce:
            self._send(model_id, device, [job])
            return
        self._ensure_thread()  # started lazily: after gunicorn forked this worker process
        pending = _Pending(model_id, device, job)
        self._queue.put(pending)
        pending.future.result(timeout=PUBLISH_TIMEOUT_S)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._loop, name="aethercore-dispatch", daemon=True)
                    self._thread.start()

    def _loop(self) -> None:
        while True:
            group = [self._queue.get()]
            while len(group) < self.max_jobs:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            by_target: dict[tuple[str, str], list[_Pending]] = {}
            for pending in group:
                by_target.setdefault((pending.model_id, pending.device), []).append(pending)
            for (model_id, device), items in by_target.items():
                try:
                    self._send(model_id, device, [p.job for p in items])
                except Exception as exc:  # the broker is down: every waiting request answers 503
                    for p in items:
                        p.future.set_exception(exc)
                else:
                    for p in items:
                        p.future.set_result(None)

    def _send(self, model_id: str, device: str, jobs: list[dict[str, Any]]) -> None:
        self.celery.send_task(
            INFER, kwargs={"model_id": model_id, "jobs": jobs}, queue=queue_for_device(device),
            # A message with one job carries the job's id, so Flower and the API name the same thing.
            task_id=jobs[0]["job_id"] if len(jobs) == 1 else None,
            # What Flower and logs show instead of the inputs themselves.
            kwargsrepr=repr({"model_id": model_id, "job_ids": [j["job_id"] for j in jobs]}),
        )
