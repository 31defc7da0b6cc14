"""Completion webhooks: what is kept in Redis, how a delivery is signed, and when it is tried again. Written once,
used by the API (a request's webhook), the Lua step that ends a job (tasks/jobs/lifecycle.py: the delivery is due), the
dispatcher (webhooks/dispatcher.py: it sends it) and the CLI (`manage.py auth webhook-secret`, `webhooks`).

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

import base64
import hashlib
import hmac
import random
import secrets as random_secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis

from tasks.holdings import DELIVERIES, with_holdings
from tasks.names import (
    WEBHOOK_DELIVERY_PREFIX,
    WEBHOOK_DISABLED,
    WEBHOOK_DISPATCHERS,
    WEBHOOK_ENDPOINT_LEASES_PREFIX,
    WEBHOOK_ENDPOINT_PREFIX,
    WEBHOOK_ENDPOINTS,
    WEBHOOK_OWNER_LEASES_PREFIX,
    WEBHOOK_SECRETS,
    WEBHOOKS_DUE,
    WEBHOOKS_FAILED,
    WEBHOOKS_LEASED,
    webhook_delivery_key,
)
from tasks.redis_client import text

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
        return sorted(text(o) for o in self.redis.hkeys(WEBHOOK_SECRETS))

    def set_endpoint(self, owner: str, url: str | None) -> None:
        if url is None:
            self.redis.hdel(WEBHOOK_ENDPOINTS, owner)
        else:
            self.redis.hset(WEBHOOK_ENDPOINTS, owner, orjson.dumps({"url": url, "set_at": time.time()}))

    def endpoint(self, owner: str) -> str | None:
        raw = self.redis.hget(WEBHOOK_ENDPOINTS, owner)
        return orjson.loads(raw)["url"] if raw else None

    def endpoints(self) -> dict[str, str]:
        return {text(k): orjson.loads(v)["url"] for k, v in self.redis.hgetall(WEBHOOK_ENDPOINTS).items()}

    def disable(self, owner: str, url: str, reason: str) -> None:
        self.redis.hset(WEBHOOK_DISABLED, f"{owner} {url}", orjson.dumps({"at": time.time(), "reason": reason}))

    def enable(self, owner: str, url: str) -> bool:
        return bool(self.redis.hdel(WEBHOOK_DISABLED, f"{owner} {url}"))

    def disabled(self, owner: str, url: str) -> bool:
        return bool(self.redis.hexists(WEBHOOK_DISABLED, f"{owner} {url}"))

    def disabled_endpoints(self) -> list[dict[str, Any]]:
        out = []
        for key, raw in self.redis.hgetall(WEBHOOK_DISABLED).items():
            owner, _, url = text(key).partition(" ")
            out.append({"owner": owner, "url": url, **orjson.loads(raw)})
        return sorted(out, key=lambda e: e["at"])


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


# Shared by the scripts below. An endpoint is the owner's scheme://host:port: one owner's failing receiver never
# opens the circuit of another owner's on the same host, and a caller cannot dodge the per-endpoint cap with paths.
# Slots are leases (sorted sets: delivery id -> lease end), so a dispatcher that dies frees them when they lapse.
_PRELUDE = """
local function endpoint_of(owner, url)
  local scheme, authority = string.match(url, '^(%a+)://([^/?#]*)')
  if not scheme then return owner .. ' ' .. url end
  scheme, authority = string.lower(scheme), string.lower(authority)
  if not string.find(authority, ':%d+$') then
    if scheme == 'https' then authority = authority .. ':443' else authority = authority .. ':80' end
  end
  return owner .. ' ' .. scheme .. '://' .. authority
end
local function owner_of(key)
  local ok, hook = pcall(cjson.decode, redis.call('HGET', key, 'webhook') or '')
  if ok and type(hook) == 'table' and hook.owner ~= nil then return tostring(hook.owner), hook end
  return '', {}
