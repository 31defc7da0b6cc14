"""Completion webhooks: what is kept in Redis, how a delivery is signed, and when it is tried again. Written once,
used by the API (a request's webhook), the Lua step that ends a job (tasks/jobs.py: the delivery is due), the
dispatcher (api/webhook_dispatcher.py: it sends it) and the CLI (`manage.py auth webhook-secret`, `webhooks`).

A delivery's life (keys in tasks/names.py):

```
job ends (Lua, the same step)  ─▶ hash webhook:delivery:msg_<job>  {kind, ref, webhook, queue, event}
                                  zset webhooks:due  msg_<job> -> 0            (0: a first attempt, due now)
dispatcher claim (Lua)         ─▶ due -> webhooks:leased  msg -> now + lease   (a dispatcher that dies loses the lease:
                                                                                 the delivery is due again)
first attempt                  ─▶ the body is built once (the job's public JSON) and kept: every retry sends the
                                  same bytes under the same webhook-id, signed afresh (webhook-timestamp)
2xx                            ─▶ the delivery's hash and lease are deleted
410                            ─▶ the endpoint is disabled for its owner; the delivery failed for good
other answer, error, timeout   ─▶ leased -> due at now + backoff (RETRY_BASE x 2^n, jitter, capped) while the
                                  window (RETRY_WINDOW from the first attempt) lasts; then failed for good
failed for good                ─▶ zset webhooks:failed, the hash kept AETHERCORE_WEBHOOK_FAILED_TTL; the job is a
                                  dead letter (tasks/deadletters.py); `manage.py webhooks retry` sends it again
```

Signatures follow the Standard Webhooks specification: `webhook-id` (stable across retries), `webhook-timestamp`
(the attempt's, in seconds), `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` with the
owner's `whsec_` secret; while a rotated secret's overlap lasts, both signatures are sent (space-separated), so
a receiver holding either verifies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import secrets as random_secrets
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import redis

from tasks.names import (
    WEBHOOK_DISABLED,
    WEBHOOK_DISPATCHERS,
    WEBHOOK_ENDPOINTS,
    WEBHOOK_SECRETS,
    WEBHOOKS_DUE,
    WEBHOOKS_FAILED,
    WEBHOOKS_LEASED,
    webhook_delivery_key,
)

SECRET_PREFIX = "whsec_"
# A delivery's hash is kept at most this long before it is delivered or fails (the retry window is at most 7 days).
KEEP_DELIVERY_S = 8 * 86400
DELIVERY_ID_PREFIX = "msg_"
# Buckets of the delivery latency histogram (seconds), written by the dispatchers and read by /metrics.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Why a delivery failed for good (its `reason`).
RETRIES_EXHAUSTED = "retries_exhausted"  # no 2xx within the retry window
ENDPOINT_GONE = "endpoint_gone"  # the receiver answered 410: the endpoint is disabled
ENDPOINT_DISABLED = "endpoint_disabled"  # an earlier 410 disabled it
FORBIDDEN_ADDRESS = "forbidden_address"  # the URL leads to an address webhooks may not reach
RECORD_EXPIRED = "record_expired"  # the job's record expired before the first attempt (the dispatcher was down)


def envelope(event: str, data: dict[str, Any], now: float) -> dict[str, Any]:
    """A delivery's body: Standard Webhooks' recommended {type, timestamp, data}."""
    stamp = datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"type": event, "timestamp": stamp, "data": data}


def delivery_id_for(ref: str) -> str:
    """A delivery's id, also its `webhook-id`: `msg_<job id>` (one delivery per job) or `msg_<batch id>`."""
    return f"{DELIVERY_ID_PREFIX}{ref}"


