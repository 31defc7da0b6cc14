"""The per-process worker service: model cache, batch completion, heartbeat and reconciliation.

Models run in their own processes (workers/model_process.py); this process, which never imports torch,
forms batches (workers/batcher.py), writes each finished batch back in one Redis round trip
(`finish`: results, `done` events, and one pub/sub message per waiting API process) and counts
metrics in memory, flushed with the heartbeat.

Two background threads keep the cluster view true:
* heartbeat: every `heartbeat_interval` s, this worker's record (device, resident models with
  memory, failures) is written with a TTL; it is also written at once on every model change;
* reconcile: on a control message for this device (or every few seconds) the resident set is
  made equal to the desired set for this device: this is how a load reaches every replica and
  how a worker started later picks up the models that are meant to be loaded.
"""

from __future__ import annotations

import base64
import itertools
import os
import socket
import threading
import time
from concurrent.futures import Future
from typing import Any

import numpy as np
import redis
from loguru import logger

from config.models import ModelSpec, load_models
from config.settings import Settings
from model_store.paths import artifact_bytes, resolve_model_path
from model_store.signatures import artifact_signature
from tasks.cluster import ClusterState
from tasks.jobs import JobStore, encode
from tasks.metrics import BATCH_SIZE, INFERENCE_TIME, QUEUE_WAIT, LocalMetrics
from tasks.names import control_channel, queue_for_device
from tasks.redis_client import make_redis
from tasks.results import compact
from tasks.states import FAILED, INFERENCE, LOADED, SUCCEEDED
from workers.batcher import ModelBatcher, Request
from workers.cache import ModelCache, ModelLoadError
from workers.device import device_memory
from workers.model_process import RemoteRuntime
from workers.outcomes import logged, queue_ms
from workers.reaper import Reaper, Send
from workers.streams import JobStreams


