"""Every AetherCore setting: one env var each, a default that works on a laptop, validated at start-up.

Each setting is declared once, as a field of `Settings` (`setting(default, parser, doc)`; its env var is
AETHERCORE_<NAME>). `SETTINGS` is derived from those fields; README's configuration table and `.env.example`
are generated from it (scripts/sync-config-docs.sh) and checked against it by the test suite.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from config.units import parse_bool, parse_size
from config.values import (
    ConfigError,
    PlaceholderSecret,
    _api_keys,
    _basic_auth,
    _bounded_float,
    _bounded_int,
    _bounded_size,
    _broker_url,
    _choice,
    _file_size,
    _json_depth,
    _jwt_secret,
    _lanes_by_role,
    _log_level,
    _non_negative_float,
    _non_negative_int,
    _optional_file,
    _optional_index,
    _path,
    _paths,
    _port,
    _positive_int,
    _rate_limit,
    _redis_url,
    _webhook_allow,
    parse_worker_device,
    without_password,
)


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: str
    parse: Callable[[str], Any]
    doc: str


def setting(default: str, parse: Callable[[str], Any], doc: str) -> Any:
    """One setting, declared once: its field here; its env var is AETHERCORE_<NAME>, `default` is what an unset
    variable means, `parse` validates the text, `doc` is its line in README and .env.example."""
    return field(metadata={"default": default, "parse": parse, "doc": doc})


@dataclass(frozen=True)
class Settings:
    host: str = setting("0.0.0.0", str, "Address the API binds to.")
    port: int = setting("8001", _port, "Port the API listens on.")
    tls_cert: Path | None = setting(
        "",
        _optional_file,
        "Certificate chain (PEM) the API serves HTTPS with, with AETHERCORE_TLS_KEY; empty: plain HTTP.",
    )
    tls_key: Path | None = setting("", _optional_file, "Private key (PEM) of AETHERCORE_TLS_CERT.")
    workers: int = setting("1", _positive_int, "gunicorn worker processes for the API.")
    api_threads: int = setting(
        "256", _positive_int, "Threads per API process: each request, open long poll (?wait) or open stream holds one."
    )
    api_worker: str = setting(
        "gevent",
        _choice("gevent", "gthread"),
        "How an API process serves its requests: `gevent`, each request a greenlet of one OS thread (no hand-off "
        "between threads per request: 1.3x the requests/s of `gthread` at GPU speed), or `gthread`, each request "
        "a thread of a pool. Either way AETHERCORE_API_THREADS bounds the requests a process holds at once.",
    )
    reserved_threads: int = setting(
        "8",
        _positive_int,
        "Threads of each API process that streams, WebSockets and waits may never take, kept for short requests "
        "and health probes: beyond AETHERCORE_API_THREADS minus these, a long-held request gets 503 "
        "`server_busy`. Less than AETHERCORE_API_THREADS.",
    )
    max_streams_per_caller: int = setting(
        "32",
        _positive_int,
        "Open SSE streams, WebSockets and waits (`?wait`, OIP infer, OpenAI /v1) one caller (API key, JWT "
        "subject, or address) may hold at once in each API process; 429 `too_many_streams` beyond. Authenticated "
        "admins and operators are not capped per caller (only by the process's total).",
    )
    log_level: str = setting("INFO", _log_level, "Log level of every process.")
    log_format: str = setting(
        "text", _choice("text", "json"), "`text` for people, `json` for one JSON object per line."
    )
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        _redis_url,
        "Redis for jobs, results, cluster state and (by default) the Celery broker.",
    )
    redis_sentinel_master: str = setting(
        "mymaster",
        str,
        "Master name when AETHERCORE_REDIS_URL is `sentinel://host:26379[;sentinel://host2:26379][/db]`.",
    )
    redis_ca: Path | None = setting(
        "",
        _optional_file,
        "CA certificate (PEM) a `rediss://` Redis must present a certificate from (jobs, broker, limiter, "
        "Flower); empty: the system's trusted CAs.",
    )
    redis_cert: Path | None = setting(
        "", _optional_file, "Client certificate (PEM) for mutual TLS with Redis, with AETHERCORE_REDIS_KEY."
    )
    redis_key: Path | None = setting("", _optional_file, "Private key of AETHERCORE_REDIS_CERT.")
    redis_sentinel_tls: bool = setting(
        "false",
        parse_bool,
        "With a `sentinel://` AETHERCORE_REDIS_URL: speak TLS to the sentinels and to the data nodes they name, with "
        "AETHERCORE_REDIS_CA / _CERT / _KEY (as a `rediss://` URL does).",
    )
    redis_sentinel_password: str = setting(
        "",
        str,
        "The sentinels' own password (`requirepass` in sentinel.conf), when AETHERCORE_REDIS_URL is `sentinel://`; "
        "the data nodes' password is the URL's (`sentinel://:password@host:26379`).",
    )
    redis_min_replicas_ack: int = setting(
        "0",
        _non_negative_int,
        "Replicas that must confirm (Redis WAIT) every write a client's 2xx depends on (job creation with its "
        "queue message, idempotency claims, files, batches, a job's end with its webhook delivery) before it is "
        "answered; 503 `not_replicated` when fewer do in AETHERCORE_REDIS_REPLICA_ACK_TIMEOUT_MS. 0: answer "
        "once the primary has it (a failover may lose the last writes). docs/OPERATIONS.md, Redis failover.",
    )
    redis_replica_ack_timeout_ms: int = setting(
        "1000", _positive_int, "How long a write waits for AETHERCORE_REDIS_MIN_REPLICAS_ACK replicas."
    )
    broker_url: str = setting("", _broker_url, "Celery broker; empty means the same as AETHERCORE_REDIS_URL.")
    gpu_enabled: str = setting(
        "auto",
        _choice("auto", "true", "false"),
        "`auto` uses GPU workers when some are alive; `false` routes `device: auto` models to the CPU.",
    )
    model_cache_size: int = setting(
        "1GB",
        parse_size,
        "Memory budget for resident models per worker, each model counted by what its model process holds "
        "for it (weights, tokenizer, activations; not the shared libraries); the least recently used model is "
        "evicted beyond it.",
    )
    autoload: bool = setting(
        "true",
        parse_bool,
        "Serving a model that is not loaded loads it first, when the caller may manage models (admin, operator) "
        "or the model is declared `autoload: true`; otherwise, and always when `false`, 409.",
    )
    models_file: Path = setting("config/models.yaml", _path, "The model declarations.")
    model_store: Path = setting(
        "model_store/artifacts",
        _path,
        "Directory that `source: local` model paths are relative to (relative paths: to the repository).",
    )
    model_roots: tuple[Path, ...] = setting(
        "",
        _paths,
        "More directories (separated by `:`) that `source: local` model paths may point into, besides the "
        "model store; a path anywhere else is refused.",
    )
    hf_download: bool = setting(
        "false", parse_bool, "Allow `source: huggingface` models missing from the local cache to be downloaded."
    )
    result_ttl: int = setting(
        "3600", _positive_int, "Seconds a finished job and its result are kept in Redis (per request: `result_ttl`)."
    )
    max_wait: float = setting("60", _non_negative_float, "Upper bound in seconds for `?wait=` on job endpoints.")
    max_batch_inputs: int = setting(
        "256", _positive_int, "Most inputs one POST /serve/batch request may carry (413 beyond)."
    )
    load_timeout: float = setting(
        "300", _non_negative_float, "Seconds a load job waits for every replica of its device to report."
    )
    unload_drain: float = setting(
        "30",
        _non_negative_float,
        "Seconds an unloaded model's running jobs may still take to end (it takes no new ones meanwhile); "
        "those still running then fail `model_unloaded`. `POST /models/{id}/unload?force=true` skips the wait.",
    )
    device: str = setting(
        "cpu",
        parse_worker_device,
        "Device a worker is pinned to (`cpu`, `cuda:N`); `manage.py worker --device` sets it.",
    )
    gpu_index: int | None = setting(
        "",
        _optional_index,
        "Physical GPU a `cuda:N` worker uses (CUDA_VISIBLE_DEVICES); empty: N. In a container that sees "
        "only its reserved GPU, set 0.",
    )
    worker_concurrency: int = setting(
        "64",
        _positive_int,
        "Task threads per worker process, and so the jobs it takes from its queue at once; raised to the "
        "largest max_batch_size x instances of the configured models, so a batch can fill (models are shared "
        "by the threads, one copy each).",
    )
    torch_threads: int = setting(
        "0",
        int,
        "Intra-op threads of each model process's forward passes; 0 means the CPU cores shared out among "
        "the model's instances.",
    )
    heartbeat_interval: float = setting("2", _non_negative_float, "Seconds between worker heartbeats.")
    worker_ttl: int = setting(
        "10",
        _positive_int,
        "Seconds without a heartbeat after which a worker counts as dead and its running jobs are queued again.",
    )
    flower_host: str = setting(
        "127.0.0.1",
        str,
        "Address Flower binds to; `0.0.0.0` (in a container, behind its login) makes it reachable from other hosts.",
    )
    flower_port: int = setting("5555", _port, "Port of the Flower dashboard.")
    flower_max_tasks: int = setting(
        "10000",
        _positive_int,
        "Tasks Flower keeps in memory (~8 KB each; its own default of 100,000 held 840 MB in the soak).",
    )
    task_events: str = setting(
        "control",
        _choice("control", "all"),
        "Which tasks Flower sees: `control` (model loads and unloads, and every worker's heartbeat) or `all` "
        "(every inference message too: one Redis publish per message per event, ~25 % of a worker's CPU at GPU "
        "speed, and Flower's own CPU; jobs are always in /jobs and /metrics).",
    )
    flower_basic_auth: str = setting(
        "",
        _basic_auth,
        "`user:password[,user2:password2]`: Flower's login; empty: with AETHERCORE_AUTH on, `manage.py flower` "
        "makes one (var/flower.auth), off: no login.",
    )
    url: str = setting("http://127.0.0.1:8001", str, "Where `manage.py` finds the API.")
    auth: bool = setting(
        "true",
        parse_bool,
        "Require an API key or JWT on every endpoint but /heartbeat, /health*, /docs and /openapi.json.",
    )
    api_keys: dict = setting(
        "", _api_keys, "Static API keys, `key:role` pairs separated by commas (roles: admin, operator, user, viewer)."
    )
    jwt_secret: str = setting(
        "", _jwt_secret, "HS256 secret for JWTs (`sub`, `role`, `exp` checked); empty: JWTs are not accepted."
    )
    auth_failure_limit: int = setting(
        "100",
        _non_negative_int,
        "Failed authentications (an unknown key or a bad token) one client address, or one API key id, may make "
        "within AETHERCORE_AUTH_FAILURE_WINDOW; beyond it, credentialed requests from there get 429 with "
        "Retry-After until the window ends. 0: no limit.",
    )
    proxy_hops: int = setting(
        "0",
        _non_negative_int,
        "Reverse proxies in front of the API (an ingress, a load balancer) whose X-Forwarded-For is trusted: the "
        "client address that rate limits and AETHERCORE_AUTH_FAILURE_LIMIT count is read from it. 0: the TCP peer.",
    )
    auth_failure_window: int = setting(
        "300", _positive_int, "Seconds of the window AETHERCORE_AUTH_FAILURE_LIMIT counts in."
    )
    metrics_auth: bool = setting(
        "false",
        parse_bool,
        "Require credentials (any role) for /metrics. Either way an anonymous scrape (or a user key) gets only the "
        "API's request metrics, and admin, operator and viewer keys the cluster's (models, queues, holdings).",
    )
    rate_limit: str = setting(
        "60000/minute",
        _rate_limit,
        "Requests per caller (API key, JWT subject, or address) in flask-limiter syntax; empty: no limit.",
    )
    admin_key_file: Path = setting(
        "var/admin.key", _path, "Where `manage.py up` keeps the admin key it creates on first run (mode 600)."
    )
    max_request_bytes: int = setting("10MB", parse_size, "Largest request body; larger ones are refused with 413.")
    max_input_chars: int = setting("20000", _positive_int, "Longest `inputs.text` accepted (422 beyond).")
    max_json_depth: int = setting(
        "32",
        _json_depth,
        "Deepest nesting of lists and objects a JSON body (or WebSocket message, or OIP header) may have; "
        "deeper ones are refused with 400. From 16 (a batch body around a rank-8 tensor) to 200 (under the JSON "
        "encoder's own 254).",
    )
    priority_lanes: dict[str, frozenset[str]] = setting(
        "",
        _lanes_by_role,
        "Which priority lanes (`high`, `normal`, `low`) a role may submit to, as `role:lane+lane,...` (e.g. "
        "`user:high+normal+low`); a role not listed keeps its default: admin and operator every lane, user and "
        "viewer `normal` and `low`. A key created with `manage.py auth create-key --lanes` (or a JWT with a `lanes` "
        "claim) uses its own grant instead. A request for another lane gets 403.",
    )
    lane_aging_s: float = setting(
        "30",
        _non_negative_float,
        "A waiting job rises one priority lane (`low` to `normal`, then `high`) per this many seconds, or per a "
        "quarter of its window (deadline - submission) when that is longer: no lane starves under a stream of "
        "higher-priority work, and a line of a 24 h batch is not urgent after 30 s; 0: never.",
    )
    stream_interval: int = setting(
        "1",
        _bounded_int(1, 256),
        "Generated tokens per streamed chunk after the first (which is sent at once): 1 streams every token; "
        "4-8 cut the stack's cost per token by as much at GPU speed, where one decoding step takes a few ms "
        "(docs/CAPACITY.md). Chunks cover fixed token counts, so a retried generation skips what an earlier "
        "try already streamed; the last chunk holds what is left.",
    )
    trace_caller_sampling: bool = setting(
        "true",
        parse_bool,
        "With tracing on (OTEL_EXPORTER_OTLP_ENDPOINT), the API follows a caller's traceparent `sampled` flag (W3C's "
        "parent-based sampling). `false`: a caller's trace is still continued, but kept only at the sampler's own "
        "ratio like any other, so a caller cannot make the service trace every request it sends (a public API).",
    )
    dispatch_linger_ms: float = setting(
        "1",
        _non_negative_float,
        "Under load (several requests of an API process waiting), how long a submission waits for others to "
        "leave in the same Celery message; 0: never. At low load a submission never waits.",
    )
    max_queue_depth: int = setting(
        "10000",
        _positive_int,
        "Messages a device queue's interactive lanes (`high` and `normal`) may hold; new interactive submissions "
        "beyond it get 429 with Retry-After. The `low` lane (batch lines) is bounded apart.",
    )
    low_lane_queue_depth: int = setting(
        "10000",
        _positive_int,
        "Messages a device queue's `low` lane may hold; `low` submissions beyond it get 429 with Retry-After (they "
        "never count against AETHERCORE_MAX_QUEUE_DEPTH).",
    )
    high_lane_rate_limit: str = setting(
        "6000/minute",
        _rate_limit,
        "Inference submissions to the `high` lane per caller (flask-limiter syntax), counted on a counter of their "
        "own besides AETHERCORE_RATE_LIMIT (admins and operators are not limited); empty: no limit of its own.",
    )
    visibility_timeout: int = setting(
        "300",
        _positive_int,
        "Seconds before the broker redelivers an unacknowledged message (a second line: the reaper queues a "
        "dead worker's jobs again after AETHERCORE_WORKER_TTL); longer than the longest job.",
    )
    max_attempts: int = setting(
        "3",
        _positive_int,
        "Crashes charged to a job (it was alone in a forward pass when its model process or worker died) before "
        "it fails as `poison_job`.",
    )

    files_max_bytes: int = setting(
        "50MB",
        _file_size,
        "Largest file `POST /v1/files` takes (413 beyond). Files live in Redis (docs/PROTOCOLS.md, Files API): "
        "size Redis's maxmemory for them.",
    )
    files_quota: int = setting(
        "200MB",
        _file_size,
        "Bytes of uploaded files one owner (API key, JWT subject) may keep at once; an upload beyond gets 413 "
        "`quota_exceeded` until files are deleted or expire. At least AETHERCORE_FILES_MAX_BYTES.",
    )
    files_max_count: int = setting(
        "1000",
        _positive_int,
        "Uploaded files one owner may keep at once; an upload beyond gets 429 `quota_exceeded` until files are "
        "deleted or expire.",
    )
    outputs_quota: int = setting(
        "200MB",
        _file_size,
        "Bytes of batch output and error files one owner may keep at once (every batch of theirs together). A "
        "line whose answer does not fit is answered in the error file with `output_limit_reached` instead.",
    )
    batch_output_max_bytes: int = setting(
        "100MB",
        _file_size,
        "Bytes of one batch's output and error files together; a line whose answer does not fit is answered in "
        "the error file with `output_limit_reached` instead (a short entry).",
    )
    batches_max_kept: int = setting(
        "1000",
        _positive_int,
        "Batches one owner may keep at once, ended ones included until they expire (AETHERCORE_FILES_TTL); "
        "`POST /v1/batches` gets 429 `quota_exceeded` beyond.",
    )
    holdings_max_share: float = setting(
        "0.5",
        _bounded_float(0.05, 0.9),
        "Share of Redis's maxmemory that everything callers make the service keep (files, batch outputs and "
        "records, dead letters, webhook deliveries, Idempotency-Key records) may take together; beyond it, new "
        "uploads and batches get 503 `storage_full` and jobs keep their room. No limit when Redis has no maxmemory.",
    )
    files_ttl: int = setting(
        "604800",
        _positive_int,
        "Seconds a file (uploaded, or a batch's output or error file) and a batch are kept after their creation "
        "(a batch: after it ends); a file a batch reads is kept at least until the batch's window ends.",
    )
    batch_max_lines: int = setting(
        "50000", _positive_int, "Most requests one batch input file may hold (the batch fails validation beyond)."
    )
    batch_max_in_flight: int = setting(
        "256",
        _positive_int,
        "Lines of one batch submitted as jobs and not yet ended at any moment: the rest wait in Redis, so a batch "
        "of thousands never fills the device queue or the owner's rate limit at once.",
    )
    batch_queue_watermark: int = setting(
        "0",
        _non_negative_int,
        "Batch lines submitted and not ended on one device at most, shared evenly between the batches running there; "
        "lines are also held while the device's `low` lane holds this many messages. 0: 4 x the model's "
        "max_batch_size (a pass running, the next one ready, and room for the driver's round trips).",
    )
    batch_max_active: int = setting(
        "16", _positive_int, "Batches one owner may have unfinished at once; `POST /v1/batches` gets 429 beyond."
    )
    batch_driver_nice: int = setting(
        "10",
        _bounded_int(0, 19),
        "How much the batch driver process (`manage.py batches`) lowers its own CPU priority at start (os.nice; 0: "
        "unchanged), so that its bursts of work yield the CPU to the API and the workers on a shared host.",
    )

    webhook_allow: tuple = setting(
        "",
        _webhook_allow,
        "Webhook destinations allowed beyond public https: host names (http allowed to them), IP addresses and "
        "networks (`127.0.0.1,10.0.0.0/8`: private, loopback and link-local addresses in them may be reached, and "
        "http to them written as addresses), separated by commas. Empty: https to public addresses only.",
    )
    webhook_timeout: float = setting(
        "10", _bounded_float(0.5, 120), "Seconds one webhook delivery attempt may take (connect, send, answer)."
    )
    webhook_max_bytes: int = setting(
        "1MB",
        _bounded_size(1024, 16 * 2**20),
        "Largest webhook body; a job whose public JSON is larger is sent without its `result` (`result_omitted`: "
        "read it with GET /jobs/{id}).",
    )
    webhook_retry_base: float = setting(
        "5",
        _bounded_float(0.05, 3600),
        "Seconds before a failed webhook delivery's first retry; each retry waits twice the one before (with "
        "jitter: half to all of it), at most AETHERCORE_WEBHOOK_RETRY_MAX_DELAY.",
    )
    webhook_retry_max_delay: float = setting(
        "3600", _bounded_float(0.05, 86400), "Longest wait between two retries of one webhook delivery (seconds)."
    )
    webhook_retry_window: float = setting(
        "86400",
        _bounded_float(0.1, 7 * 86400),
        "Seconds from a delivery's first attempt (or the first time it was held back by a busy or failing "
        "endpoint) during which it is retried (at most 7 days); after it, the "
        "delivery has failed for good: kept and listed (`manage.py webhooks failed`), and its job is a dead letter.",
    )
    webhook_concurrency: int = setting(
        "16", _bounded_int(1, 512), "Webhook deliveries one dispatcher process sends at once (threads)."
    )
    webhook_endpoint_concurrency: int = setting(
        "4",
        _bounded_int(1, 512),
        "Attempts to one webhook endpoint (an owner's scheme, host and port) in flight at once, every dispatcher "
        "together; its other due deliveries wait without holding a thread.",
    )
    webhook_owner_share: float = setting(
        "0.5",
        _bounded_float(0.01, 1.0),
        "Share of AETHERCORE_WEBHOOK_CONCURRENCY one owner's deliveries may hold at once (every dispatcher "
        "together; at least one), so one caller's slow receivers cannot take every thread.",
    )
    webhook_breaker_failures: int = setting(
        "5",
        _bounded_int(1, 1000),
        "Consecutive failed attempts (timeouts, connection errors, 429 and 5xx answers) that open a webhook "
        "endpoint's circuit: its deliveries wait, without an attempt, for AETHERCORE_WEBHOOK_BREAKER_COOLDOWN; then "
        "one probe decides whether it closes.",
    )
    webhook_breaker_cooldown: float = setting(
        "30",
        _bounded_float(0.1, 3600),
        "Seconds a webhook endpoint's circuit stays open after AETHERCORE_WEBHOOK_BREAKER_FAILURES consecutive "
        "failures before one probe is sent.",
    )
    webhook_secret_overlap: int = setting(
        "86400",
        _non_negative_int,
        "Seconds a rotated webhook secret keeps signing beside the new one (`manage.py auth webhook-secret "
        "--rotate`): deliveries carry both signatures, so receivers switch secrets without missing one.",
    )
    webhook_failed_ttl: int = setting(
        "604800", _positive_int, "Seconds a webhook delivery that failed for good is kept (listed and retryable)."
    )
    idempotency_ttl: int = setting(
        "86400",
        _bounded_int(1, 7 * 86400),
        "Seconds an Idempotency-Key is remembered (per caller): a request repeated with it returns what the first "
        "one created. A key whose job's record expired (AETHERCORE_RESULT_TTL) is free again.",
    )
    dead_letter_ttl: int = setting(
        "604800",
        _bounded_int(60, 90 * 86400),
        "Seconds a dead letter (a job ended `poison_job`, expired in its queue, or whose webhook failed for good) "
        "is kept for `manage.py jobs dead` and `replay`.",
    )
    dead_letter_max: int = setting(
        "10000", _bounded_int(10, 1_000_000), "Dead letters kept per queue (the oldest leave first)."
    )
    dead_letter_owner_max: int = setting(
        "1000",
        _bounded_int(1, 1_000_000),
        "Dead letters kept per owner (the job's caller): a new one beyond makes the owner's oldest leave.",
    )
    dead_letter_owner_quota: int = setting(
        "50MB",
        _file_size,
        "Bytes of dead letters (with the request each keeps to be replayed) kept per owner: a new one beyond "
        "makes the owner's oldest leave.",
    )
    webhook_max_pending: int = setting(
        "10000",
        _positive_int,
        "Webhook deliveries of one owner kept at once (pending, retrying, or failed and kept); a request with a "
        "webhook beyond gets 429 `too_many_webhooks` until deliveries end.",
    )
    idempotency_max_keys: int = setting(
        "100000",
        _positive_int,
        "Idempotency-Key records one caller may hold at once (each lasts AETHERCORE_IDEMPOTENCY_TTL); a request "
        "with a new key beyond gets 429 `quota_exceeded`.",
    )

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def redis_ssl(self, url: str | None = None) -> dict[str, str]:
        """redis-py's TLS options for a `rediss://` URL (the jobs' Redis by default), or a `sentinel://` one with
        AETHERCORE_REDIS_SENTINEL_TLS; {} for plain redis://."""
        url = url or self.redis_url
        if not (url.startswith("rediss://") or (url.startswith("sentinel://") and self.redis_sentinel_tls)):
            return {}
        options = {"ssl_cert_reqs": "required"}
        for option, path in (
            ("ssl_ca_certs", self.redis_ca),
            ("ssl_certfile", self.redis_cert),
            ("ssl_keyfile", self.redis_key),
        ):
            if path is not None:
                options[option] = str(path)
        return options

    def redis_options(self) -> dict[str, Any]:
        """make_redis's options for the jobs' Redis: TLS, the sentinels' password, replicated acknowledgement."""
        options: dict[str, Any] = dict(self.redis_ssl())
        if self.redis_sentinel_password:
            options["sentinel_password"] = self.redis_sentinel_password
        if self.redis_min_replicas_ack:
            options["min_replicas_ack"] = self.redis_min_replicas_ack
            options["replica_ack_timeout_ms"] = self.redis_replica_ack_timeout_ms
        return options

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        source: Mapping[str, str] = os.environ if env is None else env
        values: dict[str, Any] = {}
        for spec in SETTINGS:
            if spec.name in overrides:
                values[spec.name] = overrides.pop(spec.name)
                continue
            raw = source.get(spec.env, spec.default)
            if spec.name in {"broker_url", "flower_basic_auth", "jwt_secret", "rate_limit"} and raw == "":
                values[spec.name] = ""
                continue
            if spec.name == "gpu_index" and raw == "":
                values[spec.name] = None
                continue
            try:
                values[spec.name] = spec.parse(raw)
            except (TypeError, ValueError) as exc:
                refused = "is refused" if isinstance(exc, PlaceholderSecret) else "is invalid"
                if spec.name in SECRET_SETTINGS:  # never echo a secret, not even a bad one
                    raise ConfigError(f"{spec.env} {refused} (value not shown): {exc}") from None
                shown = without_password(raw) if spec.name in SECRET_URL_SETTINGS else raw
                raise ConfigError(f"{spec.env}={shown!r} {refused}: {exc}") from None
        if overrides:
            raise TypeError(f"unknown settings: {', '.join(sorted(overrides))}")
        for cert, key in (("tls_cert", "tls_key"), ("redis_cert", "redis_key")):
            if (values.get(cert) is None) != (values.get(key) is None):
                raise ConfigError(f"{_ENV[cert]} and {_ENV[key]} go together: set both or neither")
        if values["reserved_threads"] >= values["api_threads"]:
            raise ConfigError(
                f"AETHERCORE_RESERVED_THREADS={values['reserved_threads']} must be less than "
                f"AETHERCORE_API_THREADS={values['api_threads']}: the threads left are the streams, WebSockets "
                "and waits an API process admits"
            )
        if values["files_quota"] < values["files_max_bytes"]:
            raise ConfigError(
                f"AETHERCORE_FILES_QUOTA={values['files_quota']} must be at least "
                f"AETHERCORE_FILES_MAX_BYTES={values['files_max_bytes']}: a file of the largest size would not fit"
            )
        if values["webhook_retry_max_delay"] < values["webhook_retry_base"]:
            raise ConfigError(
                f"AETHERCORE_WEBHOOK_RETRY_MAX_DELAY={values['webhook_retry_max_delay']:g} must be at least "
                f"AETHERCORE_WEBHOOK_RETRY_BASE={values['webhook_retry_base']:g}"
            )
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        current.update(overrides)
        return Settings(**current)

    def for_model_process(self) -> Settings:
        """These settings as a model process gets them (pickled over its pipe): without a secret. A model process
        runs a model's code and needs paths and devices, never credentials (it reaches neither Redis nor the API)."""
        return self.with_overrides(
            api_keys={},
            jwt_secret="",
            flower_basic_auth="",
            redis_url=without_password(self.redis_url),
            broker_url=without_password(self.broker_url),
        )