end
-- An outcome is written only by the claim that holds the delivery: its lease is the claim's token and it is
-- still leased (a dispatcher whose attempt outlived its lease must not write over another's).
local function ours(key, id, token)
  return redis.call('HGET', key, 'lease') == token and redis.call('ZSCORE', '$LEASED', id) ~= false
end
-- The attempt is over: its slots are free and its endpoint's circuit learns what it said.
local function release(key, id, owner, verdict, now, failures_max, cooldown)
  local endpoint = redis.call('HGET', key, 'endpoint')
  redis.call('ZREM', '$LEASED', id)
  redis.call('HDEL', key, 'lease', 'endpoint')
  if not endpoint then return end
  redis.call('ZREM', '$ENDPOINT_LEASES' .. endpoint, id)
  redis.call('ZREM', '$OWNER_LEASES' .. owner, id)
  local state = '$ENDPOINT' .. endpoint
  local probe = redis.call('HGET', state, 'probe') == id
  if verdict == '$ANSWERED' then
    redis.call('DEL', state)
  elseif verdict == '$UNHEALTHY' then
    local failures = redis.call('HINCRBY', state, 'failures', 1)
    if probe or failures >= failures_max then redis.call('HSET', state, 'open_until', now + cooldown) end
    if probe then redis.call('HDEL', state, 'probe', 'probe_until') end
    redis.call('EXPIRE', state, math.ceil(cooldown) + $BREAKER_MEMORY_S)
  elseif probe then
    redis.call('HDEL', state, 'probe', 'probe_until')
  end
end
"""

# Claim due deliveries for one dispatcher's free threads. Leases that lapsed (their dispatcher died) are due again.
# Then up to `scan` due deliveries are looked at, oldest first, and up to `limit` claimed; each one that may not
# start now is held back, rescheduled without taking a thread and without counting an attempt:
#   its endpoint's circuit is open           -> until the cool-down ends
#   half-open with its probe in flight, or its endpoint or owner at its cap
#                                             -> HOLD_FIRST_S, doubling per hold, at most hold_max
# The retry window runs from the first attempt or the first hold; a delivery whose window ends while held back is
# claimed as EXPIRE (failed for good, not sent). In a half-open circuit the one delivery claimed is its probe.
# ARGV: now, lease end, limit, token, scan, endpoint max, owner max, breaker failures, window, hold max.
# Returns {id, mode, id, mode, ...} and how many were held back.
_CLAIM = """
local now, lease_end, limit, token = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local scan, endpoint_max, owner_max = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local failures_max, window, hold_max = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local keep = math.ceil(lease_end - now) + 1
for _, id in ipairs(redis.call('ZRANGEBYSCORE', '$LEASED', '-inf', now, 'LIMIT', 0, scan)) do
  redis.call('ZREM', '$LEASED', id)
  redis.call('ZADD', '$DUE', now, id)
end
local live = {}
local function full(key, max)
  if live[key] == nil then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    live[key] = redis.call('ZCARD', key)
  end
  return live[key] >= max
end
local function take(key, id)
  redis.call('ZADD', key, lease_end, id)
  redis.call('EXPIRE', key, keep)
  live[key] = (live[key] or 0) + 1
end
local claimed, held = {}, 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', '$DUE', '-inf', now, 'LIMIT', 0, scan)) do
  if #claimed >= 2 * limit then break end
  local key = '$DELIVERY' .. id
  if redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', '$DUE', id)  -- delivered or expired meanwhile: nothing left to send
  else
    local owner, hook = owner_of(key)
    local endpoint = endpoint_of(owner, tostring(hook.url or ''))
    local state = redis.call('HMGET', '$ENDPOINT' .. endpoint, 'failures', 'open_until', 'probe_until')
    local open_until = tonumber(state[2] or '0')
    local half_open = tonumber(state[1] or '0') >= failures_max and open_until <= now
    local wait = nil
    if open_until > now then
      wait = open_until - now
    elseif (half_open and tonumber(state[3] or '0') > now) or full('$ENDPOINT_LEASES' .. endpoint, endpoint_max)
        or full('$OWNER_LEASES' .. owner, owner_max) then
      wait = math.min(hold_max, $HOLD_FIRST_S * 2 ^ tonumber(redis.call('HGET', key, 'held') or '0'))
    end
    local mode = '$SEND'
    if wait then
      local first = tonumber(redis.call('HGET', key, 'first_at') or '0')
      if first == 0 then
        first = now
        redis.call('HSET', key, 'first_at', ARGV[1])
      end
      if now < first + window then
        redis.call('ZADD', '$DUE', math.min(now + wait, first + window), id)
        redis.call('HINCRBY', key, 'held', 1)
        held = held + 1
        mode = nil
      else
        mode = '$EXPIRE'
      end
    end
    if mode then
      redis.call('ZREM', '$DUE', id)
      redis.call('ZADD', '$LEASED', lease_end, id)
      redis.call('HSET', key, 'lease', token)
      if mode == '$SEND' then
        redis.call('HSET', key, 'endpoint', endpoint)
        redis.call('HDEL', key, 'held')
        take('$ENDPOINT_LEASES' .. endpoint, id)
        take('$OWNER_LEASES' .. owner, id)
        if half_open then redis.call('HSET', '$ENDPOINT' .. endpoint, 'probe', id, 'probe_until', lease_end) end
      end
      table.insert(claimed, id)
      table.insert(claimed, mode)
    end
  end
end
return {claimed, held}
"""

# The first attempt: the body is kept (every retry sends the same bytes), the window starts, and the delivery's
# charge is its body's size. ARGV: id, token, body, event, now. Returns 1, or 0 if the claim lost the delivery.
_STARTED = """
local id, token, now = ARGV[1], ARGV[2], tonumber(ARGV[5])
local key = '$DELIVERY' .. id
if not ours(key, id, token) then return 0 end
redis.call('HSET', key, 'body', ARGV[3], 'event', ARGV[4])
redis.call('HSETNX', key, 'first_at', ARGV[5])
local owner = owner_of(key)
local ttl = redis.call('TTL', key)
if owner ~= '' and ttl > 0 then hold_put(owner, '$KIND', id, #ARGV[3], now + ttl, now, 0, 0, 0, true) end
return 1
"""

# Delivered: the delivery, its lease and its charge are gone. ARGV: id, token, now, breaker failures, cool-down.
_DELIVERED = """
local id, token, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local key = '$DELIVERY' .. id
if not ours(key, id, token) then return 0 end
local owner = owner_of(key)
release(key, id, owner, '$ANSWERED', now, tonumber(ARGV[4]), tonumber(ARGV[5]))
if owner ~= '' then hold_drop(owner, '$KIND', id) end
redis.call('DEL', key)
return 1
"""

# Another attempt at `at`. ARGV: id, token, now, breaker failures, cool-down, verdict, at, attempts, error.
_RETRY_AT = """
local id, token, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local key = '$DELIVERY' .. id
if not ours(key, id, token) then return 0 end
release(key, id, owner_of(key), ARGV[6], now, tonumber(ARGV[4]), tonumber(ARGV[5]))
redis.call('HSET', key, 'attempts', ARGV[8], 'last_error', ARGV[9], 'next_at', ARGV[7])
redis.call('ZADD', '$DUE', ARGV[7], id)
return 1
"""

# Failed for good: kept (and charged) `keep` seconds and listed; the failed index is trimmed to what is kept.
# ARGV: id, token, now, breaker failures, cool-down, verdict, reason, error, attempts, keep.
_FAILED = """
local id, token, now, keep = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[10])
local key = '$DELIVERY' .. id
if not ours(key, id, token) then return 0 end
local owner = owner_of(key)
release(key, id, owner, ARGV[6], now, tonumber(ARGV[4]), tonumber(ARGV[5]))
redis.call('HSET', key, 'state', 'failed', 'reason', ARGV[7], 'last_error', ARGV[8], 'failed_at', ARGV[3],
  'attempts', ARGV[9])
redis.call('HDEL', key, 'held')
redis.call('EXPIRE', key, keep)
redis.call('ZADD', '$FAILED', now, id)
redis.call('ZREMRANGEBYSCORE', '$FAILED', '-inf', now - keep)
if owner ~= '' then hold_renew(owner, '$KIND', id, now + keep, now) end
return 1
"""

# A delivery whose record is gone (expired) while leased: nothing to send, nothing to keep. ARGV: id.
_FORGET = """
if redis.call('EXISTS', '$DELIVERY' .. ARGV[1]) == 0 then redis.call('ZREM', '$LEASED', ARGV[1]) end
return 1
"""

# A failed delivery due again (`manage.py webhooks retry`): only one that failed for good and is still kept; its
# charge lasts as long as it is kept again, and its endpoint's circuit is closed (whoever retries it says the receiver
# is back). ARGV: id, keep, now. Returns 1, or 0 if it is not a failed delivery.
_RETRY = """
local id, keep, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local key = '$DELIVERY' .. id
if redis.call('ZSCORE', '$FAILED', id) == false or redis.call('EXISTS', key) == 0 then return 0 end
redis.call('ZREM', '$FAILED', id)
redis.call('HDEL', key, 'state', 'reason', 'failed_at', 'first_at', 'next_at')
redis.call('HINCRBY', key, 'retried', 1)
redis.call('EXPIRE', key, keep)
redis.call('ZADD', '$DUE', 0, id)
local owner, hook = owner_of(key)
redis.call('DEL', '$ENDPOINT' .. endpoint_of(owner, tostring(hook.url or '')))
if owner ~= '' then hold_renew(owner, '$KIND', id, now + keep, now) end
return 1
"""

# A delivery due now, written by Python (a batch's end; a job's end writes it in its own Lua step), charged to its
# owner with force (bounded at admission: AETHERCORE_WEBHOOK_MAX_PENDING). ARGV: id, kind, ref, webhook, event,
# queue, body ('' for none), has body, now.
_ENQUEUE = """
local id, now = ARGV[1], tonumber(ARGV[9])
local key = '$DELIVERY' .. id
redis.call('HSET', key, 'kind', ARGV[2], 'ref', ARGV[3], 'webhook', ARGV[4], 'event', ARGV[5], 'queue', ARGV[6])
if ARGV[8] == '1' then redis.call('HSET', key, 'body', ARGV[7]) end
redis.call('EXPIRE', key, $KEEP_DELIVERY_S)
redis.call('ZADD', '$DUE', 'NX', 0, id)
local owner = owner_of(key)
if owner ~= '' then hold_put(owner, '$KIND', id, #ARGV[7], now + $KEEP_DELIVERY_S, now, 0, 0, 0, true) end
return 1
"""


def _script(body: str) -> str:
    """One of the scripts above, with the prelude and the account's functions (tasks/holdings.py) in front."""
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
    source = _PRELUDE + body
    for name, value in names.items():  # longest first where one name starts another ($ENDPOINT_LEASES)
        source = source.replace(name, value)
    return with_holdings(source)


class Deliveries:
    """The deliveries in Redis (see the module's docstring). `limits`: what the dispatcher that claims through this
    store lets deliveries hold (SlotLimits.from_settings); its writes of an outcome feed the circuit breaker."""

    def __init__(self, client: redis.Redis, limits: SlotLimits | None = None) -> None:
        self.redis = client
        self.limits = limits or SlotLimits()
        self._claim = client.register_script(_script(_CLAIM))
        self._started = client.register_script(_script(_STARTED))
        self._delivered = client.register_script(_script(_DELIVERED))
        self._retry_at = client.register_script(_script(_RETRY_AT))
        self._failed = client.register_script(_script(_FAILED))
        self._forget = client.register_script(_script(_FORGET))
        self._retry = client.register_script(_script(_RETRY))
        self._enqueue = client.register_script(_script(_ENQUEUE))

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
