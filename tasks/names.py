"""Task names, queue names and Redis keys: defined here once, imported everywhere else."""

from __future__ import annotations

from config.lanes import LANES
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


# Priority lanes. kombu's Redis transport keeps each priority of a queue in its own list and BRPOPs them in
# priority order (lower first) in one command, so a worker always takes the highest waiting lane's message
# first. `high` (and every control task: loads, unloads) is the queue's own list. The lanes are config/lanes.py's.
DEFAULT_LANE = "normal"
LANE_PRIORITY = dict(zip(LANES, (0, 3, 9)))  # kombu's default priority_steps are 0, 3, 6, 9
_PRIORITY_SEP = "\x06\x16"  # kombu's separator between a queue's name and a priority


def lane_list(queue: str, lane: str) -> str:
    """The Redis list that holds `queue`'s messages of `lane`."""
    priority = LANE_PRIORITY[lane]
    return queue if priority == 0 else f"{queue}{_PRIORITY_SEP}{priority}"


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
METRICS_EXEMPLARS = f"{PREFIX}:metrics:exemplars"  # hash: per histogram bucket, the last sampled trace id in it


def auth_failures_key(kind: str, who: str) -> str:
    """Counter of failed authentications in the current window, per client address (`addr`) or per presented API
    key id (`key`), api/auth.py `FailedAuthLimit`."""
    return f"{PREFIX}:authfail:{kind}:{who}"


def rate_limit_key(caller: str, amount: int, window_s: int) -> str:
    """Counter of one caller's inference submissions in the current window of one limit."""
    return f"{PREFIX}:ratelimit:{caller}:{amount}/{window_s}"


# -- the OpenAI Files and Batch APIs (batches/files.py, batches/store.py) ----------------------------------------------
def file_key(file_id: str) -> str:
    """Hash: a file's fields (the OpenAI File object's, plus owner, lines and in_use); expires with the file."""
    return f"{PREFIX}:file:{file_id}"


def file_lines_key(file_id: str) -> str:
    """Hash: line index -> that line of the file (with its newline). An uploaded file's lines; a batch's output or
    error file fills in the lines of the requests it answers as they end."""
    return f"{PREFIX}:file:{file_id}:lines"


def files_index_key(owner: str) -> str:
    """Sorted set: one owner's files (file id -> created), trimmed to the retention and expiring with it."""
    return f"{PREFIX}:files:owner:{owner}"


FILES_ALL = f"{PREFIX}:files:all"  # sorted set: every file (what admins and operators list), trimmed the same way


def batch_key(batch_id: str) -> str:
    """Hash: a batch's state (the OpenAI Batch object's fields, counts, the next line to submit, its owner)."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_jobs_key(batch_id: str) -> str:
    """Hash: the batch's lines taken but not yet answered: line index -> its job id, or `-` (not submitted yet)."""
    return f"{PREFIX}:batch:{batch_id}:jobs"


def batch_lease_key(batch_id: str) -> str:
    """The batch driver driving the batch now (SET NX with a short TTL, renewed while it drives)."""
    return f"{PREFIX}:batch:{batch_id}:lease"


def batches_index_key(owner: str) -> str:
    """Sorted set: one owner's batches (batch id -> created), trimmed to the retention and expiring with it."""
    return f"{PREFIX}:batches:owner:{owner}"


BATCHES_ALL = f"{PREFIX}:batches:all"  # sorted set: every batch (what admins and operators list)
# Set: the batches that have not ended, which the batch drivers advance. No TTL: a batch leaves it when it ends, and
# each ends within its completion window (bounded by construction).
BATCHES_ACTIVE = f"{PREFIX}:batches:active"
# List: wake notes for the batch drivers (`manage.py batches`), pushed by the API when a batch is created or cancelled
# and popped by an idle driver's BLPOP; trimmed to BATCHES_WAKE_MAX on each push (a note says only "look now").
BATCHES_WAKE = f"{PREFIX}:batches:wake"
BATCHES_WAKE_MAX = 16
BATCH_DRIVERS = f"{PREFIX}:batches:drivers"  # sorted set: batch driver name -> last heartbeat


def batches_active_key(owner: str) -> str:
    """Set: one owner's batches that have not ended (AETHERCORE_BATCH_MAX_ACTIVE counts them)."""
    return f"{PREFIX}:batches:active:{owner}"


