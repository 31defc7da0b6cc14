"""What each caller makes the service keep, accounted in one place: every object a request can leave behind in
Redis (files, batch outputs, batch records with their error lists, dead letters, webhook deliveries, idempotency
records) is charged to its owner here, by kind, in bytes and objects, and leaves the account when it is deleted or
expires. A quota per owner and kind, and one share of Redis's memory for all of them together, are checked in the
same atomic step that charges the object, so concurrent requests can never pass a check together.

```
holdings:<owner>              hash: <kind>.bytes, <kind>.count          the owner's totals
holdings:<owner>:<kind>       zset: object id -> expires at (epoch s)   what is charged, oldest expiry first
holdings:<owner>:<kind>:size  hash: object id -> bytes
holdings:total                hash: <kind>.bytes, <kind>.count, bytes   every owner's, added up
holdings:owners               zset: owner -> furthest expiry            who holds anything (the sweep walks it)
```

The account is kept by Lua functions (tasks/lua/holdings.lua) that any script charging an object includes
(`with_holdings`): a file's upload, a batch's creation and answers, a job's end that records a dead letter or a
webhook delivery, an Idempotency-Key's claim. Expired objects leave the account lazily: whenever their owner's
account of that kind is touched, and by `Holdings.sweep` (run by the batch drivers), at most SWEEP_LIMIT objects per
call.

Two ways to be charged:
* `put` refuses (nothing is written) when the object would take the owner past a quota of the kind or all held
  objects past AETHERCORE_HOLDINGS_MAX_SHARE of Redis's maxmemory: the caller answers 413/429 (`QuotaExceeded`).
* `force` records it whatever the totals (a job's end cannot be refused): the kinds charged that way are bounded
  at admission instead (a webhook's pending deliveries) or make room by evicting the owner's oldest (dead letters).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tasks.names import HOLDINGS_OWNERS, HOLDINGS_PREFIX, HOLDINGS_TOTAL
from tasks.redis_client import text

FILES = "files"  # uploaded files (`POST /v1/files`), by their size as uploaded
OUTPUTS = "outputs"  # a batch's output and error files, growing as its lines are answered
BATCHES = "batches"  # batch records, with their error lists
DEAD_LETTERS = "dead_letters"  # dead letters, with the request kept to replay them
DELIVERIES = "deliveries"  # webhook deliveries, pending or failed (kept to be retried)
IDEMPOTENCY = "idempotency"  # Idempotency-Key records (a job's id, or a stored answer)
KINDS = (FILES, OUTPUTS, BATCHES, DEAD_LETTERS, DELIVERIES, IDEMPOTENCY)

# Refusals (`put`'s and `grow`'s answers, and QuotaExceeded.reason).
OWNER_BYTES = "owner_bytes"
OWNER_COUNT = "owner_count"
TOTAL_BYTES = "total_bytes"
_REFUSAL = {-1: OWNER_BYTES, -2: OWNER_COUNT, -3: TOTAL_BYTES}

SWEEP_LIMIT = 500  # expired objects taken out of the account per call (bounded work in one Lua step)
SLACK_S = 3600  # the account's own keys outlive its furthest object by this much


@dataclass(frozen=True)
class Quota:
    """One kind's limits per owner; 0: none. `setting` names the env vars that set them (for messages)."""

    max_bytes: int = 0
    max_count: int = 0
    bytes_setting: str = ""
    count_setting: str = ""


@dataclass(frozen=True)
class Held:
    bytes: int
    count: int


class QuotaExceeded(Exception):
    """An object that would take its owner past a quota (or all held objects past their share of Redis)."""

    def __init__(self, kind: str, reason: str, quota: Quota, used: Held, size: int, total_limit: int) -> None:
        self.kind, self.reason, self.quota, self.used, self.size, self.total_limit = (
            kind,
            reason,
            quota,
            used,
            size,
            total_limit,
        )
        super().__init__(self.message())

    @property
    def global_limit(self) -> bool:
        """True when the service as a whole is full (503), not the owner (413/429)."""
        return self.reason == TOTAL_BYTES

    def message(self) -> str:
        what = _NOUNS.get(self.kind, self.kind)
        if self.reason == OWNER_BYTES:
            return (
                f"your {what} take {self.used.bytes} bytes; {self.size} more would pass {self.quota.bytes_setting}="
                f"{self.quota.max_bytes}: delete some or wait until they expire"
            )
        if self.reason == OWNER_COUNT:
            return (
                f"you keep {self.used.count} {what}, the most {self.quota.count_setting}={self.quota.max_count} "
                "allows: delete some or wait until they expire"
            )
        return (
            f"the objects every caller keeps take their whole share of Redis ({self.total_limit} bytes, "
            "AETHERCORE_HOLDINGS_MAX_SHARE of maxmemory); retry once some expire"
        )