# -- signing --------------------------------------------------------------------------------------------------
def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(random_secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One Standard Webhooks signature: `v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets)


def retry_delay(retry: int, base_s: float, max_s: float, rng: Any = random.random) -> float:
    """Seconds before retry number `retry` (1: the first): base x 2^(retry-1), capped, times a jitter from 0.5 to 1
    (so a receiver that comes back is not met by every delivery at once, and the first retry is within base)."""
    delay = min(max_s, base_s * 2 ** min(retry - 1, 40))
    return delay * (0.5 + 0.5 * rng())


# -- owners: secrets, default endpoints, disabled endpoints -------------------------------------------------------
class WebhookOwners:
    """Per owner (an API key id `key:<id>`, `env:<digest>`, `jwt:<subject>` or `anonymous`): its signing secret
    (and, after a rotation, the previous one until its overlap ends), its default endpoint, and the endpoints a 410
    disabled."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def secret(self, owner: str, *, create: bool = False, rotate: bool = False, overlap_s: int = 0) -> dict[str, Any]:
        """The owner's secret record {current, previous, previous_until, created_at}; created when asked (or
        rotated: the current one becomes `previous`, signing beside the new one for `overlap_s`)."""
        raw = self.redis.hget(WEBHOOK_SECRETS, owner)
        record = orjson.loads(raw) if raw else None
        if record is None and not (create or rotate):
            return {}
        if record is None or rotate:
            now = time.time()
            new = {"current": new_secret(), "created_at": now}
            if record is not None and overlap_s > 0:
                new.update(previous=record["current"], previous_until=now + overlap_s)
            self.redis.hset(WEBHOOK_SECRETS, owner, orjson.dumps(new))
            record = new
        return record

    def signing_secrets(self, owner: str, now: float | None = None) -> list[str]:
        record = self.secret(owner)
        if not record:
            return []
        keys = [record["current"]]
        if record.get("previous") and float(record.get("previous_until") or 0) > (now or time.time()):
            keys.append(record["previous"])
        return keys

    def has_secret(self, owner: str) -> bool:
        return bool(self.redis.hexists(WEBHOOK_SECRETS, owner))

    def owners(self) -> list[str]:
        return sorted(_text(o) for o in self.redis.hkeys(WEBHOOK_SECRETS))

    def set_endpoint(self, owner: str, url: str | None) -> None:
        if url is None:
            self.redis.hdel(WEBHOOK_ENDPOINTS, owner)
        else:
            self.redis.hset(WEBHOOK_ENDPOINTS, owner, orjson.dumps({"url": url, "set_at": time.time()}))

    def endpoint(self, owner: str) -> str | None:
        raw = self.redis.hget(WEBHOOK_ENDPOINTS, owner)
        return orjson.loads(raw)["url"] if raw else None

    def endpoints(self) -> dict[str, str]:
        return {_text(k): orjson.loads(v)["url"] for k, v in self.redis.hgetall(WEBHOOK_ENDPOINTS).items()}

    def disable(self, owner: str, url: str, reason: str) -> None:
        self.redis.hset(WEBHOOK_DISABLED, f"{owner} {url}", orjson.dumps({"at": time.time(), "reason": reason}))

    def enable(self, owner: str, url: str) -> bool:
        return bool(self.redis.hdel(WEBHOOK_DISABLED, f"{owner} {url}"))

    def disabled(self, owner: str, url: str) -> bool:
        return bool(self.redis.hexists(WEBHOOK_DISABLED, f"{owner} {url}"))

    def disabled_endpoints(self) -> list[dict[str, Any]]:
        out = []
        for key, raw in self.redis.hgetall(WEBHOOK_DISABLED).items():
            owner, _, url = _text(key).partition(" ")
            out.append({"owner": owner, "url": url, **orjson.loads(raw)})
        return sorted(out, key=lambda e: e["at"])


# -- deliveries ---------------------------------------------------------------------------------------------------
# Claim the due deliveries: deliveries whose lease lapsed (their dispatcher died mid-attempt) are due again first;
# then up to ARGV[3] due ones move to the leased set until ARGV[2]. KEYS: due, leased. ARGV: now, lease end, limit.
_CLAIM = """
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(lapsed) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], ARGV[1], id)
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], ARGV[2], id)
end
return ids
"""

# A failed delivery due again (`manage.py webhooks retry`): only one that failed for good and is still kept.
# KEYS: its hash, failed, due. ARGV: id. Returns 1, or 0 if it is not a failed delivery.
_RETRY = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) == false or redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], 'state', 'reason', 'failed_at', 'first_at', 'next_at')
redis.call('HINCRBY', KEYS[1], 'retried', 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
redis.call('ZADD', KEYS[3], 0, ARGV[1])
return 1
"""


class Deliveries:
    """The deliveries in Redis (see the module's docstring)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._claim = client.register_script(_CLAIM)
        self._retry = client.register_script(_RETRY)

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
        is given here)."""
        pipe = self.redis.pipeline(transaction=True)
        key = webhook_delivery_key(delivery_id)
        fields = {"kind": kind, "ref": ref, "webhook": orjson.dumps(webhook), "event": event, "queue": queue}
        if body is not None:
            fields["body"] = body
        pipe.hset(key, mapping=fields)
        pipe.expire(key, KEEP_DELIVERY_S)
        pipe.zadd(WEBHOOKS_DUE, {delivery_id: 0}, nx=True)
        pipe.execute()

    def claim(self, lease_s: float, limit: int, now: float | None = None) -> list[str]:
        now = now or time.time()
        return [_text(i) for i in self._claim(keys=[WEBHOOKS_DUE, WEBHOOKS_LEASED], args=[now, now + lease_s, limit])]

    def get(self, delivery_id: str) -> dict[str, Any] | None:
        fields = self.redis.hgetall(webhook_delivery_key(delivery_id))
        if not fields:
            return None
        record = {_text(k): (v if _text(k) == "body" else _text(v)) for k, v in fields.items()}
        record["id"] = delivery_id
        record["webhook"] = orjson.loads(record["webhook"]) if record.get("webhook") else {}
        return record

    def started(self, delivery_id: str, body: bytes, event: str, now: float) -> None:
        """The first attempt: the body is kept (every retry sends the same bytes) and the window starts."""
        pipe = self.redis.pipeline(transaction=False)
        key = webhook_delivery_key(delivery_id)
        pipe.hset(key, mapping={"body": body, "event": event})
        pipe.hsetnx(key, "first_at", repr(now))
        pipe.execute()

    def delivered(self, delivery_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(webhook_delivery_key(delivery_id))
        pipe.zrem(WEBHOOKS_LEASED, delivery_id)
        pipe.execute()

    def retry_at(self, delivery_id: str, at: float, attempts: int, error: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            webhook_delivery_key(delivery_id),
            mapping={"attempts": attempts, "last_error": error[:500], "next_at": repr(at)},
        )
        pipe.zrem(WEBHOOKS_LEASED, delivery_id)
        pipe.zadd(WEBHOOKS_DUE, {delivery_id: at})
        pipe.execute()

    def failed(self, delivery_id: str, reason: str, error: str, attempts: int, keep_s: int) -> None:
        """Failed for good: kept `keep_s` and listed; the failed index is trimmed to what is kept."""
        now = time.time()
        key = webhook_delivery_key(delivery_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "state": "failed",
                "reason": reason,
                "last_error": error[:500],
                "failed_at": repr(now),
                "attempts": attempts,
            },
        )
        pipe.expire(key, keep_s)
        pipe.zrem(WEBHOOKS_LEASED, delivery_id)
        pipe.zadd(WEBHOOKS_FAILED, {delivery_id: now})
        pipe.zremrangebyscore(WEBHOOKS_FAILED, "-inf", now - keep_s)
        pipe.execute()

    def failed_list(self, limit: int = 100) -> list[dict[str, Any]]:
        """Failed deliveries, newest first (without their bodies)."""
        ids = [_text(i) for i in self.redis.zrevrange(WEBHOOKS_FAILED, 0, max(0, limit - 1))]
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
        """Send a delivery that failed for good again (a new retry window, the same webhook-id); False if there is
        no such failed delivery."""
        keys = [webhook_delivery_key(delivery_id), WEBHOOKS_FAILED, WEBHOOKS_DUE]
        return bool(self._retry(keys=keys, args=[delivery_id, keep_s]))

    def depth(self, now: float | None = None) -> dict[str, int]:
        """new: first attempts due; retrying: waiting for a retry; in_flight: claimed; failed: kept after failing."""
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value
