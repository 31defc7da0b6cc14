"""Which models this worker holds: lazy loads (and who may trigger them), load failures, unloads, reconciliation.

* A job's model is loaded on demand only if it is meant to be resident on this device (its desired state,
  written by a load job) or the job carries `autoload: true` (the API sets it for callers allowed to have a
  model loaded) and AETHERCORE_AUTOLOAD is on; any other job fails `model_not_loaded`.
* A load that fails (or times out) is recorded as this worker's failure for that generation of the desired
  state, and the model is withdrawn from the desired state, so nothing retries it in a loop; the jobs that
  waited for that load share its failure (workers/cache.py).
* Unload drains: the model takes no new job, its running jobs get up to AETHERCORE_UNLOAD_DRAIN seconds to
  end, and whatever still runs then ends `model_unloaded`; `force` ends them at once (workers/service.py
  `retire`).
* reconcile: on a control message for this device (or every few seconds) the resident set is made equal to the
  desired set for this device: how a load reaches every replica and how a worker started later picks up the
  models that are meant to be loaded. An unload it starts drains on a thread of its own: a drain lasts up to
  AETHERCORE_UNLOAD_DRAIN, and meanwhile the next passes must still load, unload and evict other models.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from loguru import logger

from config.models import ModelSpec
from config.settings import Settings
from tasks.cluster import ClusterState
from tasks.errors import MODEL_NOT_LOADED, MODEL_UNLOADED
from tasks.names import control_channel, forced_unload_key
from tasks.states import LOADED
from workers.cache import ModelCache, ModelLoadError
from workers.remote_runtime import RemoteRuntime


class ModelNotLoaded(RuntimeError):
    code = MODEL_NOT_LOADED


class Residency:
    def __init__(
        self,
        settings: Settings,
        name: str,
        models: dict[str, ModelSpec],
        cluster: ClusterState,
        cache: ModelCache[RemoteRuntime],
        publish: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.name = name
        self.device = settings.device
        self.models = models
        self.cluster = cluster
        self.cache = cache
        self.publish = publish
        self.failures: dict[str, dict[str, Any]] = {}  # model id -> this worker's last failed load
        self._unloading: set[str] = set()  # models whose unload reconcile started and that still drain
        self._unloading_lock = threading.Lock()

    # -- loading -----------------------------------------------------------------------------
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

    def runtime_for(self, spec: ModelSpec, autoload: bool) -> tuple[RemoteRuntime, float | None]:
        """The resident runtime, loading it first where allowed; returns (runtime, load_ms or None). A model
        that is neither resident nor meant to be on this device is loaded only for a job that may autoload."""
        runtime = self.cache.get(spec.id)
        if runtime is not None:
            return runtime, None
        desired = self.cluster.desired(spec.id)
        if desired is None or desired["device"] != self.device:
            if not (self.settings.autoload and autoload):
                raise ModelNotLoaded(
                    f"model {spec.id!r} is not loaded; an admin or operator loads it with POST /models/{spec.id}/load"
                )
            desired = self.cluster.ensure_desired(spec.id, self.device)
            self.cluster.notify(self.device)  # other replicas of this device load it too
        started = time.perf_counter()
        try:
            runtime = self.ensure_loaded(spec, desired.get("generation", 0))
        except ModelLoadError as exc:
            self.model_failed(spec.id, str(exc), exc.code)
            raise
        return runtime, (time.perf_counter() - started) * 1000

    def model_failed(self, model_id: str, message: str, code: str) -> None:
        """A load failed (or the model's process could not be restarted): it is no longer meant to be loaded."""
        self.cluster.undesire(model_id, self.device)
        self.cluster.record_error(model_id, message, code, self.name)
        self.cluster.notify(self.device)

    def evicted(self, model_id: str) -> None:
        self.cluster.undesire(model_id, self.device)
        self.cluster.notify(self.device)

    def unload(self, model_id: str, force: bool = False) -> bool:
        """Unload the model here: drained for AETHERCORE_UNLOAD_DRAIN seconds, or its jobs ended at once."""
        return self.cache.unload(model_id, MODEL_UNLOADED, 0.0 if force else self.settings.unload_drain)

    # -- reconciling -------------------------------------------------------------------------
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
                self._unload_aside(model_id, force=bool(current is None and self._forced(model_id)))

    def _unload_aside(self, model_id: str, force: bool) -> None:
        """Unload on a thread of its own (once per model at a time), so the drain holds up no other model."""
        with self._unloading_lock:
            if model_id in self._unloading:
                return
            self._unloading.add(model_id)

        def unload() -> None:
            try:
                self.unload(model_id, force)
            except Exception:
                logger.bind(model_id=model_id).exception("unloading the model failed")
            finally:
                with self._unloading_lock:
                    self._unloading.discard(model_id)

        threading.Thread(target=unload, name=f"unload-{model_id}", daemon=True).start()

    def _forced(self, model_id: str) -> bool:
        """Whether the unload that withdrew the model asked for its jobs to end at once (`force`)."""
        try:
            return bool(self.cluster.redis.exists(forced_unload_key(model_id)))
        except redis.RedisError:
            return False

    def reconcile_loop(self, redis_client: redis.Redis, stop: Any) -> None:
        pubsub = None
        while not stop.is_set():
            try:
                if pubsub is None:
                    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(control_channel(self.device))
                pubsub.get_message(timeout=max(1.0, self.settings.heartbeat_interval * 2))
                # Drain a burst of notifications into one pass.
                while pubsub.get_message(timeout=0):
                    pass
                self.reconcile()
            except redis.RedisError as exc:
                logger.warning("reconcile: Redis unavailable ({}); retrying", exc)
                pubsub = None
                stop.wait(1.0)
            except Exception:
                logger.exception("reconcile pass failed")
                stop.wait(1.0)

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