_NOUNS = {
    FILES: "files",
    OUTPUTS: "batch output and error files",
    BATCHES: "batches",
    DEAD_LETTERS: "dead letters",
    DELIVERIES: "webhook deliveries",
    IDEMPOTENCY: "Idempotency-Key records",
}


# The account's Lua functions (tasks/lua/holdings.lua, read once). Every script that charges an object includes them
# (with_holdings) and calls them with the owner and kind it knows: keys are built here (one Redis, not a cluster, as
# for every script here).
# hold_put(owner, kind, id, size, expires_at, now, max_bytes, max_count, max_total, force) -> 1 | -1 | -2 | -3
# hold_grow(owner, kind, id, delta, now, max_bytes, max_total, force)                      -> 1 | -1 | -3
# hold_drop(owner, kind, id)                                                               -> bytes it held
# hold_prune(owner, kind, now, limit)                                                      -> objects taken out
# hold_oldest(owner, kind)                                                                 -> id or false
LUA_DIR = Path(__file__).with_name("lua")


def _script(name: str) -> str:
    """tasks/lua/<name>.lua with the account's names filled in (read once, when this module is imported)."""
    return _render((LUA_DIR / f"{name}.lua").read_text())


def _render(source: str) -> str:
    return (
        source.replace("HOLDINGS_KINDS", "{" + ", ".join(f"'{kind}'" for kind in KINDS) + "}")
        .replace("HOLDINGS_PREFIX", HOLDINGS_PREFIX)
        .replace("HOLDINGS_TOTAL", HOLDINGS_TOTAL)
        .replace("HOLDINGS_OWNERS", HOLDINGS_OWNERS)
        .replace("SLACK_S", str(SLACK_S))
    )


_LUA = _script("holdings")


def with_holdings(script: str) -> str:
    """A Lua script with the account's functions in front of it (hold_put, hold_grow, hold_drop, ...)."""
    return _LUA + script


# Entry points for Python callers (tasks/lua/holdings_*.lua, ARGV as named in each): each returns what its function
# returns.
_PUT = with_holdings(_script("holdings_put"))
_GROW = with_holdings(_script("holdings_grow"))
_DROP = with_holdings(_script("holdings_drop"))
_RENEW = with_holdings(_script("holdings_renew"))
_SWEEP = with_holdings(_script("holdings_sweep"))


def quotas_from(settings: Any) -> dict[str, Quota]:
    """Each kind's per-owner limits from the settings (config/settings.py documents each)."""
    return {
        FILES: Quota(
            settings.files_quota, settings.files_max_count, "AETHERCORE_FILES_QUOTA", "AETHERCORE_FILES_MAX_COUNT"
        ),
        OUTPUTS: Quota(settings.outputs_quota, 0, "AETHERCORE_OUTPUTS_QUOTA"),
        BATCHES: Quota(0, settings.batches_max_kept, "", "AETHERCORE_BATCHES_MAX_KEPT"),
        DEAD_LETTERS: Quota(
            settings.dead_letter_owner_quota,
            settings.dead_letter_owner_max,
            "AETHERCORE_DEAD_LETTER_OWNER_QUOTA",
            "AETHERCORE_DEAD_LETTER_OWNER_MAX",
        ),
        DELIVERIES: Quota(0, settings.webhook_max_pending, "", "AETHERCORE_WEBHOOK_MAX_PENDING"),
        IDEMPOTENCY: Quota(0, settings.idempotency_max_keys, "", "AETHERCORE_IDEMPOTENCY_MAX_KEYS"),
    }


