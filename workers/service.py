"""The per-process worker service: what the task threads share, and the threads that keep the cluster view true.

Models run in their own processes (workers/model_process.py); this process, which never imports torch,
forms batches (workers/batcher.py, one per resident model: the batch registry below), ends jobs
(workers/completion.py: a whole batch per Redis round trip), keeps the models this worker holds
(workers/residency.py) and counts metrics in memory, flushed with the heartbeat.

Background threads:
* heartbeat: every `heartbeat_interval` s, this worker's record (device, resident models with memory,
  failures) is written with a TTL, and so is the set of jobs its task threads work on (the reaper's backstop,
  workers/reaper.py); the record is also written at once on every model change;
* reconcile (workers/residency.py): the resident set made equal to the desired set for this device;
* reaper (workers/reaper.py): dead workers' jobs, dropped jobs and lost messages queued again.

A model goes away (unload, eviction, a process that cannot be restarted) through `retire`: it takes no new
job, its running jobs may end for the drain time, then the ones left end with the reason (docs/OPERATIONS.md).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import redis
from loguru import logger

from config.models import ModelSpec, load_models
from config.settings import Settings
from model_store.paths import estimate_bytes
from model_store.signatures import artifact_signature
from tasks.cluster import ClusterState
from tasks.errors import MODEL_EVICTED
from tasks.holdings import quotas_from
from tasks.jobs import Jobs
from tasks.metrics import BATCH_SIZE, LocalMetrics
from tasks.names import DEFAULT_LANE, queue_for_device
from tasks.redis_client import make_redis
from tasks.states import INFERENCE
from workers.batch_requests import Request
from workers.batcher import ModelBatcher
from workers.cache import ModelCache
from workers.completion import Completion, JobContext, logged
from workers.device import device_memory
from workers.lanes import LaneAging
from workers.model_errors import ModelGone, evicted, unloaded
from workers.reaper import ActiveJobs, Reaper, Send
from workers.remote_runtime import RemoteRuntime
from workers.residency import Residency
from workers.retry import RetryPolicy
from workers.streams import JobStreams

# How often a draining unload looks whether its model's jobs have ended.
DRAIN_POLL_S = 0.05


class WorkerService:
    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.device = settings.device
        self.queue = queue_for_device(self.device)
        self.started_at = time.time()
        self.models: dict[str, ModelSpec] = load_models(settings.models_file)
        self.redis = make_redis(settings.redis_url, settings.redis_sentinel_master, **settings.redis_options())
        self.jobs = Jobs(
            self.redis, settings.result_ttl, settings.dead_letter_ttl, settings.dead_letter_max, quotas_from(settings)
        )
        self.cluster = ClusterState(self.redis, settings.worker_ttl)
        self.metrics = LocalMetrics()
        self.streams = JobStreams(self.jobs.events, self.metrics)
        self._stop = threading.Event()
        self.completion = Completion(
            self.jobs.lifecycle, self.metrics, name, self.device, self._stop, before_end=self.streams.flush
        )
        # The one crash policy of this worker: its batchers, its generation runs, its reaper and its task threads
        # all judge by it (workers/retry.py).
        self.policy = RetryPolicy(settings.max_attempts)
        self.active = ActiveJobs()
        self.cache = ModelCache(
            settings.model_cache_size,
            self.device,
            factory=lambda spec: RemoteRuntime(spec, settings, self.device, self.streams),
            estimate=lambda spec: estimate_bytes(spec, settings),
            on_change=self.publish,
            on_evict=lambda model_id: self.residency.evicted(model_id),
            on_unload=self.retire,
        )
        self.residency = Residency(settings, name, self.models, self.cluster, self.cache, self.publish)
        self._batchers: dict[str, ModelBatcher] = {}
        self._batchers_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._publish_lock = threading.Lock()
        self._died_lock = threading.Lock()

    @property
    def task_threads(self) -> int:
        """Celery task threads: AETHERCORE_WORKER_CONCURRENCY, raised to the most jobs one configured model can
        run at once (max_batch_size x instances). A job holds its task thread until it ends (its message is
        acked then), so with fewer threads a batch, or a running generation batch, could never fill: 64 threads
        capped 256 concurrent streams at 64 rows. Any model counts, since an admin may load any one here."""
        return max([self.settings.worker_concurrency, *(s.max_batch_size * s.instances for s in self.models.values())])

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, send: Send) -> None:
        """Start the background threads; `send` queues a task (the reaper's way back into the broker)."""
        reaper = self.make_reaper(send)
        for target, label in (
            (self._publish_signatures, "signatures"),
            (self._heartbeat_loop, "heartbeat"),
            (lambda: self.residency.reconcile_loop(self.redis, self._stop), "reconcile"),
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

    def make_reaper(self, send: Send) -> Reaper:
        """This worker's reaper (workers/reaper.py), charging crashes by the worker's one policy."""
        broker = self.settings.effective_broker_url.split(":", 1)[0]
        return Reaper(
            self.jobs,
            self.name,
            self.queue,
            send,
            self.completion.finish,
            policy=self.policy,
            interval_s=self.settings.heartbeat_interval,
            worker_ttl_s=self.settings.worker_ttl,
            sweep_queue=broker in ("redis", "rediss", "sentinel"),
            # Lanes age in Redis where kombu keeps them as lists (a Redis broker in the jobs' Redis).
            aging=LaneAging(self.redis, self.queue, self.settings.lane_aging_s)
            if broker in ("redis", "rediss", "sentinel")
            and self.settings.effective_broker_url == self.settings.redis_url
            else None,
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
            "concurrency": self.task_threads,
            "models": self.cache.snapshot(),
            "failures": dict(self.residency.failures),
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
                # one round trip: the active set (the reaper's backstop) goes with the record
                self.cluster.publish_worker(
                    self.record(), also=lambda pipe: self.active.publish(pipe, self.name, self.settings.worker_ttl)
                )
            except redis.RedisError as exc:
                logger.warning("cannot publish worker heartbeat: {}", exc)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval):
            try:
                self.publish()
                self.flush_metrics()
            except Exception:  # a dead heartbeat would have this live worker declared dead and its jobs reaped
                logger.exception("heartbeat failed; retrying at the next beat")

    def flush_metrics(self) -> None:
        taken = self.metrics.take()
        pipe = self.redis.pipeline(transaction=False)
        if not LocalMetrics.write(pipe, taken):
            return
        try:
            pipe.execute()
        except redis.RedisError:
            self.metrics.give_back(taken)  # kept for the next flush

    # -- batching ----------------------------------------------------------------------------
    def submit(
        self,
        spec: ModelSpec,
        runtime: RemoteRuntime,
        inputs: Any,
        parameters: dict[str, Any],
        context: JobContext | None = None,
        exclusive: bool = False,
        lane: str = DEFAULT_LANE,
        trace: str | None = None,
    ) -> Future:
        """Hand one job's inputs to the model's batcher. With `context` (the job), the batcher's completion
        writes the job's end itself, together with the rest of its batch. `exclusive`: a forward pass of its
        own (a job requeued after its worker died). `trace`: the traceparent of a job given without `context` (an
        item of a /serve/batch job). ModelGone if the model is going away."""
        job = context.job if context is not None else {}
        return self._batcher(spec, runtime).submit(
            inputs,
            parameters,
            context,
            exclusive,
            lane,
            job.get("submitted_at"),
            job.get("deadline"),
            job.get("traceparent") or trace,
        )

    def _batcher(self, spec: ModelSpec, runtime: RemoteRuntime) -> ModelBatcher:
        with self._batchers_lock:
            runtime.check_open()  # under the lock `retire` takes the batcher away under: none is made after it
            batcher = self._batchers.get(spec.id)
            if batcher is None or batcher.executor is not runtime:
                if batcher is not None:
                    batcher.close()
                batcher = ModelBatcher(
                    runtime,
                    spec.id,
                    spec.max_batch_size,
                    spec.max_batch_delay_ms,
                    on_batch=lambda size: self.metrics.observe(BATCH_SIZE, spec.id, size),
                    on_complete=lambda batch: self._complete_batch(spec, batch),
                    on_model_dead=lambda gone: self.model_died(spec.id, runtime, gone),
                    on_forward=self._in_forward_pass,
                    policy=self.policy,
                    lane_aging_s=self.settings.lane_aging_s,
                )
                self._batchers[spec.id] = batcher
            return batcher

    def _complete_batch(self, spec: ModelSpec, batch: list[Request]) -> None:
        """The batcher's completion: every job of a finished batch ended in one round trip."""
        endings = []
        for request in batch:
            ctx = request.context
            if ctx is None:
                continue  # an item of a /serve/batch job: its task thread collects and ends the job
            if request.error is not None:
                endings.append(self.completion.failed(ctx, logged(ctx.log(spec.id), request.error)))
                continue
            outcome = request.outcome
            try:  # one job's output that cannot be encoded fails that job only, not its whole batch
                if outcome is None:  # never: the batcher gives each job its outcome or its error
                    raise RuntimeError("the batch ended without the job's output")
                endings.append(
                    self.completion.succeeded(
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
            except Exception as exc:
                endings.append(self.completion.failed(ctx, logged(ctx.log(spec.id), exc)))
        self.completion.finish(INFERENCE, spec.id, endings)

    @contextmanager
    def _in_forward_pass(self, batch: list[Request]) -> Iterator[None]:
        """Note which jobs a forward pass holds before it runs: should the worker die in it, the reaper
        charges only a job that was alone in it (workers/reaper.py). The note is written ahead of the pass and
        its answer read after it, so the pass does not wait a Redis round trip."""
        job_ids = [r.context.job_id for r in batch if r.context is not None]
        read = None
        if job_ids:
            try:
                read = self.jobs.inflight.note_forward(job_ids, alone=len(batch) == 1)
            except redis.RedisError as exc:  # the pass runs anyway; a death in it then charges no one
                logger.warning("cannot note a forward pass: {}", exc)
        try:
            yield
        finally:
            if read is not None:
                try:
                    read()
                except redis.RedisError as exc:
                    logger.warning("cannot note a forward pass: {}", exc)

    # -- a model going away --------------------------------------------------------------------
    def retire(self, model_id: str, runtime: Any, reason: str, drain_s: float) -> None:
        """Before the cache closes a model's runtime (ModelCache `on_unload`): no new job reaches it; the jobs
        it holds get `drain_s` seconds to end; those left are failed by the close with the reason (the pending
        ones of its batcher here, the ones in its processes by RemoteRuntime.close)."""
        # `gone`: what a job refused from now on ends with (it never started); `ending`: what a job still held
        # when the drain is over ends with (it did not end in time).
        gone: ModelGone = evicted(model_id) if reason == MODEL_EVICTED else unloaded(model_id)
        ending = gone
        if drain_s > 0:
            ending = unloaded(
                model_id, f"it was unloaded and its jobs did not end within {drain_s:g} s (AETHERCORE_UNLOAD_DRAIN)"
            )
        if isinstance(runtime, RemoteRuntime):
            runtime.retire(gone, ending)
            gone, ending = runtime.gone or gone, runtime.ending or ending  # the first reason given wins
        with self._batchers_lock:
            batcher = self._batchers.pop(model_id, None)
        deadline = time.monotonic() + drain_s
        if batcher is not None:
            batcher.close(ending, drain_s, refused=gone)
        while isinstance(runtime, RemoteRuntime) and runtime.in_flight() and time.monotonic() < deadline:
            time.sleep(DRAIN_POLL_S)

    def model_died(self, model_id: str, runtime: RemoteRuntime, gone: ModelGone) -> None:
        """A model process died and could not be restarted: the model is unloaded and marked failed.

        Every request the dead `runtime` held reports it: it is acted on once, and only while that runtime is
        still the resident one (a late report must not unload a copy loaded since)."""
        with self._died_lock:
            if getattr(runtime, "death_handled", False) or self.cache.get(model_id) is not runtime:
                return
            runtime.death_handled = True
        self.cache.unload(model_id)
        self.residency.model_failed(model_id, str(gone), gone.code)
