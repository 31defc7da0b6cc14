"""What the API holds, built once per app: Redis, the job store, the cluster view, the Celery app, the one
`Submitter` every way in calls (submission/submitter.py), and what streams, waits and the jobs product read. A
container only: submitting a job is the submitter's, answering HTTP is the blueprints'."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from flask import current_app

from api.errors import refused_error
from api.limits import LongRequests
from config.models import ModelSpec
from config.settings import Settings
from config.signatures import Signature
from submission.admission import Admission
from submission.dispatch import InferenceDispatcher
from submission.errors import Refused
from submission.replies import ReplyListener
from submission.submitter import Submitter
from submission.webhooks import Webhooks
from submission.wiring import wire
from tasks.cluster import ClusterState
from tasks.deadletters import DeadLetters
from tasks.holdings import Holdings
from tasks.jobs import Jobs
from tasks.jobs.stream_hub import StreamHub
from webhooks.deliveries import Deliveries
from webhooks.owners import WebhookOwners


@dataclass
class Services:
    settings: Settings
    models: dict[str, ModelSpec]
    jobs: Jobs
    cluster: ClusterState
    celery: Celery
    dispatcher: InferenceDispatcher
    submitter: Submitter = field(init=False)
    admission: Admission = field(init=False)
    replies: ReplyListener = field(init=False)
    streams: StreamHub = field(init=False)
    long_requests: LongRequests = field(init=False)
    webhook_owners: WebhookOwners = field(init=False)
    webhooks: Webhooks = field(init=False)
    deliveries: Deliveries = field(init=False)
    dead_letters: DeadLetters = field(init=False)
    holdings: Holdings = field(init=False)

    def __post_init__(self) -> None:
        # Streams, WebSockets and waits hold a thread each: capped per caller and per process (api/limits.py).
        self.long_requests = LongRequests(
            self.settings.max_streams_per_caller, self.settings.api_threads - self.settings.reserved_threads
        )
        wired = wire(
            self.settings,
            self.models,
            self.jobs,
            self.cluster,
            self.celery,
            self.dispatcher,
            admit=self.long_requests.take,
        )
        self.submitter, self.admission, self.replies = wired.submitter, wired.admission, wired.replies
        self.webhook_owners, self.webhooks, self.deliveries = wired.webhook_owners, wired.webhooks, wired.deliveries
        self.dead_letters, self.holdings = wired.dead_letters, wired.holdings
        self.streams = StreamHub(self.jobs.redis)

    # -- reads for the blueprints and the jobs product, refusals as HTTP errors ---------------------------------
    def spec(self, model_id: str) -> ModelSpec:
        """The configured model, or 404 `model_not_found`."""
        try:
            return self.submitter.spec(model_id)
        except Refused as exc:
            raise refused_error(exc) from None

    def signature(self, spec: ModelSpec) -> Signature | None:
        return self.submitter.signature(spec)

    def desired(self, model_id: str) -> dict[str, Any] | None:
        return self.submitter.desired(model_id)

    def device_for(self, spec: ModelSpec, *desired: dict[str, Any] | None) -> str:
        """The model's device, or 503 `no_device`."""
        try:
            return self.submitter.device_for(spec, *desired)
        except Refused as exc:
            raise refused_error(exc) from None

    def queued_ahead(self, device: str, lane: str) -> int:
        return self.admission.queued_ahead(device, lane)

    def check_redis_memory(self) -> None:
        """503 `redis_full` before Redis refuses writes (files and batches, as for new jobs)."""
        try:
            self.admission.check_redis_memory()
        except Refused as exc:
            raise refused_error(exc) from None


def services() -> Services:
    return current_app.extensions["aethercore"]