# -- completion webhooks (webhooks/: deliveries.py, dispatcher.py) -----------------------------------------------
# A job that carries a webhook gets a delivery when it ends, written by the Lua step that ends it
# (tasks/jobs/lua/transition.lua).
WEBHOOK_DELIVERY_PREFIX = f"{PREFIX}:webhook:delivery:"  # + delivery id (`msg_<job id>`): hash, one delivery
DELIVERY_ID_PREFIX = "msg_"  # a delivery's id (its `webhook-id`): `msg_<job id>` or `msg_<batch id>`
# A delivery's hash is kept at most this long before it is delivered or fails (the retry window is at most 7 days).
KEEP_DELIVERY_S = 8 * 86400


def webhook_delivery_key(delivery_id: str) -> str:
    """Hash: one delivery (kind, ref, webhook JSON, queue, event; then body, attempts, first_at, last error...)."""
    return f"{WEBHOOK_DELIVERY_PREFIX}{delivery_id}"


WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"  # sorted set: delivery id -> when its next attempt is due (0: a first one)
WEBHOOKS_LEASED = f"{PREFIX}:webhooks:leased"  # sorted set: delivery id -> when a dispatcher's claim on it lapses
WEBHOOKS_FAILED = f"{PREFIX}:webhooks:failed"  # sorted set: delivery id -> when it failed for good (kept, listed)
WEBHOOK_SECRETS = f"{PREFIX}:webhook:secrets"  # hash: owner -> JSON {current, previous, previous_until, created_at}
WEBHOOK_ENDPOINTS = f"{PREFIX}:webhook:endpoints"  # hash: owner -> JSON {url, set_at}: a key's default endpoint
WEBHOOK_DISABLED = f"{PREFIX}:webhook:disabled"  # hash: "owner url" -> JSON {at, reason}: endpoints that answered 410
WEBHOOK_DISPATCHERS = f"{PREFIX}:webhook:dispatchers"  # sorted set: dispatcher name -> last heartbeat
METRICS_WEBHOOKS = f"{PREFIX}:metrics:webhooks"  # hash: the dispatchers' delivery counters and latency buckets
# What deliveries hold of the dispatchers, shared by every dispatcher (webhooks/deliveries.py): an endpoint is an
# owner's scheme://host:port ("<owner> <origin>"); each key expires on its own.
WEBHOOK_ENDPOINT_PREFIX = f"{PREFIX}:webhook:endpoint:"  # + endpoint: hash {failures, open_until, probe, probe_until}
WEBHOOK_ENDPOINT_LEASES_PREFIX = f"{PREFIX}:webhook:endpoint-leases:"  # + endpoint: zset delivery id -> lease end
WEBHOOK_OWNER_LEASES_PREFIX = f"{PREFIX}:webhook:owner-leases:"  # + owner: zset delivery id -> lease end


# -- idempotent creation (submission/idempotency.py) --------------------------------------------------------------
def idempotency_key(caller: str, key: str) -> str:
    """String: one caller's Idempotency-Key -> `<fingerprint> <job id>` (or a stored response); expires with the
    retention AETHERCORE_IDEMPOTENCY_TTL. The caller's key is hashed: its text is the client's to choose."""
    return f"{PREFIX}:idem:{caller}:{key}"


# -- dead letters (tasks/deadletters.py) ---------------------------------------------------------------------------
DEAD_LETTER_PREFIX = f"{PREFIX}:dead:"  # + queue: sorted set, job id -> when it became a dead letter
DEAD_ENTRY_PREFIX = f"{PREFIX}:dead-entry:"  # + job id: hash, the dead letter (reason, error, what replays it)
METRICS_DEAD_LETTERS = f"{PREFIX}:metrics:dead"  # hash: "queue|reason" -> dead letters recorded
DEAD_LETTER_QUEUES = f"{PREFIX}:dead-queues"  # set: the queues that have had dead letters (as many as devices)


def dead_letter_key(queue: str) -> str:
    """Sorted set of one queue's dead letters (job id -> when), bounded by count and retention."""
    return f"{DEAD_LETTER_PREFIX}{queue}"


def dead_entry_key(job_id: str) -> str:
    return f"{DEAD_ENTRY_PREFIX}{job_id}"


# -- what each caller makes the service keep (tasks/holdings.py) ----------------------------------------------------
HOLDINGS_PREFIX = f"{PREFIX}:holdings:"  # + owner: hash of its totals; + owner:kind a sorted set, + :size a hash
HOLDINGS_TOTAL = f"{PREFIX}:holdings-total"  # hash: every owner's totals added up (<kind>.bytes, <kind>.count, bytes)
HOLDINGS_OWNERS = f"{PREFIX}:holdings-owners"  # sorted set: owner -> when its account's furthest object expires
