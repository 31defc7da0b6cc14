"""The webhook dispatcher: the process that sends completion webhooks (`manage.py dispatcher`; `manage.py up` and
compose's `webhooks` service start one). Not on any request path and not in the workers: a job's end only records,
in the same Lua step, that a delivery is due (tasks/jobs/lifecycle.py); everything slow (DNS, TLS, a receiver that
hangs, the retries of 24 h) happens here.

Why a process of its own and not a Celery task on a queue: the deliveries already live in Redis as a schedule (a
sorted set by due time, webhooks/deliveries.py), which is what a retry with backoff needs and what a broker lacks
(Celery's countdown keeps a message in a worker's memory: a restart loses its place, and hours of retries would
sit in the workers). The dispatcher claims due deliveries in one Lua step with a lease, sends them from a thread
pool (AETHERCORE_WEBHOOK_CONCURRENCY), and writes each outcome. Any number of dispatchers may run (each claims its
own); one that dies mid-attempt loses its lease and the delivery is due again at once (at-least-once: a receiver
dedupes on `webhook-id`, stable across every attempt). An outcome is written only under the claim's lease token.

One slow receiver cannot stall anyone else's webhooks: an attempt has one deadline (AETHERCORE_WEBHOOK_TIMEOUT, for
connecting, TLS, sending and the answer's head: webhooks/outbound.py); an endpoint (an owner's scheme://host:port) has
at most AETHERCORE_WEBHOOK_ENDPOINT_CONCURRENCY attempts in flight and an owner AETHERCORE_WEBHOOK_OWNER_SHARE of the
threads, every dispatcher together; and an endpoint whose attempts keep failing has its circuit opened, its
deliveries waiting in Redis without a thread (webhooks/deliveries.py, SlotLimits).

Its counts (sent, retried, failed, held back, latency) go to Redis with its heartbeat (METRICS_WEBHOOKS), so the
API's /metrics shows every dispatcher's; the queue's depth is read at scrape time.

A job's delivery body is built here (tasks/jobs/public.py: its public JSON); another kind's (a batch's) by the product
that made it due, handed in by whoever starts the process (`bodies`: cli/processes.py gives the batches'), so
webhooks/ never imports the products above it.
"""

from __future__ import annotations

import bisect
import os
import secrets
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis
from loguru import logger

from config.logging import setup_logging
from config.settings import Settings
from tasks.deadletters import WEBHOOK_FAILED, DeadLetters
from tasks.holdings import DEAD_LETTERS, quotas_from
from tasks.jobs.public import public_job
from tasks.jobs.records import Records
from tasks.names import METRICS_WEBHOOKS, WEBHOOK_DISPATCHERS
from tasks.redis_client import make_redis
from tracing import spans
from tracing.setup import configure as configure_tracing
from webhooks.deliveries import (
    ANSWERED,
    ENDPOINT_DISABLED,
    ENDPOINT_GONE,
    EXPIRE,
    FORBIDDEN_ADDRESS,
    LATENCY_BUCKETS,
    NOT_SENT,
    RECORD_EXPIRED,
    RETRIES_EXHAUSTED,
    SEND,
    UNHEALTHY,
    Deliveries,
    SlotLimits,
)
from webhooks.outbound import DeliveryFailed, ForbiddenDestination, OutboundPolicy
from webhooks.owners import WebhookOwners
from webhooks.signing import envelope, retry_delay, signature_header

POLL_S = 0.2  # how often an idle dispatcher looks for due deliveries
HEARTBEAT_S = 2.0  # its heartbeat (and metrics flush)
USER_AGENT = "AetherCore-Webhooks/1"