def _base64_arrays(value: Any) -> Any:
    """Float arrays in an output as base64 of their little-endian float32 bytes (`encoding_format: base64`)."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return base64.b64encode(value.astype("<f4").tobytes()).decode("ascii")
    if isinstance(value, dict):
        return {k: _base64_arrays(v) for k, v in value.items()}
    return value


# How long a job's end is retried while Redis cannot take it (unreachable, or at its maxmemory).
RESULT_WRITE_RETRY_S = 300


class ModelNotLoaded(RuntimeError):
    code = "model_not_loaded"


class WorkerService:
    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.device = settings.device
        self.queue = queue_for_device(self.device)
        self.started_at = time.time()
        self.models: dict[str, ModelSpec] = load_models(settings.models_file)
        self.redis = make_redis(settings.redis_url, settings.redis_sentinel_master, **settings.redis_ssl())
        self.jobs = JobStore(self.redis, settings.result_ttl)
        self.cluster = ClusterState(self.redis, settings.worker_ttl)
        self.cache = ModelCache(
            settings.model_cache_size,
            self.device,
            factory=lambda spec: RemoteRuntime(spec, settings, self.device, self.streams),
            estimate=lambda spec: (
                (artifact_bytes(resolve_model_path(spec, settings)) + (spec.kv_cache_memory or 0)) * spec.instances
            ),
            on_change=self.publish,
            on_evict=self._evicted,
            on_unload=self._close_batcher,
        )
        self._batchers: dict[str, ModelBatcher] = {}
        self.metrics = LocalMetrics()
        self.streams = JobStreams(self.jobs, self.metrics)
        self._batchers_lock = threading.Lock()
        self.failures: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._publish_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, send: Send) -> None:
        """Start the background threads; `send` queues a task (the reaper's way back into the broker)."""
        broker = self.settings.effective_broker_url.split(":", 1)[0]
        reaper = Reaper(
            self.jobs,
            self.name,
            self.queue,
            send,
            self.finish,
            max_attempts=self.settings.max_attempts,
            interval_s=self.settings.heartbeat_interval,
            worker_ttl_s=self.settings.worker_ttl,
            sweep_queue=broker in ("redis", "rediss", "sentinel"),
        )
        for target, label in (
            (self._publish_signatures, "signatures"),
            (self._heartbeat_loop, "heartbeat"),
            (self._reconcile_loop, "reconcile"),
            (lambda: reaper.run(self._stop), "reaper"),
        ):
            thread = threading.Thread(target=target, name=f"aethercore-{label}", daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info(
            "worker {} serving device {} (queue {!r}), model cache {} bytes",
            self.name,
            self.device,
            self.queue,
            self.settings.model_cache_size,
        )

    def _publish_signatures(self) -> None:
        """What each configured model takes and gives, read from its files (not loaded), for the API."""
        found = {}
        for spec in self.models.values():
            if spec.signature is not None:
                continue  # declared in models.yaml: the API reads it there
            try:
                signature = artifact_signature(spec, self.settings)
            except ValueError as exc:
                logger.warning("model {}: {}", spec.id, exc)
                continue
            if signature is not None:
                found[spec.id] = signature.public()
        try:
            self.cluster.publish_signatures(found)
        except redis.RedisError as exc:
            logger.warning("cannot publish the model signatures: {}", exc)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.flush_metrics()
        except Exception:
            pass
        try:
            self.cluster.remove_worker(self.name)
        except redis.RedisError:
            pass

    # -- the worker's record -----------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": self.device,
            "queue": self.queue,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "concurrency": self.settings.worker_concurrency,
            "models": self.cache.snapshot(),
            "failures": dict(self.failures),
            "memory": {
                **device_memory(self.device, self.settings.gpu_index),
                **({"gpu_allocated_bytes": self.cache.gpu_bytes()} if self.device.startswith("cuda") else {}),
                "cache_budget_bytes": self.cache.budget_bytes,
                "cache_used_bytes": self.cache.used_bytes(),
                "model_processes_rss_bytes": self.cache.process_rss_bytes(),
            },
        }

    def publish(self) -> None:
        self.cache.refresh()
        with self._publish_lock:
            try:
                self.cluster.publish_worker(self.record())
            except redis.RedisError as exc:
                logger.warning("cannot publish worker heartbeat: {}", exc)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval):
            self.publish()
            self.flush_metrics()

    # -- models ------------------------------------------------------------------------------
    def ensure_loaded(self, spec: ModelSpec, generation: int) -> RemoteRuntime:
        try:
            runtime = self.cache.load(spec, generation)
        except ModelLoadError as exc:
            self.failures[spec.id] = {
                "generation": generation,
                "message": str(exc),
                "code": exc.code,
                "at": time.time(),
            }
            self.publish()
            raise
        self.failures.pop(spec.id, None)
        return runtime

    def runtime_for(self, spec: ModelSpec) -> tuple[RemoteRuntime, float | None]:
        """The resident runtime, loading it first where allowed; returns (runtime, load_ms or None)."""
        runtime = self.cache.get(spec.id)
        if runtime is not None:
            return runtime, None
        desired = self.cluster.desired(spec.id)
        if desired is None or desired["device"] != self.device:
            if not self.settings.autoload:
                raise ModelNotLoaded(f"model {spec.id!r} is not loaded; load it with POST /models/{spec.id}/load")
            desired = self.cluster.ensure_desired(spec.id, self.device)
            self.cluster.notify(self.device)  # other replicas of this device load it too
        started = time.perf_counter()
        try:
            runtime = self.ensure_loaded(spec, desired.get("generation", 0))
        except ModelLoadError as exc:
            self.model_failed(spec.id, str(exc), exc.code)
            raise
        return runtime, (time.perf_counter() - started) * 1000

    def submit(
        self,
        spec: ModelSpec,
        runtime: RemoteRuntime,
        inputs: Any,
        parameters: dict[str, Any],
        context: dict[str, Any] | None = None,
        exclusive: bool = False,
    ) -> Future:
        """Hand one job's inputs to the model's batcher. With `context` (the job), the batcher's completion
        writes the job's end itself, together with the rest of its batch. `exclusive`: a forward pass of its
        own (a job requeued after its worker died)."""
        return self._batcher(spec, runtime).submit(inputs, parameters, context, exclusive)

    # -- ending jobs -------------------------------------------------------------------------
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

    def finish(self, kind: str, model_id: str, outcomes: list[dict[str, Any]]) -> None:
        """End jobs in one round trip that also wakes the API processes waiting for them; count them (in memory).

        Each outcome: job_id, status, result_json or result, error; optional `timings` for the metrics and
        `wake` (fields the waiting API process needs: attempts, started_at, chunks).
        """
        if not outcomes:
            return
        now = time.time()
        for item in outcomes:
            item["note"] = self._wake_note(item, now)
        for item, ended in zip(outcomes, self._write_ends(outcomes)):
            if not ended:
                continue
            self.metrics.count_job(kind, model_id, item["status"])
            timings = item.get("timings") or {}
            if timings.get("queue_ms") is not None:
                self.metrics.observe(QUEUE_WAIT, model_id, timings["queue_ms"] / 1000)
            if timings.get("inference_ms") is not None:
                self.metrics.observe(INFERENCE_TIME, model_id, timings["inference_ms"] / 1000)

    def _write_ends(self, outcomes: list[dict[str, Any]]) -> list[bool]:
        """Write the jobs' ends, retried while Redis is unreachable or refuses writes (at its maxmemory: results
        expiring free room) for up to RESULT_WRITE_RETRY_S: the caller (a model's completion thread) waits, so
        the model takes no new work meanwhile, and no job is left half-written. Each retry is safe: a job that
        already ended is not ended twice."""
        deadline = time.monotonic() + RESULT_WRITE_RETRY_S
        for attempt in itertools.count():
            try:
                return self.jobs.finish_many(outcomes)
            except redis.RedisError as exc:
                if time.monotonic() > deadline or self._stop.is_set():
                    raise
                if attempt == 0:
                    logger.warning(
                        "cannot write the end of {} job(s) ({}); retrying until Redis takes it", len(outcomes), exc
                    )
                time.sleep(min(2.0, 0.1 * 2**attempt))
        raise AssertionError("unreachable")

    def _wake_note(self, item: dict[str, Any], finished_at: float) -> bytes:
        """What a waiting API process needs to answer without reading the job back: its ending fields (the
        Lua step that ends the job adds the result and the error it writes)."""
        return encode(
            {
                "job_id": item["job_id"],
                "status": item["status"],
                "worker": self.name,
                "finished_at": finished_at,
                **(item.get("wake") or {}),
            }
        )

    # -- a job's end, built the same way wherever it ran (batch completion, task thread) -------------
    @staticmethod
    def wake(ctx: dict[str, Any]) -> dict[str, Any]:
        wake = {"attempts": ctx["attempts"], "started_at": ctx["started"]}
        if "chunks" in ctx:
            wake["chunks"] = ctx["chunks"]
        return wake

    def failed(self, ctx: dict[str, Any], error: dict[str, str]) -> dict[str, Any]:
        return {"job_id": ctx["job"]["job_id"], "status": FAILED, "error": error, "wake": self.wake(ctx)}

    def succeeded(
        self, spec: ModelSpec, ctx: dict[str, Any], body: dict[str, Any], timings: dict[str, Any]
    ) -> dict[str, Any]:
        job = ctx["job"]
        timings = {"queue_ms": queue_ms(job, ctx["started"]), **timings}
        if ctx.get("load_ms") is not None:
            timings["load_ms"] = round(ctx["load_ms"], 3)
        logger.bind(job_id=job["job_id"], model_id=spec.id, request_id=job.get("request_id")).info(
            "inference succeeded: batch of {}, {:.1f} ms", timings.get("batch_size"), timings.get("inference_ms") or 0
        )
        return {
            "job_id": job["job_id"],
            "status": SUCCEEDED,
            "timings": timings,
            "wake": self.wake(ctx),
            "result_json": self.result_for(spec, job, body, timings),
        }

    def _complete_batch(self, spec: ModelSpec, batch: list[Request]) -> None:
        """The batcher's completion: every job of a finished batch ended in one round trip."""
        outcomes = []
        for request in batch:
            ctx = request.context
            if ctx is None:
                continue  # an item of a /serve/batch job: its task thread collects and ends the job
            if request.error is not None:
                job = ctx["job"]
                log = logger.bind(job_id=job["job_id"], model_id=spec.id, request_id=job.get("request_id"))
                outcomes.append(self.failed(ctx, logged(log, request.error)))
                continue
            outcome = request.outcome
            outcomes.append(
                self.succeeded(
                    spec,
                    ctx,
                    {"output": outcome.output},
                    {
                        "batch_wait_ms": round(outcome.batch_wait_ms, 3),
                        "inference_ms": round(outcome.inference_ms, 3),
                        "batch_size": outcome.batch_size,
                    },
                )
            )
        self.finish(INFERENCE, spec.id, outcomes)

    def record_batch(self, model_id: str, size: int) -> None:
        """Count a forward pass of `size` jobs; flushed to Redis with the next heartbeat."""
        self.metrics.observe(BATCH_SIZE, model_id, size)

    def flush_metrics(self) -> None:
        taken = self.metrics.take()
        pipe = self.redis.pipeline(transaction=False)
        if not LocalMetrics.write(pipe, taken):
            return
        try:
            pipe.execute()
        except redis.RedisError:
            self.metrics.give_back(taken)  # kept for the next flush

    def _batcher(self, spec: ModelSpec, runtime: RemoteRuntime) -> ModelBatcher:
        with self._batchers_lock:
            batcher = self._batchers.get(spec.id)
            if batcher is None or batcher.executor is not runtime:
                if batcher is not None:
                    batcher.close()
                batcher = ModelBatcher(
                    runtime,
                    spec.id,
                    spec.max_batch_size,
                    spec.max_batch_delay_ms,
                    on_batch=lambda size: self.record_batch(spec.id, size),
                    on_complete=lambda batch: self._complete_batch(spec, batch),
                    on_model_dead=lambda exc: self._model_died(spec.id, exc),
                    on_forward=self._in_forward_pass,
                    max_crashes=self.settings.max_attempts,
                )
                self._batchers[spec.id] = batcher
            return batcher

    def _in_forward_pass(self, batch: list[Request]) -> None:
        """Note which jobs a forward pass holds before it runs: should the worker die in it, the reaper
        charges only a job that was alone in it (workers/reaper.py)."""
        job_ids = [r.context["job"]["job_id"] for r in batch if r.context is not None]
        if not job_ids:
            return
        try:
            self.jobs.mark_forward(job_ids, alone=len(batch) == 1)
        except redis.RedisError as exc:  # the pass runs anyway; a death in it then charges no one
            logger.warning("cannot note a forward pass: {}", exc)

    def _close_batcher(self, model_id: str) -> None:
        with self._batchers_lock:
            batcher = self._batchers.pop(model_id, None)
        if batcher is not None:
            batcher.close()

    def _model_died(self, model_id: str, exc: BaseException) -> None:
        """A model process died and could not be restarted: the model is unloaded and marked failed."""
        self.cache.unload(model_id)
        self.model_failed(model_id, str(exc), "model_process_died")

    def model_failed(self, model_id: str, message: str, code: str) -> None:
        """A load failed on the worker that was asked for it: it is no longer meant to be loaded."""
        self.cluster.undesire(model_id, self.device)
        self.cluster.record_error(model_id, message, code, self.name)
        self.cluster.notify(self.device)

    def _evicted(self, model_id: str) -> None:
        self.cluster.undesire(model_id, self.device)
        self.cluster.notify(self.device)

    def reconcile(self) -> None:
        snapshot_at = time.time()
        desired = {
            mid: entry
            for mid, entry in self.cluster.all_desired().items()
            if entry["device"] == self.device and mid in self.models
        }
        for model_id, entry in desired.items():
            if model_id in self.cache.resident():
                continue
            if self.failures.get(model_id, {}).get("generation") == entry["generation"]:
                continue  # already failed for this request; a new load request retries
            current = self.cluster.desired(model_id)  # still wanted? (an eviction may have withdrawn it)
            if current is None or current["device"] != self.device:
                continue
            try:
                self.ensure_loaded(self.models[model_id], entry["generation"])
            except ModelLoadError:
                pass  # recorded in self.failures and published
        for model_id, info in self.cache.snapshot().items():
            if model_id in desired or info.get("loaded_at", snapshot_at) > snapshot_at:
                continue
            current = self.cluster.desired(model_id)
            if current is None or current["device"] != self.device:
                self.cache.unload(model_id)

    def _reconcile_loop(self) -> None:
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(control_channel(self.device))
                pubsub.get_message(timeout=max(1.0, self.settings.heartbeat_interval * 2))
                # Drain a burst of notifications into one pass.
                while pubsub.get_message(timeout=0):
                    pass
                self.reconcile()
            except redis.RedisError as exc:
                logger.warning("reconcile: Redis unavailable ({}); retrying", exc)
                pubsub = None
                self._stop.wait(1.0)
            except Exception:
                logger.exception("reconcile pass failed")
                self._stop.wait(1.0)

    def wait_for_replicas(
        self, model_id: str, generation: int, *, loaded: bool, timeout_s: float
    ) -> list[dict[str, Any]]:
        """Wait until every live worker of this device has reached the state; return their records."""
        deadline = time.monotonic() + timeout_s
        while True:
            workers = self.cluster.live_workers(self.device)
            pending = []
            for record in workers:
                info = record.get("models", {}).get(model_id)
                failure = record.get("failures", {}).get(model_id)
                if loaded:
                    done = (info and info["state"] == LOADED) or (failure and failure["generation"] >= generation)
                else:
                    done = info is None
                if not done:
                    pending.append(record["name"])
            if not pending or time.monotonic() > deadline:
                if pending:
                    logger.bind(model_id=model_id).warning("replicas still pending after {} s: {}", timeout_s, pending)
                return workers
            time.sleep(0.1)