class Holdings:
    """The account, from Python. `total_limit` (bytes for every held object together; 0: none) is read by the
    caller from Redis's maxmemory (`total_limit_for`)."""

    def __init__(self, client: redis.Redis, quotas: Mapping[str, Quota], total_limit: Any = 0) -> None:
        self.redis = client
        self.quotas = dict(quotas)
        # a number, or a callable answering one (the API's cached view of maxmemory)
        self._total_limit = total_limit
        self._put = client.register_script(_PUT)
        self._grow = client.register_script(_GROW)
        self._drop = client.register_script(_DROP)
        self._renew = client.register_script(_RENEW)
        self._sweep = client.register_script(_SWEEP)

    @property
    def total_limit(self) -> int:
        limit = self._total_limit() if callable(self._total_limit) else self._total_limit
        return int(limit or 0)

    def lua_limits(self, kind: str) -> list[int]:
        """max_bytes, max_count, max_total: the arguments a script passes to hold_put for `kind`."""
        quota = self.quotas.get(kind, Quota())
        return [quota.max_bytes, quota.max_count, self.total_limit]

    def put(self, owner: str, kind: str, object_id: str, size: int, expires_at: float, force: bool = False) -> None:
        """Charge `object_id` (or change its size and expiry); QuotaExceeded, nothing written, if it does not fit."""
        now = time.time()
        args: list[str | int] = [owner, kind, object_id, int(size), _stamp(expires_at), _stamp(now)]
        args += [*self.lua_limits(kind), int(force)]
        outcome = int(self._put(args=args))
        if outcome < 0:
            raise self.refusal(owner, kind, outcome, int(size))

    def grow(self, owner: str, kind: str, object_id: str, delta: int, force: bool = False) -> bool:
        """Add `delta` bytes to a charged object; QuotaExceeded if they do not fit; False if it is not charged."""
        quota = self.quotas.get(kind, Quota())
        args: list[str | int] = [owner, kind, object_id, int(delta), _stamp(time.time()), quota.max_bytes]
        args += [self.total_limit, int(force)]
        outcome = int(self._grow(args=args))
        if outcome < 0:
            raise self.refusal(owner, kind, outcome, int(delta))
        return outcome == 1

    def renew(self, owner: str, kind: str, object_id: str, expires_at: float) -> bool:
        return bool(self._renew(args=[owner, kind, object_id, _stamp(expires_at), _stamp(time.time())]))

    def drop(self, owner: str, kind: str, object_id: str) -> int:
        """Take an object out of the account (deleted); the bytes it held (0: it was not charged)."""
        return int(self._drop(args=[owner, kind, object_id]))

    def refusal(self, owner: str, kind: str, outcome: int, size: int) -> QuotaExceeded:
        quota = self.quotas.get(kind, Quota())
        return QuotaExceeded(
            kind, _REFUSAL[outcome], quota, self.usage(owner).get(kind, Held(0, 0)), size, self.total_limit
        )

    # -- reading -------------------------------------------------------------------------------------------------
    def usage(self, owner: str) -> dict[str, Held]:
        """The owner's bytes and objects of each kind (objects already expired may still count until swept)."""
        raw = self.redis.hgetall(f"{HOLDINGS_PREFIX}{owner}")
        return _held(raw)

    def totals(self) -> dict[str, Held]:
        return _held(self.redis.hgetall(HOLDINGS_TOTAL))

    def owners(self) -> list[str]:
        """Everyone whose account may hold something (furthest expiry not passed)."""
        return [text(o) for o in self.redis.zrangebyscore(HOLDINGS_OWNERS, time.time(), "+inf")]

    def usage_by_owner(self) -> dict[str, dict[str, Held]]:
        """`usage` of every owner `owners` lists, in two round trips whatever their number (/metrics reads it)."""
        owners = self.owners()
        if not owners:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for owner in owners:
            pipe.hgetall(f"{HOLDINGS_PREFIX}{owner}")
        return {owner: _held(raw) for owner, raw in zip(owners, pipe.execute())}

    def sweep(self, limit: int = SWEEP_LIMIT) -> int:
        """Take expired objects out of the accounts (at most `limit`), add them up again, forget owners who hold
        nothing; how many objects were taken out."""
        return int(self._sweep(args=[_stamp(time.time()), limit]))


def _held(raw: Mapping[Any, Any]) -> dict[str, Held]:
    fields = {text(k): int(v) for k, v in raw.items()}
    return {kind: Held(fields.get(f"{kind}.bytes", 0), fields.get(f"{kind}.count", 0)) for kind in KINDS}


def _stamp(value: float) -> str:
    return f"{value:.3f}"


def total_limit_for(client: redis.Redis, share: float) -> int:
    """`share` of Redis's maxmemory, in bytes; 0 when Redis has no maxmemory (nothing to protect against)."""
    info = client.info("memory")
    return int(int(info.get("maxmemory", 0) or 0) * share)
