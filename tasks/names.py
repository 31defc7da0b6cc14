"""Task names, queue names and Redis keys: defined here once, imported everywhere else."""

from __future__ import annotations

from tasks.states import INFERENCE, LOAD, UNLOAD

# Celery task names (readable in Flower).
INFER = "aethercore.infer"
LOAD_MODEL = "aethercore.load_model"
UNLOAD_MODEL = "aethercore.unload_model"

TASK_FOR_KIND = {INFERENCE: INFER, LOAD: LOAD_MODEL, UNLOAD: UNLOAD_MODEL}
KIND_OF_TASK = {task: kind for kind, task in TASK_FOR_KIND.items()}

CPU_QUEUE = "cpu"


def queue_for_device(device: str) -> str:
    """One Celery queue per device; the queue is named after the device (`cpu`, `cuda:0`)."""
    return device


PREFIX = "aethercore"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_events_key(job_id: str) -> str:
    """Redis Stream of a job's events (status changes, chunks, done): replayable by late readers."""
    return f"{PREFIX}:job:{job_id}:events"


RECENT_JOBS = f"{PREFIX}:jobs:recent"  # sorted set: job id -> created (epoch s), trimmed to RECENT_JOBS_MAX
RECENT_JOBS_MAX = 10_000

WORKERS_INDEX = f"{PREFIX}:workers"  # sorted set: worker name -> last heartbeat (epoch seconds)


def worker_key(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


def inflight_key(worker: str) -> str:
    """Hash of the jobs a worker holds (job id -> how to queue it again): what the reaper requeues when the
    worker dies, whatever the broker did with their messages."""
    return f"{PREFIX}:inflight:{worker}"


INFLIGHT_PREFIX = inflight_key("")


def active_jobs_key(worker: str) -> str:
    """JSON {at, jobs}: the jobs a worker's task threads were working on at `at` (its clock), written with each
    heartbeat (expires with it): the reaper reclaims a job of the in-flight hash that its live holder no longer
    works on (workers/reaper.py)."""
    return f"{PREFIX}:active:{worker}"


def queued_key(queue: str) -> str:
    """Sorted set of a device queue's jobs that have not started (job id -> when queued): what the reaper
    queues again when their message was lost (a worker killed between taking it and starting it)."""
    return f"{PREFIX}:queued:{queue}"


QUEUED_PREFIX = queued_key("")
INFLIGHT_HOLDERS = f"{PREFIX}:inflight-holders"  # set: workers that may have an in-flight hash

DESIRED_MODELS = f"{PREFIX}:models:desired"  # hash: model id -> JSON {device, generation, ...}
MODEL_ERRORS = f"{PREFIX}:models:errors"  # hash: model id -> JSON {message, worker, at}
GENERATION_COUNTER = f"{PREFIX}:models:generation"


def forced_unload_key(model_id: str) -> str:
    """Set (with a short TTL) by a forced unload, for the other replicas that reconcile to it: end the model's
    running jobs at once instead of draining them."""
    return f"{PREFIX}:models:forced-unload:{model_id}"


# hash: model id -> JSON {inputs, outputs}: the signature read from its artifact (model_store/signatures.py),
# published by every worker at start so the API (which has no model store) knows it without loading the model
SIGNATURES = f"{PREFIX}:models:signatures"


def control_channel(device: str) -> str:
    """Pub/sub channel that tells the workers of a device to reconcile their resident models now."""
    return f"{PREFIX}:control:{device}"


def reply_channel(owner: str) -> str:
    """Pub/sub channel of one API process: workers tell it which of its waiting jobs ended."""
    return f"{PREFIX}:reply:{owner}"


# Pub/sub channel on which every change of the desired model state is announced (API caches listen).
MODELS_CHANGED = f"{PREFIX}:models:changed"


AUTH_KEYS = f"{PREFIX}:auth:keys"  # hash: API key id -> JSON {digest, role, name, created_at}
METRICS_COUNTERS = f"{PREFIX}:metrics:counters"  # hash: every worker's job counters, added up
METRICS_HISTOGRAMS = f"{PREFIX}:metrics:histograms"  # hash: every worker's histogram buckets, added up


def auth_failures_key(kind: str, who: str) -> str:
    """Counter of failed authentications in the current window, per client address (`addr`) or per presented API
    key id (`key`), api/auth.py `FailedAuthLimit`."""
    return f"{PREFIX}:authfail:{kind}:{who}"


def rate_limit_key(caller: str, amount: int, window_s: int) -> str:
    """Counter of one caller's inference submissions in the current window of one limit."""
    return f"{PREFIX}:ratelimit:{caller}:{amount}/{window_s}"
