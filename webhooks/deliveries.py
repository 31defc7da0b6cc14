"""Completion webhooks' deliveries in Redis: what is kept, when a delivery is claimed, tried again or failed for good,
and each endpoint's circuit breaker (the scripts in webhooks/lua/). Used by the API (a request's webhook, /metrics),
the dispatcher (webhooks/dispatcher.py: it sends them) and the CLI (`manage.py webhooks`). The Lua step that ends a
job (tasks/jobs/lua/transition.lua) makes a delivery due with the key names of tasks/names.py only: tasks/ never
imports webhooks/. The webhooks package may import tasks/ and config/ only (never api, flask or workers); signing is
webhooks/signing.py, owners' secrets and endpoints webhooks/owners.py.

A delivery's life (keys in tasks/names.py):

```
job ends (Lua, the same step)  ─▶ hash webhook:delivery:msg_<job>  {kind, ref, webhook, queue, event}
                                  zset webhooks:due  msg_<job> -> 0            (0: a first attempt, due now)
                                  charged to its owner (tasks/holdings.py, DELIVERIES)
dispatcher claim (Lua)         ─▶ due -> webhooks:leased  msg -> now + lease, the claim's token in the hash (a
                                  dispatcher that dies loses the lease: the delivery is due again); a slot of its
                                  endpoint and of its owner taken. Held back instead, rescheduled without an
                                  attempt: its endpoint's circuit is open, or its endpoint or owner is at its cap
first attempt                  ─▶ the body is built once (the job's public JSON) and kept: every retry sends the
                                  same bytes under the same webhook-id, signed afresh (webhook-timestamp)
2xx                            ─▶ the delivery's hash, lease and charge are deleted
410                            ─▶ the endpoint is disabled for its owner; the delivery failed for good
other answer, error, timeout   ─▶ leased -> due at now + backoff (RETRY_BASE x 2^n, jitter, capped) while the
                                  window (RETRY_WINDOW from the first attempt or hold) lasts; then failed for good
failed for good                ─▶ zset webhooks:failed, the hash (and its charge) kept AETHERCORE_WEBHOOK_FAILED_TTL;
                                  the job is a dead letter (tasks/deadletters.py); `manage.py webhooks retry` sends
                                  it again
```

Every outcome is written by the claim that holds the lease (its token), with the attempt's verdict for the
endpoint's circuit breaker: after AETHERCORE_WEBHOOK_BREAKER_FAILURES consecutive unhealthy attempts (timeouts,
connection errors, 429, 5xx) the circuit opens for AETHERCORE_WEBHOOK_BREAKER_COOLDOWN: the endpoint's due
deliveries wait until then, neither attempted nor counted as attempts (their retry window keeps running, so one
held past it fails for good). Then one probe is sent (half-open): an answer closes the circuit, a failure opens it
again. The state is in Redis (a hash per endpoint, leases per endpoint and owner), shared by every dispatcher.

Signatures follow the Standard Webhooks specification: `webhook-id` (stable across retries), `webhook-timestamp`
(the attempt's, in seconds), `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` with the
owner's `whsec_` secret; while a rotated secret's overlap lasts, both signatures are sent (space-separated), so
a receiver holding either verifies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis

from tasks.holdings import DELIVERIES, with_holdings
from tasks.names import (
    KEEP_DELIVERY_S,
    WEBHOOK_DELIVERY_PREFIX,
    WEBHOOK_DISPATCHERS,
    WEBHOOK_ENDPOINT_LEASES_PREFIX,
    WEBHOOK_ENDPOINT_PREFIX,
    WEBHOOK_OWNER_LEASES_PREFIX,
    WEBHOOKS_DUE,
    WEBHOOKS_FAILED,
    WEBHOOKS_LEASED,
    webhook_delivery_key,
)
from tasks.redis_client import text

# Buckets of the delivery latency histogram (seconds), written by the dispatchers and read by /metrics.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Why a delivery failed for good (its `reason`).
RETRIES_EXHAUSTED = "retries_exhausted"  # no 2xx within the retry window
ENDPOINT_GONE = "endpoint_gone"  # the receiver answered 410: the endpoint is disabled
ENDPOINT_DISABLED = "endpoint_disabled"  # an earlier 410 disabled it
FORBIDDEN_ADDRESS = "forbidden_address"  # the URL leads to an address webhooks may not reach
RECORD_EXPIRED = "record_expired"  # the job's record expired before the first attempt (the dispatcher was down)

# -- deliveries ---------------------------------------------------------------------------------------------------
# What an attempt's outcome says about its endpoint (the circuit breaker's input).
ANSWERED = "answered"  # the receiver answered: a 2xx, or a 3xx or 4xx (the delivery's failure, not the endpoint's)
UNHEALTHY = "unhealthy"  # a timeout, a connection or TLS error, a malformed or oversized answer, a 429 or 5xx
NOT_SENT = "not_sent"  # no request was made (a refused address, a disabled endpoint, no secret, the window over)

# How a claimed delivery is to be handled.
SEND = "send"
EXPIRE = "expire"  # its retry window ended while its endpoint or owner held it back: failed for good, not sent

BREAKER_MEMORY_S = 3600  # an endpoint's count of failures is forgotten this long after its cool-down
HOLD_FIRST_S = 0.25  # a delivery held back by a busy endpoint or owner waits this long, twice as long each time


@dataclass(frozen=True)
class SlotLimits:
    """What deliveries may hold of the dispatchers, every dispatcher together (config/settings.py documents each).
    The defaults hold nothing back (a store that only enqueues, lists and retries)."""

    endpoint_max: int = 1_000_000  # attempts of one endpoint in flight at once
    owner_max: int = 1_000_000  # attempts of one owner in flight at once
    breaker_failures: int = 1_000_000  # consecutive unhealthy attempts that open an endpoint's circuit
    breaker_cooldown_s: float = 30.0
    window_s: float = 7 * 86400  # the retry window: a delivery held back past it fails for good
    hold_max_s: float = 10.0  # the longest one wait of a delivery held back by a busy endpoint or owner

    @classmethod
    def from_settings(cls, settings: Any) -> SlotLimits:
        return cls(
            endpoint_max=settings.webhook_endpoint_concurrency,
            owner_max=max(1, int(settings.webhook_owner_share * settings.webhook_concurrency)),
            breaker_failures=settings.webhook_breaker_failures,
            breaker_cooldown_s=settings.webhook_breaker_cooldown,
            window_s=settings.webhook_retry_window,
            hold_max_s=settings.webhook_timeout,
        )


@dataclass(frozen=True)
class Claimed:
    deliveries: list[tuple[str, str]]  # (delivery id, SEND or EXPIRE), leased to the claim's token
    held: int  # due deliveries held back and rescheduled without an attempt


# The scripts (webhooks/lua/*.lua), each read once at import with the prelude (prelude.lua: shared by all of
# them) and the account's functions (tasks/holdings.py) in front, its `$NAME` placeholders filled in.
LUA_DIR = Path(__file__).with_name("lua")


def _script(name: str) -> str:
    """A script of webhooks/lua/, rendered: the prelude in front, its placeholders filled in."""
    names = {
        "$DELIVERY": WEBHOOK_DELIVERY_PREFIX,
        "$ENDPOINT_LEASES": WEBHOOK_ENDPOINT_LEASES_PREFIX,
        "$ENDPOINT": WEBHOOK_ENDPOINT_PREFIX,
        "$OWNER_LEASES": WEBHOOK_OWNER_LEASES_PREFIX,
        "$LEASED": WEBHOOKS_LEASED,
        "$DUE": WEBHOOKS_DUE,
        "$FAILED": WEBHOOKS_FAILED,
        "$KIND": DELIVERIES,
        "$ANSWERED": ANSWERED,
        "$UNHEALTHY": UNHEALTHY,
        "$SEND": SEND,
        "$EXPIRE": EXPIRE,
        "$BREAKER_MEMORY_S": str(BREAKER_MEMORY_S),
        "$HOLD_FIRST_S": str(HOLD_FIRST_S),
        "$KEEP_DELIVERY_S": str(KEEP_DELIVERY_S),
    }
    source = (LUA_DIR / "prelude.lua").read_text() + (LUA_DIR / f"{name}.lua").read_text()
    for placeholder, value in names.items():  # longest first where one name starts another ($ENDPOINT_LEASES)
        source = source.replace(placeholder, value)
    return with_holdings(source)


_SCRIPTS = {
    name: _script(name)
    for name in ("claim", "started", "delivered", "retry_at", "failed", "forget", "retry", "enqueue")
}


class Deliveries:
    """The deliveries in Redis (see the module's docstring). `limits`: what the dispatcher that claims through this
    store lets deliveries hold (SlotLimits.from_settings); its writes of an outcome feed the circuit breaker."""

    def __init__(self, client: redis.Redis, limits: SlotLimits | None = None) -> None:
        self.redis = client
        self.limits = limits or SlotLimits()
        self._claim = client.register_script(_SCRIPTS["claim"])
        self._started = client.register_script(_SCRIPTS["started"])
        self._delivered = client.register_script(_SCRIPTS["delivered"])
        self._retry_at = client.register_script(_SCRIPTS["retry_at"])
        self._failed = client.register_script(_SCRIPTS["failed"])
        self._forget = client.register_script(_SCRIPTS["forget"])
        self._retry = client.register_script(_SCRIPTS["retry"])
        self._enqueue = client.register_script(_SCRIPTS["enqueue"])

    def enqueue(
        self,
        delivery_id: str,
        *,
        kind: str,
        ref: str,
        webhook: dict[str, Any],
        event: str,
        queue: str = "",
        body: bytes | None = None,
    ) -> None:
        """A delivery due now (what a job's end does in Lua, for the other things that end: a batch, whose `body`
        is given here), charged to the webhook's owner."""
        args: list[str | bytes | int] = [delivery_id, kind, ref, orjson.dumps(webhook), event, queue, body or b""]
        args.append(int(body is not None))
        self._enqueue(args=[*args, repr(time.time())])

    def claim(
        self, token: str, lease_s: float, limit: int, scan: int | None = None, now: float | None = None
    ) -> Claimed:
        """Up to `limit` due deliveries leased to `token` until now + `lease_s`, looking at up to `scan` (default:
        enough to pass deliveries held back); those held back are rescheduled (SlotLimits)."""
        now = now or time.time()
        limits = self.limits
        args: list[str | int | float] = [
            repr(now),
            repr(now + lease_s),
            limit,
            token,
            scan or 64 + 4 * limit,
            limits.endpoint_max,
            limits.owner_max,
            limits.breaker_failures,
            repr(float(limits.window_s)),
            repr(float(limits.hold_max_s)),
        ]
        flat, held = self._claim(args=args)
        pairs = [text(v) for v in flat]
        return Claimed(list(zip(pairs[::2], pairs[1::2])), int(held))

    def get(self, delivery_id: str) -> dict[str, Any] | None:
        fields = self.redis.hgetall(webhook_delivery_key(delivery_id))
        if not fields:
            return None
        record: dict[str, Any] = {text(k): (v if text(k) == "body" else text(v)) for k, v in fields.items()}
        record["id"] = delivery_id
        record["webhook"] = orjson.loads(record["webhook"]) if record.get("webhook") else {}
        return record

    # The outcomes: each is written only while `token` still holds the delivery's lease; False when it did not
    # (the attempt outlived its lease and another dispatcher holds the delivery: its outcome stands).
    def started(self, delivery_id: str, token: str, body: bytes, event: str, now: float) -> bool:
        """The first attempt: the body is kept (every retry sends the same bytes) and the window starts."""
        return bool(self._started(args=[delivery_id, token, body, event, repr(now)]))

    def delivered(self, delivery_id: str, token: str) -> bool:
        return bool(self._delivered(args=[delivery_id, token, *self._breaker(time.time())]))

    def retry_at(self, delivery_id: str, token: str, at: float, attempts: int, error: str, verdict: str) -> bool:
        args = [delivery_id, token, *self._breaker(time.time()), verdict, repr(at), attempts, error[:500]]
        return bool(self._retry_at(args=args))

    def failed(
        self, delivery_id: str, token: str, reason: str, error: str, attempts: int, keep_s: int, verdict: str
    ) -> bool:
        """Failed for good: kept `keep_s` and listed; the failed index is trimmed to what is kept."""
        args = [delivery_id, token, *self._breaker(time.time()), verdict, reason, error[:500], attempts, keep_s]
        return bool(self._failed(args=args))

    def forget(self, delivery_id: str) -> None:
        """A claimed delivery whose record is gone: out of the leased set."""
        self._forget(args=[delivery_id])

    def _breaker(self, now: float) -> list[Any]:
        return [repr(now), self.limits.breaker_failures, repr(float(self.limits.breaker_cooldown_s))]

    def endpoint(self, endpoint: str) -> dict[str, str]:
        """An endpoint's circuit (`<owner> <scheme>://<host>:<port>`): failures, open_until, probe, probe_until."""
        return {text(k): text(v) for k, v in self.redis.hgetall(f"{WEBHOOK_ENDPOINT_PREFIX}{endpoint}").items()}

    def failed_list(self, limit: int = 100) -> list[dict[str, Any]]:
        """Failed deliveries, newest first (without their bodies)."""
        ids = [text(i) for i in self.redis.zrevrange(WEBHOOKS_FAILED, 0, max(0, limit - 1))]
        out = []
        for delivery_id in ids:
            record = self.get(delivery_id)
            if record is None:
                self.redis.zrem(WEBHOOKS_FAILED, delivery_id)  # its hash expired
                continue
            record.pop("body", None)
            out.append(record)
        return out

    def retry(self, delivery_id: str, keep_s: int = KEEP_DELIVERY_S) -> bool:
        """Send a delivery that failed for good again (a new retry window, the same webhook-id, its endpoint's circuit
        closed); False if there is no such failed delivery."""
        return bool(self._retry(args=[delivery_id, keep_s, repr(time.time())]))

    def depth(self, now: float | None = None) -> dict[str, int]:
        """new: first attempts due; retrying: waiting for a retry (or held back: a busy or failing endpoint, a busy
        owner); in_flight: claimed; failed: kept after failing."""
        now = now or time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcount(WEBHOOKS_DUE, 0, 0)
        pipe.zcount(WEBHOOKS_DUE, "(0", "+inf")
        pipe.zcard(WEBHOOKS_LEASED)
        pipe.zcard(WEBHOOKS_FAILED)
        pipe.zcount(WEBHOOK_DISPATCHERS, now - 10, "+inf")
        new, retrying, in_flight, failed, dispatchers = pipe.execute()
        return {
            "new": int(new),
            "retrying": int(retrying),
            "in_flight": int(in_flight),
            "failed": int(failed),
            "dispatchers": int(dispatchers),
        }
