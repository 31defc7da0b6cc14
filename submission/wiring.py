"""What submitting a job needs, built once per process from the settings: the connections (Redis, the job store, the
cluster view, the Celery producer and its coalescing dispatcher: `connect`) and, over them, admission, the reply
listener, the webhook rules, the account of what callers hold and the one `Submitter` (`wire`). The API's app factory
(api/app.py, through api/services.py) and the batch driver process (batches/driver.py) both build it here, so a batch
line meets exactly the submission the same /v1 request meets, and the wiring has one owner.

May import: config/, tasks/, access/, webhooks/, submission/."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from config.models import ModelSpec
from config.settings import Settings
from submission.admission import Admission
from submission.dispatch import InferenceDispatcher
from submission.replies import ReplyListener
from submission.submitter import Submitter
from submission.webhooks import Webhooks
from tasks.celery_app import make_celery
from tasks.cluster import ClusterState
from tasks.deadletters import DeadLetters
from tasks.holdings import DEAD_LETTERS, Holdings, quotas_from
from tasks.jobs import Jobs
from tasks.redis_client import make_redis
from webhooks.deliveries import Deliveries
from webhooks.outbound import OutboundPolicy
from webhooks.owners import WebhookOwners


@dataclass(frozen=True)
class Connections:
    redis: redis.Redis
    jobs: Jobs
    cluster: ClusterState
    celery: Celery
    dispatcher: InferenceDispatcher


def connect(settings: Settings) -> Connections:
    """This process's connections: one Redis client (Sentinel-aware), the job store and cluster view over it, the
    Celery producer, and the dispatcher that coalesces concurrent submissions (in one Lua step with the job's
    creation when the broker is the jobs' Redis)."""
    client = make_redis(settings.redis_url, settings.redis_sentinel_master, **settings.redis_options())
    celery = make_celery(settings)
    jobs = Jobs(client, settings.result_ttl, settings.dead_letter_ttl, settings.dead_letter_max, quotas_from(settings))
    same_redis = settings.effective_broker_url == settings.redis_url
    dispatcher = InferenceDispatcher(
        celery, linger_ms=settings.dispatch_linger_ms, jobs=jobs.records if same_redis else None
    )
    return Connections(client, jobs, ClusterState(client, settings.worker_ttl), celery, dispatcher)


@dataclass(frozen=True)
class Wiring:
    admission: Admission
    replies: ReplyListener
    webhook_owners: WebhookOwners
    deliveries: Deliveries
    dead_letters: DeadLetters
    holdings: Holdings
    webhooks: Webhooks
    submitter: Submitter


def wire(
    settings: Settings,
    models: dict[str, ModelSpec],
    jobs: Jobs,
    cluster: ClusterState,
    celery: Celery,
    dispatcher: InferenceDispatcher,
    admit: Callable[[], Any] | None = None,
) -> Wiring:
    """The submission over these connections. `admit`: takes a waiting request's slot in this process (the API's
    long-request caps, api/limits.py), None where nothing waits on a thread (the batch driver)."""
    client = jobs.redis
    replies = ReplyListener(client, jobs.records, admit=admit)
    admission = Admission(settings, cluster.redis)
    webhook_owners = WebhookOwners(client)
    dead_letters = DeadLetters(
        client, settings.dead_letter_ttl, settings.dead_letter_max, jobs.quotas.get(DEAD_LETTERS)
    )
    # What callers make the service keep, charged to them (tasks/holdings.py); all of it within its share of Redis's
    # maxmemory, read with the memory check's cached value.
    holdings = Holdings(client, jobs.quotas, admission.holdings_limit)
    outbound = OutboundPolicy.from_entries(settings.webhook_allow)
    webhooks = Webhooks(webhook_owners, outbound, holdings, settings.webhook_max_pending)
    submitter = Submitter(settings, models, jobs, cluster, celery, dispatcher, replies, webhooks, admission)
    return Wiring(admission, replies, webhook_owners, Deliveries(client), dead_letters, holdings, webhooks, submitter)
