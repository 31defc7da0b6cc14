"""The per-process worker service: model cache, heartbeat and reconciliation with the desired state.

Two background threads keep the cluster view true:
* heartbeat: every `heartbeat_interval` s, this worker's record (device, resident models with
  memory, failures) is written with a TTL; it is also written at once on every model change;
* reconcile: on a control message for this device (or every few seconds) the resident set is
  made equal to the desired set for this device: this is how a load reaches every replica and
  how a worker started later picks up the models that are meant to be loaded.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any

import redis
from loguru import logger

from config.models import ModelSpec, load_models
from config.settings import Settings
from model_store.paths import artifact_bytes, resolve_model_path
from tasks.cluster import LOADED, ClusterState
from tasks.jobs import JobStore
from tasks.metrics import BATCH_SIZE, observe
from tasks.names import control_channel, queue_for_device
from tasks.redis_client import make_redis
from workers.batcher import BatchOutcome, ModelBatcher
from workers.cache import ModelCache, ModelLoadError
from workers.device import device_memory
from workers.runtimes import create_runtime
from workers.runtimes.base import Runtime, intra_op_threads, set_torch_threads


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
        self.redis = make_redis(settings.redis_url, settings.redis_sentinel_master)
        self.jobs = JobStore(self.redis, settings.result_ttl)
        self.cluster = ClusterState(self.redis, settings.worker_ttl)
        self.cache = ModelCache(
            settings.model_cache_size, self.device,
            factory=lambda spec: create_runtime(spec, settings, self.device),
            estimate=lambda spec: artifact_bytes(resolve_model_path(spec, settings)),
            on_change=self.publish, on_evict=self._evicted, on_unload=self._close_batcher,
        )
        self._batchers: dict[str, ModelBatcher] = {}
        self._batch_counts: Counter = Counter()
        self._batch_counts_lock = threading.Lock()
        self._batchers_lock = threading.Lock()
        self.failures: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._publish_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        for target, label in ((self._heartbeat_loop, "heartbeat"), (self._reconcile_loop, "reconcile")):
            thread = threading.Thread(target=target, name=f"aethercore-{label}", daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info("worker {} serving device {} (queue {!r}), model cache {} bytes",
                    self.name, self.device, self.queue, self.settings.model_cache_size)

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
                **device_memory(self.device),
                "cache_budget_bytes": self.cache.budget_bytes,
                "cache_used_bytes": self.cache.used_bytes(),
            },
        }

    def publish(self) -> None:
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
    def ensure_loaded(self, spec: ModelSpec, generation: int) -> Runtime:
        try:
            runtime = self.cache.load(spec, generation)
        except ModelLoadError as exc:
            self.failures[spec.id] = {"generation": generation, "message": str(exc), "code": exc.code,
                                      "at": time.time()}
            self.publish()
            raise
        self.failures.pop(spec.id, None)
        return runtime

    def runtime_for(self, spec: ModelSpec) -> tuple[Runtime, float | None]:
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

    def infer(self, spec: ModelSpec, runtime: Runtime, inputs: Any, parameters: dict[str, Any]) -> Future:
        """Run one job's inputs: through the model's batcher when batching is on, else right here."""
        if spec.max_batch_size > 1 or spec.instances > 1:
            return self._batcher(spec, runtime).submit(inputs, parameters)
        future: Future = Future()
        self.record_batch(spec.id, 1)
        begin = time.perf_counter()
        try:
            output = runtime.run(inputs, parameters)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(BatchOutcome(output, 1, 0.0, (time.perf_counter() - begin) * 1000))
        return future

    def record_batch(self, model_id: str, size: int) -> None:
        """Count a forward pass of `size` jobs; flushed to Redis with the next heartbeat."""
        with self._batch_counts_lock:
            self._batch_counts[(model_id, size)] += 1

    def flush_metrics(self) -> None:
        with self._batch_counts_lock:
            counts, self._batch_counts = self._batch_counts, Counter()
        if not counts:
            return
        pipe = self.redis.pipeline(transaction=False)
        for (model_id, size), times in counts.items():
            observe(pipe, BATCH_SIZE, model_id, size, times)
        try:
            pipe.execute()
        except redis.RedisError:
            with self._batch_counts_lock:
                self._batch_counts.update(counts)  # kept for the next flush

    def _batcher(self, spec: ModelSpec, runtime: Runtime) -> ModelBatcher:
        with self._batchers_lock:
            batcher = self._batchers.get(spec.id)
            if batcher is None or batcher.runtime is not runtime:
                if batcher is not None:
                    batcher.close()
                threads = intra_op_threads(self.settings, spec.instances)
                batcher = ModelBatcher(runtime, spec.max_batch_size, spec.max_batch_delay_ms, spec.instances,
                                       setup_thread=lambda: set_torch_threads(threads) if
                                       spec.model_type != "onnx" else None,
                                       on_batch=lambda size: self.record_batch(spec.id, size))
                self._batchers[spec.id] = batcher
            return batcher

    def _close_batcher(self, model_id: str) -> None:
        with self._batchers_lock:
            batcher = self._batchers.pop(model_id, None)
        if batcher is not None:
            batcher.close()

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
        desired = {mid: entry for mid, entry in self.cluster.all_desired().items()
                   if entry["device"] == self.device and mid in self.models}
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

    def wait_for_replicas(self, model_id: str, generation: int, *, loaded: bool,
                          timeout_s: float) -> list[dict[str, Any]]:
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