# Settings that are secrets: never shown (cli/context.py masks them), logged or handed to a model process; and
# those that may carry one, a URL's password, shown and handed on without it.
SECRET_SETTINGS = frozenset({"api_keys", "jwt_secret", "flower_basic_auth"})
SECRET_URL_SETTINGS = frozenset({"redis_url", "broker_url"})
# Environment variables that hold a secret besides those settings: the CLI's own key (`manage.py up` gives it to
# its children) and redis-cli's password.
SECRET_ENV = frozenset(
    {
        "AETHERCORE_API_KEYS",
        "AETHERCORE_JWT_SECRET",
        "AETHERCORE_FLOWER_BASIC_AUTH",
        "AETHERCORE_API_KEY",
        "REDISCLI_AUTH",
        "REDIS_PASSWORD",
        # A trace backend's credentials (and an endpoint that may carry them): a model process exports nothing, its
        # worker exports the passes it times (docs/OPERATIONS.md, "Tracing").
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    }
)
_SECRET_URLS = ("AETHERCORE_REDIS_URL", "AETHERCORE_BROKER_URL")


def model_process_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a model process starts with: `environ` without its secrets (the Redis and broker URLs
    without their passwords)."""
    env = {name: value for name, value in environ.items() if name not in SECRET_ENV}
    for name in _SECRET_URLS:
        if env.get(name):
            env[name] = without_password(env[name])
    return env


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f.name, f"AETHERCORE_{f.name.upper()}", f.metadata["default"], f.metadata["parse"], f.metadata["doc"])
    for f in fields(Settings)
)
_ENV = {spec.name: spec.env for spec in SETTINGS}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()
