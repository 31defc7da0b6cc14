"""What the API talks to, built once per app: Redis, the job store, the cluster view, the Celery producer,
the reply listener, and short-lived caches of what every request would otherwise read from Redis."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from flask import current_app, g

from access.principal import may_autoload
from api.dispatch import InferenceDispatcher
from api.idempotency import current_claim, replayed_conflict
from api.limits import LongRequests
from api.ratelimit import InferenceRateLimit, caller_id, limited_per_caller
from api.replies import ReplyListener
from api.request_id import current_request_id
from api.stream_hub import StreamHub
from api.ttl_cache import TTLCache
from config.models import ModelSpec
from config.settings import Settings
from config.signatures import ARTIFACT, Signature, task_signature
from protocols.errors import ApiError
from tasks.cluster import ClusterState
from tasks.deadletters import DeadLetters
from tasks.errors import BROKER_UNAVAILABLE
from tasks.holdings import DEAD_LETTERS, Held, Holdings
from tasks.jobs import Jobs
from tasks.jobs.inflight import requeue_payload
from tasks.jobs.lifecycle import JobEnd
from tasks.jobs.records import IdempotencyConflict, RateLimited, new_job_id
from tasks.names import DEFAULT_LANE, INFER, LANES, TASK_FOR_KIND, queue_for_device
from tasks.queues import lane_depths
from tasks.routing import NoDeviceAvailable, resolve_device
from tasks.states import FAILED, INFERENCE, TERMINAL
from webhooks.deliveries import Deliveries
from webhooks.outbound import OutboundPolicy
from webhooks.owners import WebhookOwners

# A model's desired state is cached this long at most; every change also clears it at once (pub/sub).
DESIRED_CACHE_S = 1.0
# Backpressure reads the queue length at most this often per device: a bound, not an exact count.
QUEUE_DEPTH_CACHE_S = 0.25
# The lanes interactive callers use; `low` is the lane of batch lines (batches/driver.py), bounded apart.
INTERACTIVE_LANES, BATCH_LANE = LANES[:2], LANES[2]
# New inference jobs are refused (503) once Redis uses this share of its maxmemory, read at most once a second.
REDIS_MEMORY_LIMIT = 0.95
REDIS_MEMORY_CACHE_S = 1.0
# The signatures the workers read from the artifacts, re-read at most this often.
SIGNATURES_CACHE_S = 5.0
# The callers' default webhook endpoints, re-read at most this often (a change takes effect within it).
WEBHOOK_CACHE_S = 5.0
# What each caller holds (tasks/holdings.py), re-read at most this often where a request's admission depends on it.
HOLDINGS_CACHE_S = 1.0


@dataclass
class Services:
    settings: Settings
    models: dict[str, ModelSpec]
    jobs: Jobs
    cluster: ClusterState
    celery: Celery
    dispatcher: InferenceDispatcher
    desired_cache: TTLCache = field(default_factory=lambda: TTLCache(DESIRED_CACHE_S))
    depth_cache: TTLCache = field(default_factory=lambda: TTLCache(QUEUE_DEPTH_CACHE_S))
    memory_cache: TTLCache = field(default_factory=lambda: TTLCache(REDIS_MEMORY_CACHE_S))
    signatures_cache: TTLCache = field(default_factory=lambda: TTLCache(SIGNATURES_CACHE_S))
    webhook_cache: TTLCache = field(default_factory=lambda: TTLCache(WEBHOOK_CACHE_S))
    holdings_cache: TTLCache = field(default_factory=lambda: TTLCache(HOLDINGS_CACHE_S))
    replies: ReplyListener = field(init=False)
    streams: StreamHub = field(init=False)
    long_requests: LongRequests = field(init=False)
    rate_limit: InferenceRateLimit = field(init=False)
    webhook_owners: WebhookOwners = field(init=False)
    deliveries: Deliveries = field(init=False)
    outbound: OutboundPolicy = field(init=False)
    dead_letters: DeadLetters = field(init=False)
    holdings: Holdings = field(init=False)

    def __post_init__(self) -> None:
        # Streams, WebSockets and waits hold a thread each: capped per caller and per process (api/limits.py).
        self.long_requests = LongRequests(
            self.settings.max_streams_per_caller, self.settings.api_threads - self.settings.reserved_threads
        )
        self.replies = ReplyListener(
            self.jobs.redis,
            self.jobs.records,
            on_models_changed=self.desired_cache.clear,
            admit=self.long_requests.take,
        )
        self.streams = StreamHub(self.jobs.redis)
        self.rate_limit = InferenceRateLimit(self.settings.rate_limit, self.settings.high_lane_rate_limit)
        self.dispatcher.in_flight = self.replies.in_flight
        self.webhook_owners = WebhookOwners(self.jobs.redis)
        self.deliveries = Deliveries(self.jobs.redis)
        self.outbound = OutboundPolicy.from_entries(self.settings.webhook_allow)
        self.dead_letters = DeadLetters(
            self.jobs.redis,
            self.settings.dead_letter_ttl,
            self.settings.dead_letter_max,
            self.jobs.quotas.get(DEAD_LETTERS),
        )
        # What callers make the service keep, charged to them (tasks/holdings.py); all of it within its share of
        # Redis's maxmemory, read with the memory check's cached value.
        self.holdings = Holdings(self.jobs.redis, self.jobs.quotas, self.holdings_limit)

    def held(self, owner: str) -> dict[str, Held]:
        """What `owner` holds of each kind (tasks/holdings.py `Held`), read at most once a second per process."""
        return self.holdings_cache.get(owner, lambda: self.holdings.usage(owner))

    def desired(self, model_id: str) -> dict[str, Any] | None:
        """The model's desired state (where it is meant to be resident), cached briefly."""
        return self.desired_cache.get(model_id, lambda: self.cluster.desired(model_id))

    def spec(self, model_id: str) -> ModelSpec:
        spec = self.models.get(model_id)
        if spec is None:
            raise ApiError(
                404,
                "model_not_found",
                f"model {model_id!r} is not configured; GET /models lists the configured models",
                {"model_id": model_id},
            )
        return spec

    def signature(self, spec: ModelSpec) -> Signature | None:
        """What the model takes and gives, loaded or not (config/signatures.py): declared in models.yaml, read
        from its artifact by the workers, or (text models) given by its task; None if nothing says yet."""
        if spec.signature is not None:
            return spec.signature
        published = self.signatures_cache.get("all", self.cluster.signatures).get(spec.id)
        if published is not None:
            return Signature.from_public(published, ARTIFACT)
        return task_signature(spec.task)

    def may_autoload(self, spec: ModelSpec) -> bool:
        """Whether this request may load `spec` by serving it (AETHERCORE_AUTOLOAD, and a caller who manages
        models or a model declared `autoload: true`): decided here once, carried in each inference job as its
        `autoload` field (the worker loads a missing model only for a job that says true)."""
        return self.settings.autoload and may_autoload(g.get("principal"), spec.autoload)

    def device_for(self, spec: ModelSpec, *desired: dict[str, Any] | None) -> str:
        """`desired` (optional): the model's desired-state entry, if the caller already read it."""
        try:
            return resolve_device(spec, self.cluster, self.settings.gpu_enabled, *desired)
        except NoDeviceAvailable as exc:
            raise ApiError(503, "no_device", str(exc), headers={"Retry-After": "5"}) from None

    def submit(
        self, kind: str, spec: ModelSpec, device: str, payload: dict[str, Any], wait_s: float = 0.0
    ) -> dict[str, Any]:
        """Create the job record and queue it on the device's queue; with `wait_s`, wait for its end.

        Load and unload jobs are one Celery task each (task id = job id). Inference jobs go through the
        dispatcher, which may carry several concurrent jobs in one message (generations too: the worker runs a
        message's generations side by side in the model's running batch); batch requests always travel alone.
        A waiting request is registered with this process's reply listener before the job can end, and the job
        names the listener's channel, so the worker that ends it wakes this request directly.

        `payload["webhook"]` (api/webhooks.py `job_webhook`) goes onto the job record. With the request's
        Idempotency-Key (api/idempotency.py), the key is taken in the same Lua step that creates the job; a key
        already used for the same request returns that job (waited for like a new one), for another request 422.
        """
        request_id = current_request_id()
        lane = self._lane(payload)
        if kind == INFERENCE:
            self._check_backpressure(device, lane)
        else:
            self.desired_cache.clear(spec.id)
        wait_s = min(wait_s, self.settings.max_wait)
        who = g.get("principal")
        job_id, now = new_job_id(), time.time()
        ttl = payload.pop("result_ttl", None)
        # on the record, not in the message: the submitter's role is what a dead letter needs to be submitted again
        extra = {
            "webhook": payload.pop("webhook", None),
            "replay_of": payload.pop("replay_of", None),
            "role": who.role if who is not None else None,
        }
        claim = current_claim()
        if kind == INFERENCE:
            payload["autoload"] = self.may_autoload(spec)
        task, kwargs = self._message(kind, spec, payload, job_id, now, request_id)
        waiter = self.replies.expect(job_id) if wait_s > 0 else None
        record = {
            "kind": kind,
            "model_id": spec.id,
            "device": device,
            "request_id": request_id,
            "owner": who.id if who is not None else None,
            "job_id": job_id,
            "notify": self.replies.channel if waiter is not None else None,
            "ttl": ttl,
            "now": now,
            # kept with the job until it starts: the reaper queues it again if its message is lost
            "payload": requeue_payload(task, queue_for_device(device), kwargs),
            "extra": extra,
            "idempotency": claim.as_lua() if claim is not None else None,
        }
        if kind == INFERENCE and claim is None and self.dispatcher.creates:
            try:  # created and queued in one step, with whatever else this process submits meanwhile
                job = self._create_queued(spec, device, kwargs["jobs"][0], record)
            except Exception:
                if waiter is not None:
                    self.replies.forget(waiter)
                raise
            return job if waiter is None else self.replies.wait(waiter, job, wait_s)
        try:
            limits = self._caller_limits(lane) if kind == INFERENCE else []
            if limits:
                job = self._create_counted(record, limits)
            else:
                job = self.jobs.records.create(**record)
        except IdempotencyConflict as conflict:
            if waiter is not None:
                self.replies.forget(waiter)
            return self._replay(conflict, claim, wait_s)
        except Exception:
            if waiter is not None:
                self.replies.forget(waiter)
            raise
        try:
            self._publish(kind, spec, device, task, kwargs)
        except Exception:
            if waiter is not None:
                self.replies.forget(waiter)
            if claim is not None:  # the job failed before it was queued: its key is free for the retry
                self.jobs.records.release_key(claim.record, job_id, claim.owner)
            raise
        if waiter is None:
            return job
        return self.replies.wait(waiter, job, wait_s)

    def _replay(self, conflict: IdempotencyConflict, claim: Any, wait_s: float) -> dict[str, Any]:
        """The job an Idempotency-Key already created, as it stands (waited for like a new one)."""
        if conflict.reused:
            raise replayed_conflict(conflict.job_id)
        job = self.jobs.records.get(conflict.job_id)
        if job is None:  # it expired between the Lua step and this read: as if never created
            raise ApiError(409, "idempotency_key_expired", "the job of this Idempotency-Key has just expired; retry")
        claim.mark_replayed()
        return self.wait(job, wait_s)

    def _caller_limits(self, lane: str) -> list[tuple[str, int, int]]:
        """The counters an inference job of this caller in `lane` counts against (the Lua step that creates the job
        counts them): none without a rate limit, or for a caller not limited per caller (admins and operators,
        api/ratelimit.py); a `high` job also on the caller's high-lane counter."""
        return self.rate_limit.counters(caller_id(), lane) if self.rate_limit and limited_per_caller() else []

    def _create_counted(self, record: dict[str, Any], limits: list[tuple[str, int, int]]) -> dict[str, Any]:
        """The caller's use of the rate limit and the job's creation: one round trip."""
        try:
            job, used = self.jobs.records.create_limited(limits, **record)
        except RateLimited as exc:
            raise self._too_many(exc, limits) from None
        self.rate_limit.remember(used, limits)
        return job

    def _create_queued(self, spec: ModelSpec, device: str, work: dict[str, Any], record: dict[str, Any]) -> dict:
        """An inference job created, counted against the caller's rate limit and queued in one Lua step shared with
        the process's concurrent submissions (api/dispatch.py): one round trip for all of them."""
        lane = self._lane(work)
        limits = self._caller_limits(lane)
        entry = {key: value for key, value in record.items() if key != "idempotency"}
        entry["limits"] = limits
        try:
            created = self.dispatcher.publish(
                spec.id, device, work, coalesce=self._coalesces(work), lane=lane, record=entry
            )
        except RateLimited as exc:
            raise self._too_many(exc, limits) from None
        assert created is not None
        job, used = created
        if limits:
            self.rate_limit.remember(used, limits)
        return job

    def _too_many(self, exc: RateLimited, limits: list[tuple[str, int, int]]) -> ApiError:
        _key, amount, window = limits[exc.index]
        # the caller's own counters come first, then the high lane's (api/ratelimit.py `counters`)
        high = exc.index >= len(self.rate_limit.items)
        what = "the high lane, AETHERCORE_HIGH_LANE_RATE_LIMIT" if high else "inference"
        return ApiError(
            429,
            "too_many_requests",
            f"rate limit exceeded ({amount} per {window} s for {what}); retry after the Retry-After header's seconds",
            headers={"Retry-After": str(exc.retry_after_s)},
        )

    @staticmethod
    def _coalesces(work: dict[str, Any]) -> bool:
        """Whether a job may share its message: batch requests (up to AETHERCORE_MAX_BATCH_INPUTS inputs of their
        own) travel alone. Generations share: 256 streams opened at once were 256 messages, and the worker spent
        1.2-1.5 ms of CPU on each before its first token, 0.27 ms as a group (docs/CAPACITY.md)."""
        return not work.get("batch")

    @staticmethod
    def _lane(work: dict[str, Any]) -> str:
        return work.get("priority", DEFAULT_LANE)

    @staticmethod
    def _message(
        kind: str, spec: ModelSpec, payload: dict[str, Any], job_id: str, now: float, request_id: str | None
    ) -> tuple[str, dict[str, Any]]:
        """The Celery task and arguments that carry the job to its worker."""
        if kind != INFERENCE:
            return TASK_FOR_KIND[kind], {"job_id": job_id, "model_id": spec.id, "request_id": request_id, **payload}
        work = {"job_id": job_id, "submitted_at": now, "request_id": request_id, **payload}
        if work.get("timeout"):
            work["deadline"] = now + work.pop("timeout")
        work.pop("timeout", None)
        return INFER, {"model_id": spec.id, "jobs": [work]}

    def _publish(self, kind: str, spec: ModelSpec, device: str, task: str, kwargs: dict[str, Any]) -> None:
        job_id = kwargs["job_id"] if kind != INFERENCE else kwargs["jobs"][0]["job_id"]
        try:
            if kind == INFERENCE:
                work = kwargs["jobs"][0]
                self.dispatcher.publish(spec.id, device, work, coalesce=self._coalesces(work), lane=self._lane(work))
            else:
                self.celery.send_task(
                    task,
                    kwargs=kwargs,
                    queue=queue_for_device(device),
                    task_id=job_id,
                    kwargsrepr=repr({"job_id": job_id, "model_id": spec.id, "kind": kind}),
                )
        except Exception:
            self.jobs.lifecycle.end_jobs([JobEnd(job_id, FAILED, BROKER_UNAVAILABLE, "the job could not be queued")])
            raise

    def _check_backpressure(self, device: str, lane: str) -> None:
        """429 `queue_full` when the lanes this submission waits behind are at their bound: the interactive lanes
        (`high`, `normal`) at AETHERCORE_MAX_QUEUE_DEPTH for an interactive job, the `low` lane at
        AETHERCORE_LOW_LANE_QUEUE_DEPTH for a `low` one. A backlog of batch lines never refuses an interactive
        caller."""
        self._check_redis_memory()
        queue = queue_for_device(device)
        low = lane == BATCH_LANE
        limit, setting = (
            (self.settings.low_lane_queue_depth, "AETHERCORE_LOW_LANE_QUEUE_DEPTH")
            if low
            else (self.settings.max_queue_depth, "AETHERCORE_MAX_QUEUE_DEPTH")
        )
        # What was waiting when last read, plus what this process queued since: exact for one API process, a bound
        # within QUEUE_DEPTH_CACHE_S for several.
        depth = self.queued_ahead(device, lane) + self.depth_cache.bump(self._depth_key(queue, lane))
        if depth >= limit:
            lanes = "low lane" if low else "interactive lanes (high, normal)"
            raise ApiError(
                429,
                "queue_full",
                f"the {device} queue's {lanes} hold {depth} jobs, at their limit ({setting}={limit}); retry later",
                {"queue": queue, "depth": depth, "lane": lane},
                headers={"Retry-After": "5"},
            )

    def queued_ahead(self, device: str, lane: str) -> int:
        """Messages waiting in the device queue's lanes of `lane`'s class (the interactive lanes, or `low`), as last
        read: one pipelined LLEN per lane, at most once per QUEUE_DEPTH_CACHE_S."""
        queue = queue_for_device(device)
        key = self._depth_key(queue, lane)
        return self.depth_cache.get(key, lambda: sum(lane_depths(self.cluster.redis, queue)[n] for n in key[1]))

    @staticmethod
    def _depth_key(queue: str, lane: str) -> tuple[str, tuple[str, ...]]:
        return queue, (BATCH_LANE,) if lane == BATCH_LANE else INTERACTIVE_LANES

    def _check_redis_memory(self) -> None:
        """503 before Redis refuses writes: new jobs stop at REDIS_MEMORY_LIMIT of its maxmemory, so the jobs
        already queued or running can still write their results (a full Redis would fail them half-way)."""
        used, limit = self.memory_cache.get("redis", self._redis_memory)
        if limit and used >= REDIS_MEMORY_LIMIT * limit:
            raise ApiError(
                503,
                "redis_full",
                f"Redis holds {used / 2**20:.0f} MiB of its maxmemory of "
                f"{limit / 2**20:.0f} MiB; new jobs are refused until finished results expire "
                "(AETHERCORE_RESULT_TTL, or result_ttl per request) or Redis gets more memory",
                {"used_memory": used, "maxmemory": limit},
                headers={"Retry-After": "30"},
            )

    def holdings_limit(self) -> int:
        """AETHERCORE_HOLDINGS_MAX_SHARE of Redis's maxmemory, from the same cached read as `_check_redis_memory`."""
        _used, limit = self.memory_cache.get("redis", self._redis_memory)
        return int(limit * self.settings.holdings_max_share)

    def _redis_memory(self) -> tuple[int, int]:
        info = self.cluster.redis.info("memory")
        return int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))

    def wait(self, job: dict[str, Any], wait_s: float) -> dict[str, Any]:
        """Wait for a job that may have been submitted anywhere (GET /jobs/{id}?wait)."""
        wait_s = min(wait_s, self.settings.max_wait)
        if wait_s <= 0 or job["status"] in TERMINAL:
            return job
        waiter = self.replies.expect(job["job_id"])
        current = self.jobs.events.watch(job["job_id"], self.replies.channel)
        if current is None or current["status"] in TERMINAL:
            self.replies.forget(waiter)
            return current or job
        return self.replies.wait(waiter, current, wait_s)


def services() -> Services:
    return current_app.extensions["aethercore"]
