"""The one submission pass every way in takes (`Submitter.submit`): validate -> route -> admission -> create and
queue -> optional wait, each step once.

1. validate: the body against the model's declarations (validation.py), unless the protocol checked it in its own
   terms (`SubmitRequest.checked`); the caller's role for the job's kind;
2. route: the model's spec, its desired state (cached <= DESIRED_CACHE_S, cleared on `models:changed`), the device,
   and whether this caller may load it (decided once; carried in the job as `autoload`): 409 when it must be loaded
   first and may not be;
3. admission: the lane granted to the caller (403), the webhook (webhooks.py), Redis's memory and the lanes' depth
   (admission.py), a wait slot of this process (the reply listener's `admit`), and the caller's rate limit, counted
   in the step that creates the job;
4. create and queue: with the broker on the jobs' Redis, ONE Lua step shared with the process's concurrent
   submissions (dispatch.py) creates, counts and queues the job; with an Idempotency-Key the key is taken in the
   step that creates the job (a replay is that job, waited for like a new one); with a broker of its own, create
   then send. A job whose message could not be queued ends `broker_unavailable`;
5. wait: registered with the process's reply listener (replies.py) before the job can end.

May import: config/, tasks/, submission/. Never the HTTP layer.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from access.principal import Principal
from config.models import TEXT_TASKS, ModelSpec
from config.settings import Settings
from config.signatures import ARTIFACT, Signature, task_signature
from submission import caller
from submission.admission import Admission
from submission.dispatch import InferenceDispatcher
from submission.errors import (
    FORBIDDEN,
    IDEMPOTENCY_KEY_EXPIRED,
    NO_DEVICE,
    TOO_MANY_REQUESTS,
    Refused,
    key_reused,
    refuse_if,
)
from submission.ratelimit import InferenceRateLimit
from submission.replies import ReplyListener, Waiter
from submission.request import IdempotencyClaim, SubmitRequest
from submission.validation import body_errors, check_batch_size
from submission.webhooks import Webhooks, with_trace
from tasks import errors as job_errors
from tasks.cluster import ClusterState
from tasks.jobs import Jobs
from tasks.jobs.inflight import requeue_payload
from tasks.jobs.lifecycle import JobEnd
from tasks.jobs.records import IdempotencyConflict, RateLimited, new_job_id
from tasks.messages import trace_headers
from tasks.names import DEFAULT_LANE, INFER, LANES, TASK_FOR_KIND, queue_for_device
from tasks.routing import NoDeviceAvailable, resolve_device
from tasks.states import FAILED, INFERENCE, TERMINAL
from tasks.ttl_cache import TTLCache
from tracing import spans

# A model's desired state is cached this long at most; every change also clears it at once (pub/sub).
DESIRED_CACHE_S = 1.0
# The signatures the workers read from the artifacts, re-read at most this often.
SIGNATURES_CACHE_S = 5.0

Limits = list[tuple[str, int, int]]


class Submitter:
    def __init__(
        self,
        settings: Settings,
        models: dict[str, ModelSpec],
        jobs: Jobs,
        cluster: ClusterState,
        celery: Celery,
        dispatcher: InferenceDispatcher,
        replies: ReplyListener,
        webhooks: Webhooks,
        admission: Admission,
    ) -> None:
        self.settings, self.models, self.jobs, self.cluster = settings, models, jobs, cluster
        self.celery, self.dispatcher, self.replies = celery, dispatcher, replies
        self.webhooks, self.admission = webhooks, admission
        self.rate_limit = InferenceRateLimit(settings.rate_limit, settings.high_lane_rate_limit)
        self.desired_cache = TTLCache(DESIRED_CACHE_S)
        self.signatures_cache = TTLCache(SIGNATURES_CACHE_S)
        replies.on_models_changed = self.desired_cache.clear
        dispatcher.in_flight = replies.in_flight

    # -- what the model is and where it runs -------------------------------------------------------------------
    def spec(self, model_id: str) -> ModelSpec:
        spec = self.models.get(model_id)
        if spec is None:
            raise Refused(
                job_errors.MODEL_NOT_FOUND,
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

    def desired(self, model_id: str) -> dict[str, Any] | None:
        """The model's desired state (where it is meant to be resident), cached briefly."""
        return self.desired_cache.get(model_id, lambda: self.cluster.desired(model_id))

    def may_autoload(self, spec: ModelSpec, who: Principal | None) -> bool:
        """Whether a request of `who` may load `spec` by serving it (AETHERCORE_AUTOLOAD, and a caller who manages
        models or a model declared `autoload: true`): carried in each inference job as its `autoload` field (the
        worker loads a missing model only for a job that says true)."""
        return self.settings.autoload and caller.may_autoload(who, spec.autoload)

    def device_for(self, spec: ModelSpec, *desired: dict[str, Any] | None) -> str:
        """`desired` (optional): the model's desired-state entry, if the caller already read it."""
        try:
            return resolve_device(spec, self.cluster, self.settings.gpu_enabled, *desired)
        except NoDeviceAvailable as exc:
            raise Refused(NO_DEVICE, str(exc), retry_after_s=5) from None

    # -- the one pass --------------------------------------------------------------------------------------------
    def submit(self, request: SubmitRequest) -> dict[str, Any]:
        """The job `request` asks for, created and queued (with `wait_s`, as it stands at its end or then); or
        `Refused`, having created nothing. Traced as `aethercore.admission` (its lane, queue depth, rate limit left),
        the parent of everything the job does after (tracing/spans.py; nothing when tracing is off)."""
        span = spans.start(
            "aethercore.admission",
            request.traceparent,
            tracestate=request.tracestate,
            attributes={"aethercore.model_id": request.model_id, "aethercore.job.kind": request.kind},
        )
        try:
            return self._submit(request, span)
        except BaseException as exc:
            if span is not None and span.is_recording():  # refused or failed before the job was created
                spans.end(span, exc.code if isinstance(exc, Refused) else type(exc).__name__)
            raise

    def _submit(self, request: SubmitRequest, span: Any) -> dict[str, Any]:
        spec = self.spec(request.model_id)
        who = request.caller
        if who is not None and who.role not in caller.roles_for(request.kind):
            roles = caller.roles_for(request.kind)
            raise Refused(FORBIDDEN, f"role {who.role!r} may not do this (allowed: {', '.join(roles)})")
        if request.kind == INFERENCE:
            if not request.checked:
                self._validate(spec, request)
            desired = self.desired(spec.id)
            device = self.device_for(spec, desired)
            autoload = self.may_autoload(spec, who)
            if desired is None and not autoload:
                why = "autoload is off" if not self.settings.autoload else "only an admin or operator may load it"
                raise Refused(
                    job_errors.MODEL_NOT_LOADED,
                    f"model {spec.id!r} is not loaded and {why}; an admin or operator loads it with "
                    f"POST /models/{spec.id}/load",
                )
            lane = self._check_lane(request.lane, who)
        else:
            device, autoload, lane = self.device_for(spec), False, DEFAULT_LANE
        owner = who.id if who is not None else None
        webhook = self.webhooks.decide(owner, request.webhook, request.webhook_field, request.default_webhook)
        if request.kind == INFERENCE:
            depth = self.admission.check(device, lane)
            if span is not None:
                span.set_attribute("aethercore.queue.depth", depth)
        else:
            self.desired_cache.clear(spec.id)
        return self._create(request, spec, device, lane, autoload, webhook, span)

    def _validate(self, spec: ModelSpec, request: SubmitRequest) -> None:
        if request.batch:
            check_batch_size(len(request.inputs), self.settings.max_batch_inputs)
        signature = self.signature(spec) if spec.task not in TEXT_TASKS else None
        max_chars = self.settings.max_input_chars
        refuse_if(body_errors(spec, request.inputs, request.parameters, request.batch, max_chars, signature))

    def _check_lane(self, lane: str, who: Principal | None) -> str:
        """The priority lane this caller may submit to (its key's or token's grant, else its role's), or 403 naming
        the lane and how to be granted it."""
        allowed = caller.allowed_lanes(who, self.settings.priority_lanes)
        if lane not in allowed:  # never without a principal: allowed_lanes grants it every lane
            assert who is not None
            granted = ",".join(sorted(allowed, key=LANES.index))
            whose = "this key's grant" if who.lanes is not None else f"role {who.role!r}"
            raise Refused(
                FORBIDDEN,
                f"the {lane!r} priority lane is not granted to this caller ({whose} allows: {granted or 'none'}); an "
                f"admin grants it with `manage.py auth create-key --role <role> --lanes {','.join(LANES)}` (or for a "
                "whole role with AETHERCORE_PRIORITY_LANES)",
                {"lane": lane, "granted": granted},
            )
        return lane

    def _create(
        self,
        request: SubmitRequest,
        spec: ModelSpec,
        device: str,
        lane: str,
        autoload: bool,
        webhook: str | None,
        span: Any = None,
    ) -> dict[str, Any]:
        """The job's record and message, created and queued; then the wait, if asked for."""
        kind, who, claim = request.kind, request.caller, request.idempotency
        wait_s = min(request.wait_s, self.settings.max_wait)
        job_id, now = new_job_id(), time.time()
        # The job's trace context: below its admission span, else the one it came with (tracing off or unsampled)
        trace = spans.child_traceparent(span, request.traceparent)
        if trace is not None and webhook is not None:  # each delivery goes out with it (webhooks/dispatcher.py)
            webhook = with_trace(webhook, trace, request.tracestate)
        task, kwargs = self._message(request, spec, device, lane, autoload, job_id, now, trace)
        waiter = self.replies.expect(job_id) if wait_s > 0 else None
        record = {
            "kind": kind,
            "model_id": spec.id,
            "device": device,
            "request_id": request.request_id,
            "owner": who.id if who is not None else None,
            "job_id": job_id,
            "notify": self.replies.channel if waiter is not None else None,
            "ttl": request.result_ttl or None,
            "now": now,
            # kept with the job until it starts: the reaper queues it again if its message is lost
            "payload": requeue_payload(task, queue_for_device(device), kwargs),
            # on the record, not in the message: the submitter's role is what a dead letter needs to be submitted
            # again
            "extra": {
                "webhook": webhook,
                "replay_of": request.replay_of,
                "role": who.role if who is not None else None,
                "traceparent": trace,
                "tracestate": request.tracestate if trace is not None else None,
            },
            "idempotency": claim.as_lua() if claim is not None else None,
        }
        limits = self._caller_limits(request, lane) if kind == INFERENCE else []
        try:
            if kind == INFERENCE and claim is None and self.dispatcher.creates:
                # created and queued in one step, with whatever else this process submits meanwhile
                job = self._create_queued(request, spec, device, lane, kwargs["jobs"][0], record, limits)
            else:
                job = self._create_then_send(request, spec, device, lane, task, kwargs, record, limits)
        except IdempotencyConflict as conflict:
            self._forget(waiter)
            assert claim is not None
            return self._replayed(conflict, claim, wait_s)
        except BaseException:
            self._forget(waiter)
            raise
        if span is not None:
            self._admitted(span, request, job, lane, device)
        return job if waiter is None else self.replies.wait(waiter, job, wait_s)

    @staticmethod
    def _admitted(span: Any, request: SubmitRequest, job: dict[str, Any], lane: str, device: str) -> None:
        """The admission span ends once the job is queued (its wait, if any, is the request's, not admission's)."""
        span.set_attribute("aethercore.job.id", job["job_id"])
        span.set_attribute("aethercore.lane", lane)
        span.set_attribute("aethercore.device", device)
        remaining = (request.limit_headers or {}).get("X-RateLimit-Remaining")
        if remaining is not None:
            span.set_attribute("aethercore.rate_limit.remaining", int(remaining))
        spans.end(span)

    def _forget(self, waiter: Waiter | None) -> None:
        if waiter is not None:
            self.replies.forget(waiter)

    def _message(
        self,
        request: SubmitRequest,
        spec: ModelSpec,
        device: str,
        lane: str,
        autoload: bool,
        job_id: str,
        now: float,
        trace: str | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """The Celery task and arguments that carry the job to its worker (with its trace context, if any)."""
        if request.kind != INFERENCE:
            kwargs: dict[str, Any] = {
                "job_id": job_id,
                "model_id": spec.id,
                "request_id": request.request_id,
                "device": device,
            }
            if request.force:
                kwargs["force"] = True
            if trace is not None:
                kwargs["traceparent"] = trace
            return TASK_FOR_KIND[request.kind], kwargs
        work: dict[str, Any] = {
            "job_id": job_id,
            "submitted_at": now,
            "request_id": request.request_id,
            "inputs": request.inputs,
            "parameters": request.parameters,
        }
        if request.batch:
            work["batch"] = True
        if lane != DEFAULT_LANE:
            work["priority"] = lane  # the message's lane, and the worker's order within its batches
        if request.encoding_format and request.encoding_format != "float":
            work["encoding_format"] = request.encoding_format
        work["autoload"] = autoload
        if request.timeout_s:
            work["deadline"] = now + request.timeout_s
        if trace is not None:
            work["traceparent"] = trace
        return INFER, {"model_id": spec.id, "jobs": [work]}

    def _caller_limits(self, request: SubmitRequest, lane: str) -> Limits:
        """The counters an inference job of this caller in `lane` counts against (the Lua step that creates the job
        counts them): none without a rate limit, or for a caller not limited per caller (admins and operators); a
        `high` job also on the caller's high-lane counter."""
        if not self.rate_limit or not caller.limited_per_caller(request.caller):
            return []
        return self.rate_limit.counters(request.caller_key, lane)

    def _counted(self, request: SubmitRequest, used: list[int], limits: Limits) -> None:
        if limits and request.limit_headers is not None:
            request.limit_headers.update(self.rate_limit.headers(used, limits))

    def _create_queued(
        self,
        request: SubmitRequest,
        spec: ModelSpec,
        device: str,
        lane: str,
        work: dict[str, Any],
        record: dict[str, Any],
        limits: Limits,
    ) -> dict[str, Any]:
        """An inference job created, counted against the caller's rate limit and queued in one Lua step shared with
        the process's concurrent submissions (dispatch.py): one round trip for all of them."""
        entry = {key: value for key, value in record.items() if key != "idempotency"}
        entry["limits"] = limits
        try:
            created = self.dispatcher.publish(
                spec.id, device, work, coalesce=not request.batch, lane=lane, record=entry
            )
        except RateLimited as exc:
            raise self._too_many(exc, limits) from None
        assert created is not None
        job, used = created
        self._counted(request, used, limits)
        return job

    def _create_then_send(
        self,
        request: SubmitRequest,
        spec: ModelSpec,
        device: str,
        lane: str,
        task: str,
        kwargs: dict[str, Any],
        record: dict[str, Any],
        limits: Limits,
    ) -> dict[str, Any]:
        """The job created (with its rate limit's use and its Idempotency-Key, one round trip), then its message
        sent: a load or unload job, a job with a key, or a broker that is not the jobs' Redis."""
        if limits:
            try:
                job, used = self.jobs.records.create_limited(limits, **record)
            except RateLimited as exc:
                raise self._too_many(exc, limits) from None
            self._counted(request, used, limits)
        else:
            job = self.jobs.records.create(**record)
        job_id = record["job_id"]
        try:
            if request.kind == INFERENCE:
                work = kwargs["jobs"][0]
                self.dispatcher.publish(spec.id, device, work, coalesce=not request.batch, lane=lane)
            else:
                self.celery.send_task(
                    task,
                    kwargs=kwargs,
                    queue=queue_for_device(device),
                    task_id=job_id,
                    headers=trace_headers(kwargs.get("traceparent")),
                    kwargsrepr=repr({"job_id": job_id, "model_id": spec.id, "kind": request.kind}),
                )
        except Exception:
            self.jobs.lifecycle.end_jobs(
                [JobEnd(job_id, FAILED, job_errors.BROKER_UNAVAILABLE, "the job could not be queued")]
            )
            claim = request.idempotency
            if claim is not None:  # the job failed before it was queued: its key is free for the retry
                self.jobs.records.release_key(claim.record, job_id, claim.owner)
            raise
        return job

    def _too_many(self, exc: RateLimited, limits: Limits) -> Refused:
        _key, amount, window = limits[exc.index]
        # the caller's own counters come first, then the high lane's (ratelimit.py `counters`)
        high = exc.index >= len(self.rate_limit.items)
        what = "the high lane, AETHERCORE_HIGH_LANE_RATE_LIMIT" if high else "inference"
        return Refused(
            TOO_MANY_REQUESTS,
            f"rate limit exceeded ({amount} per {window} s for {what}); retry after the Retry-After header's seconds",
            retry_after_s=exc.retry_after_s,
        )

    def _replayed(self, conflict: IdempotencyConflict, claim: IdempotencyClaim, wait_s: float) -> dict[str, Any]:
        """The job an Idempotency-Key already created, as it stands (waited for like a new one)."""
        if conflict.reused:
            raise key_reused(conflict.job_id)
        job = self.jobs.records.get(conflict.job_id)
        if job is None:  # it expired between the Lua step and this read: as if never created
            raise Refused(IDEMPOTENCY_KEY_EXPIRED, "the job of this Idempotency-Key has just expired; retry")
        claim.mark_replayed()
        return self.wait(job, wait_s)

    # -- waiting for a job submitted anywhere --------------------------------------------------------------------
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