class DeliveryMetrics:
    """Counted in memory, added to Redis with each heartbeat (like a worker's job metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._sum = 0.0

    def count(self, name: str, times: int = 1) -> None:
        with self._lock:
            self._counts[name] += times

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        bucket = f"{LATENCY_BUCKETS[index]}" if index < len(LATENCY_BUCKETS) else "+Inf"
        with self._lock:
            self._counts[f"latency|{bucket}"] += 1
            self._counts["latency|count"] += 1
            self._sum += seconds

    def flush(self, client: redis.Redis) -> None:
        with self._lock:
            counts, total, self._counts, self._sum = self._counts, self._sum, Counter(), 0.0
        if not counts:
            return
        try:
            pipe = client.pipeline(transaction=False)
            for name, times in counts.items():
                pipe.hincrby(METRICS_WEBHOOKS, name, times)
            if total:
                pipe.hincrbyfloat(METRICS_WEBHOOKS, "latency|sum", total)
            pipe.execute()
        except redis.RedisError:
            with self._lock:  # kept for the next flush
                self._counts.update(counts)
                self._sum += total


# A delivery body of a kind other than a job's: (Redis, the delivery's ref, now) -> its bytes, None if it is gone.
BodyFor = Callable[[redis.Redis, str, float], bytes | None]


class Dispatcher:
    def __init__(
        self, settings: Settings, name: str | None = None, bodies: Mapping[str, BodyFor] | None = None
    ) -> None:
        self.settings = settings
        self.bodies = dict(bodies or {})
        self.name = name or f"dispatcher.{os.getpid()}@{socket.gethostname()}"
        self.redis = make_redis(settings.redis_url, settings.redis_sentinel_master, **settings.redis_options())
        self.jobs = Records(self.redis, settings.result_ttl)
        self.deliveries = Deliveries(self.redis, SlotLimits.from_settings(settings))
        self.owners = WebhookOwners(self.redis)
        self.dead = DeadLetters(
            self.redis, settings.dead_letter_ttl, settings.dead_letter_max, quotas_from(settings)[DEAD_LETTERS]
        )
        self.policy = OutboundPolicy.from_entries(settings.webhook_allow)
        self.metrics = DeliveryMetrics()
        # A claim outlives the longest attempt: the request is cut at AETHERCORE_WEBHOOK_TIMEOUT (webhooks/outbound.py),
        # resolving its name is bounded by the system resolver (resolv.conf: 5 s x 2 tries per server by default), and
        # the rest is a few Redis round trips. Should one outlive it anyway, its outcome is not written (the lease
        # token is checked): the delivery is another claim's then.
        self.lease_s = settings.webhook_timeout * 2 + 30
        self._busy = threading.Semaphore(settings.webhook_concurrency)
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="webhook")

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        beat = threading.Thread(target=self._heartbeat, args=(stop,), name="webhook-heartbeat", daemon=True)
        beat.start()
        limits = self.deliveries.limits
        logger.info(
            "webhook dispatcher {} sending up to {} deliveries at once ({} per endpoint, {} per owner)",
            self.name,
            self.settings.webhook_concurrency,
            limits.endpoint_max,
            limits.owner_max,
        )
        failed_at = 0.0
        while not stop.is_set():
            try:
                moved = self.claim_and_send()
            except redis.RedisError as exc:
                if time.monotonic() - failed_at > 30:
                    logger.warning("webhook dispatcher: Redis unavailable ({}); retrying", exc)
                failed_at = time.monotonic()
                moved = 0
            if not moved:
                stop.wait(POLL_S)
        self._pool.shutdown(wait=True)  # attempts in flight end within AETHERCORE_WEBHOOK_TIMEOUT
        self.metrics.flush(self.redis)
        self.redis.zrem(WEBHOOK_DISPATCHERS, self.name)

    def claim_and_send(self) -> int:
        """Claim as many due deliveries as there are free threads and start them; how many were claimed or held
        back (the next claim looks again at once: held-back deliveries no longer stand in the way)."""
        free = 0
        while self._busy.acquire(blocking=False):
            free += 1
        if not free:
            time.sleep(0.05)
            return 0
        token = f"{self.name}#{secrets.token_hex(6)}"
        try:
            claimed = self.deliveries.claim(token, self.lease_s, free)
        except BaseException:
            for _ in range(free):
                self._busy.release()
            raise
        for _ in range(free - len(claimed.deliveries)):
            self._busy.release()
        if claimed.held:
            self.metrics.count("deliveries|held", claimed.held)
        for delivery_id, mode in claimed.deliveries:
            self._pool.submit(self._send_one, delivery_id, token, mode)
        return len(claimed.deliveries) + claimed.held

    def _send_one(self, delivery_id: str, token: str, mode: str) -> None:
        try:
            self.attempt(delivery_id, token, mode)
        except Exception:  # a bug, or Redis away: the lease lapses and the delivery is due again
            logger.bind(delivery_id=delivery_id).exception("webhook delivery {} failed unexpectedly", delivery_id)
        finally:
            self._busy.release()

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.zadd(WEBHOOK_DISPATCHERS, {self.name: time.time()})
                pipe.zremrangebyscore(WEBHOOK_DISPATCHERS, "-inf", time.time() - 60)
                pipe.execute()
                self.metrics.flush(self.redis)
            except redis.RedisError:
                pass

    # -- one attempt -------------------------------------------------------------------------------------------
    def attempt(self, delivery_id: str, token: str, mode: str = SEND) -> str:
        """One attempt of one delivery claimed under `token`; returns its outcome (sent, retry, failed, gone, or
        lost: the attempt outlived its lease and its outcome was not written)."""
        record = self.deliveries.get(delivery_id)
        if record is None:  # expired meanwhile
            self.deliveries.forget(delivery_id)
            return "gone"
        record["token"] = token
        attempts = int(record.get("attempts") or 0)
        if mode == EXPIRE:
            error = f"the retry window ended while the endpoint was held back ({record.get('last_error') or 'busy'})"
            return self._fail(record, RETRIES_EXHAUSTED, error, attempts, NOT_SENT)
        hook = record["webhook"]
        url, owner = hook.get("url", ""), hook.get("owner", "")
        trace = hook.get("traceparent")
        log = logger.bind(delivery_id=delivery_id, job_id=record.get("ref"), trace_id=trace[3:35] if trace else None)
        attempts += 1
        now = time.time()
        body = record.get("body")
        if body is None:
            body = self.body(record, now)
            if body is None:
                return self._fail(record, RECORD_EXPIRED, "the job's record expired before its first attempt", 0)
        if "body" not in record or not record.get("first_at"):
            if not self.deliveries.started(delivery_id, token, _bytes(body), record.get("event", ""), now):
                return self._lost(record)
        first_at = float(record.get("first_at") or now)
        if self.owners.disabled(owner, url):
            return self._fail(record, ENDPOINT_DISABLED, f"{url} answered 410 earlier and is disabled", attempts)
        signing = self.owners.signing_secrets(owner, now)
        status: int | None = None
        verdict = NOT_SENT
        began = time.perf_counter()
        if not signing:
            error = f"{owner} has no webhook signing secret (manage.py auth webhook-secret {owner})"
        else:
            payload = _bytes(body)
            stamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                "webhook-id": delivery_id,
                "webhook-timestamp": str(stamp),
                "webhook-signature": signature_header(signing, delivery_id, stamp, payload),
            }
            span = _attempt_span(hook, url, delivery_id, attempts, headers)
            try:
                status = self.policy.post(url, payload, headers, self.settings.webhook_timeout)
                error = f"HTTP {status}"
                verdict = UNHEALTHY if status == 429 or status >= 500 else ANSWERED
            except ForbiddenDestination as exc:
                spans.end(span, FORBIDDEN_ADDRESS)
                return self._fail(record, FORBIDDEN_ADDRESS, str(exc), attempts)
            except DeliveryFailed as exc:
                error = str(exc)
                verdict = UNHEALTHY
            _end_attempt_span(span, status)
            self.metrics.observe(time.perf_counter() - began)
        if status is not None and 200 <= status < 300:
            if not self.deliveries.delivered(delivery_id, token):
                return self._lost(record)
            self.metrics.count("deliveries|sent")
            log.info("webhook {} delivered to {} (attempt {}, HTTP {})", delivery_id, url, attempts, status)
            return "sent"
        if status == 410:
            self.owners.disable(owner, url, "answered 410 Gone")
            log.warning("webhook endpoint {} answered 410: disabled for {}", url, owner)
            return self._fail(record, ENDPOINT_GONE, f"{url} answered 410 Gone", attempts, verdict)
        delay = retry_delay(attempts, self.settings.webhook_retry_base, self.settings.webhook_retry_max_delay)
        if now + delay > first_at + self.settings.webhook_retry_window:
            return self._fail(record, RETRIES_EXHAUSTED, error, attempts, verdict)
        if not self.deliveries.retry_at(delivery_id, token, now + delay, attempts, error, verdict):
            return self._lost(record)
        self.metrics.count("deliveries|retried")
        log.info("webhook {} to {} failed ({}); attempt {} in {:.1f} s", delivery_id, url, error, attempts + 1, delay)
        return "retry"

    def body(self, record: dict[str, Any], now: float) -> bytes | None:
        """A job's delivery body, built once at its first attempt: Standard Webhooks' {type, timestamp, data} with the
        job's public JSON (GET /jobs/{id}) as data; its result left out beyond AETHERCORE_WEBHOOK_MAX_BYTES. A
        batch's: the Batch object as it ended (its error list is capped, batches/driver.py), built by `bodies`."""
        kind = record.get("kind")
        if kind in self.bodies:
            return self.bodies[kind](self.redis, record["ref"], now)
        job = self.jobs.get(record["ref"])
        if job is None:
            return None
        data = public_job(job)
        body = envelope(f"job.{job['status']}", data, now)
        encoded = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        if len(encoded) > self.settings.webhook_max_bytes:
            body["data"] = {**data, "result": None}
            body["result_omitted"] = (
                f"the result is larger than AETHERCORE_WEBHOOK_MAX_BYTES; read it with GET /jobs/{job['job_id']}"
            )
            encoded = orjson.dumps(body)
        return encoded

    def _lost(self, record: dict[str, Any]) -> str:
        self.metrics.count("deliveries|lease_lost")
        logger.bind(delivery_id=record["id"], job_id=record.get("ref")).warning(
            "webhook {}: the attempt outlived its lease; another dispatcher holds the delivery, its outcome stands",
            record["id"],
        )
        return "lost"

    def _fail(self, record: dict[str, Any], reason: str, error: str, attempts: int, verdict: str = NOT_SENT) -> str:
        delivery_id = record["id"]
        keep_s = self.settings.webhook_failed_ttl
        if not self.deliveries.failed(delivery_id, record["token"], reason, error, attempts, keep_s, verdict):
            return self._lost(record)
        self.metrics.count(f"failures|{reason}")
        self.metrics.count("deliveries|failed")
        hook = record["webhook"]
        logger.bind(delivery_id=delivery_id, job_id=record.get("ref")).warning(
            "webhook {} to {} failed for good ({}): {}", delivery_id, hook.get("url"), reason, error
        )
        if record.get("kind") == "job":
            data = _data(record.get("body"))
            self.dead.add(
                record["ref"],
                record.get("queue") or "unknown",
                WEBHOOK_FAILED,
                error={"code": WEBHOOK_FAILED, "message": f"{reason}: {error}"},
                delivery_id=delivery_id,
                owner=hook.get("owner"),
                webhook=hook,
                model_id=data.get("model_id"),
                kind=data.get("kind"),
                request_id=data.get("request_id"),
            )
        return "failed"


def _attempt_span(hook: dict[str, Any], url: str, delivery_id: str, attempts: int, headers: dict[str, str]) -> Any:
    """The attempt's `aethercore.webhook.attempt` span (a client span in the job's trace: the delivery's id, its retry
    number, the receiver's scheme, host and port, never its path or query, which may hold a receiver's token), and the
    trace context the request carries: the span's own, else the job's as it came (tracing off or unsampled)."""
    parent = hook.get("traceparent")
    if not parent:
        return None
    split = urlsplit(url)
    span = spans.start(
        "aethercore.webhook.attempt",
        parent,
        kind="client",
        attributes={
            "aethercore.webhook.delivery_id": delivery_id,
            "aethercore.webhook.retry": attempts - 1,
            "http.request.method": "POST",
            "url.scheme": split.scheme,
            "server.address": split.hostname or "",
            "server.port": split.port or (443 if split.scheme == "https" else 80),
        },
    )
    headers["traceparent"] = spans.child_traceparent(span, parent) or parent
    if hook.get("tracestate"):
        headers["tracestate"] = hook["tracestate"]
    return span


def _end_attempt_span(span: Any, status: int | None) -> None:
    if span is None:
        return
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    failed = status is None or not 200 <= status < 300
    # `error` says why in words that may name the receiver's URL: the span gets only its kind
    spans.end(span, (str(status) if status is not None else "delivery_failed") if failed else None)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _data(body: Any) -> dict[str, Any]:
    try:
        return orjson.loads(body).get("data") or {}
    except (TypeError, orjson.JSONDecodeError, AttributeError):
        return {}


def run_dispatcher(settings: Settings, bodies: Mapping[str, BodyFor] | None = None) -> None:
    """The dispatcher process until SIGTERM or SIGINT; `bodies`: the delivery bodies of kinds other than a job's."""
    setup_logging("dispatcher", settings.log_level, settings.log_format)
    configure_tracing("dispatcher")
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("webhook dispatcher stopping (signal {})", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Dispatcher(settings, bodies=bodies).run(stop)
