"""Dead letters: jobs an operator should look at, kept per queue with what it takes to submit them again.

A job becomes a dead letter when it ends `poison_job` (it took its model process or worker down
AETHERCORE_MAX_ATTEMPTS times: an inference, load or unload job), when it expired in its queue (its `timeout` passed
before a worker started it), or when its completion webhook failed for good. The first two are written by the Lua
step that ends the job (tasks/jobs/lua/transition.lua, with the reason the worker gives: workers/completion.py
`Ending.dead_letter`), so a dead letter exists exactly when its job ended so; the third by the webhook dispatcher
(webhooks/dispatcher.py, `DeadLetters.add`). Both write it with `dead_put` (tasks/lua/dead_letters.lua), in one
atomic step with its charge.

Bounded three ways, each in the step that writes one, and each removal deletes the entry's hash with its index
entry and its charge:
* per owner (the job's caller; AETHERCORE_DEAD_LETTER_OWNER_MAX, AETHERCORE_DEAD_LETTER_OWNER_QUOTA): charged to the
  owner in tasks/holdings.py (kind DEAD_LETTERS, force: a job's end cannot be refused); an owner over either makes
  their own OLDEST dead letters leave, so a caller minting them (`timeout: 0.001`) only ever displaces their own;
* per queue (AETHERCORE_DEAD_LETTER_MAX): the queue's oldest leave;
* in time (AETHERCORE_DEAD_LETTER_TTL): the hash and the charge expire together, the index entry leaves at the next
  write.
Only a job that ends as a dead letter pays for any of it.

Keys (tasks/names.py): `dead:<queue>` sorted set (job id -> when); `dead-entry:<job id>` hash per dead letter:

job_id, queue, reason (POISON / EXPIRED_IN_QUEUE / WEBHOOK_FAILED), dead_at (epoch s), owner, role (the owner's, as
it submitted), kind (inference / load / unload), model_id, request_id, error (the job's error JSON, or the delivery's
last error), request (the job's submission, JSON: for an inference its inputs, parameters, `priority` lane,
`deadline` - `submitted_at` (the timeout's length), `encoding_format`, `batch`; for a load or unload its `force`),
result_ttl (when the job asked for its own retention), webhook (JSON {url, owner}, when the job had one),
delivery_id (webhook failures), replayed_as (the job a replay created).

A replay is a new submission of the owner (submission/replay.py, `Submission`), never the kept message pushed again.
Entries written before this shape (a `payload` field: the Celery message, and no role) are listed but answer 409
`not_replayable`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from tasks.holdings import DEAD_LETTERS, Quota, with_holdings
from tasks.names import (
    DEAD_ENTRY_PREFIX,
    DEAD_LETTER_PREFIX,
    DEAD_LETTER_QUEUES,
    DEFAULT_LANE,
    METRICS_DEAD_LETTERS,
    dead_entry_key,
    dead_letter_key,
)
from tasks.redis_client import text
from tasks.states import INFERENCE, JOB_KINDS

POISON = "poison_job"
EXPIRED_IN_QUEUE = "expired_in_queue"
WEBHOOK_FAILED = "webhook_failed"
REASONS = (POISON, EXPIRED_IN_QUEUE, WEBHOOK_FAILED)

# The owner a dead letter of a job without one is charged to (auth off: every caller is `anonymous`).
NO_OWNER = "anonymous"
# Bytes charged for an entry besides its fields' values (the hash, its field names, the index entry).
ENTRY_OVERHEAD = 256
# Most dead letters one write removes for each bound (so a lowered cap converges over a few writes, in bounded steps).
TRIM_STEP = 100
# Fields a listing reads (not the request: it may be megabytes, and only a replay needs it).
_LISTED = (
    "job_id",
    "queue",
    "reason",
    "dead_at",
    "kind",
    "model_id",
    "owner",
    "role",
    "request_id",
    "error",
    "webhook",
    "delivery_id",
    "replayed_as",
)

# The dead letter's Lua (tasks/lua/dead_letters.lua), for any script that writes one (with the account's functions:
# `with_holdings`).
# dead_request(payload)                                    -> the job's submission out of its requeue payload, or ''
# dead_put(job_id, queue, reason, now, owner, limits, fields) : writes it, charges it, trims owner and queue
#   limits: "retention per_queue owner_bytes owner_count" (`limits_arg`); fields: name, value, ... (empty skipped)
LUA_DIR = Path(__file__).with_name("lua")
LUA = (LUA_DIR / "dead_letters.lua").read_text()  # read once; `render` fills its names in


def render(source: str) -> str:
    """The dead letter's names and bounds filled into Lua (LUA, and the scripts that include it)."""
    return (
        source.replace("DEAD_ENTRY_PREFIX", DEAD_ENTRY_PREFIX)
        .replace("DEAD_LETTER_PREFIX", DEAD_LETTER_PREFIX)
        .replace("DEAD_LETTER_QUEUES", DEAD_LETTER_QUEUES)
        .replace("METRICS_DEAD_LETTERS", METRICS_DEAD_LETTERS)
        .replace("DEAD_LETTERS_KIND", DEAD_LETTERS)
        .replace("NO_OWNER", NO_OWNER)
        .replace("ENTRY_OVERHEAD", str(ENTRY_OVERHEAD))
        .replace("TRIM_STEP", str(TRIM_STEP))
    )


def limits_arg(ttl_s: int, max_per_queue: int, quota: Quota) -> str:
    """dead_put's `limits`: the retention, the most per queue, and the owner's bytes and count (0: none)."""
    return f"{int(ttl_s)} {int(max_per_queue)} {int(quota.max_bytes)} {int(quota.max_count)}"


# ARGV: job id, queue, reason, limits, owner, then field/value pairs (tasks/lua/dead_letters_add.lua).
_ADD = with_holdings(render(LUA + (LUA_DIR / "dead_letters_add.lua").read_text()))

# A replay's new job, noted on a dead letter that is still kept (one that expired is not written again: it would
# outlive its retention). KEYS: the entry. ARGV: the new job's id.
_MARK_REPLAYED = (LUA_DIR / "dead_letters_mark_replayed.lua").read_text()


class NotReplayable(Exception):
    """A dead letter that kept too little to be submitted again (the message says why)."""


@dataclass(frozen=True)
class Submission:
    """What a dead letter keeps to submit its request again, as its owner would (submission/replay.py)."""

    kind: str  # inference, load or unload
    model_id: str
    owner: str
    role: str
    lane: str = DEFAULT_LANE
    inputs: Any = None
    parameters: dict[str, Any] = field(default_factory=dict)
    batch: bool = False  # many inputs in one job (/serve/batch, a /v1 request with a list)
    timeout_s: float | None = None  # the length of the original deadline (a replay gets a fresh one)
    encoding_format: str | None = None
    result_ttl: int | None = None
    webhook_url: str | None = None
    force: bool = False  # an unload that ends the model's running jobs at once

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> Submission:
        """The submission a dead letter (`DeadLetters.get`) kept; NotReplayable if it kept too little."""
        job_id = entry.get("job_id")
        if entry.get("_legacy"):
            raise NotReplayable(
                f"{job_id} was recorded by an older version, which kept the Celery message but not its owner's "
                "role: it cannot be submitted as its owner; its owner can submit the request again"
            )
        raw, kind, role = entry.get("_request"), entry.get("kind"), entry.get("role")
        if not raw or not role or kind not in JOB_KINDS or not entry.get("model_id"):
            raise NotReplayable(f"{job_id}: its request was not kept; nothing to replay")
        request = orjson.loads(raw)
        hook = entry.get("webhook") or {}
        common = {
            "kind": kind,
            "model_id": entry["model_id"],
            "owner": entry.get("owner") or NO_OWNER,
            "role": role,
            "webhook_url": hook.get("url"),
            "result_ttl": entry.get("result_ttl"),
        }
        if kind != INFERENCE:
            return cls(**common, force=bool(request.get("force")))
        deadline, submitted = request.get("deadline"), request.get("submitted_at")
        return cls(
            **common,
            lane=request.get("priority") or DEFAULT_LANE,
            inputs=request.get("inputs"),
            parameters=request.get("parameters") or {},
            batch=bool(request.get("batch")),
            timeout_s=float(deadline) - float(submitted) if deadline and submitted else None,
            encoding_format=request.get("encoding_format"),
        )


class DeadLetters:
    def __init__(self, client: redis.Redis, ttl_s: int, max_per_queue: int, quota: Quota | None = None) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.max_per_queue = max_per_queue
        self.limits = limits_arg(ttl_s, max_per_queue, quota or Quota())
        self._add = client.register_script(_ADD)
        self._mark_replayed = client.register_script(_MARK_REPLAYED)

    def add(self, job_id: str, queue: str, reason: str, **fields: Any) -> None:
        """Record a dead letter from Python (the webhook dispatcher); the Lua end of a job (tasks/jobs/) writes the
        same fields, with the same bounds and charge."""
        owner = fields.pop("owner", None) or NO_OWNER
        flat: list[Any] = []
        for name, value in fields.items():
            if value:
                flat += [name, value if isinstance(value, str | bytes) else orjson.dumps(value)]
        self._add(args=[job_id, queue, reason, self.limits, owner, *flat])

    def queues(self) -> list[str]:
        return sorted(text(q) for q in self.redis.smembers(DEAD_LETTER_QUEUES))

    def depth(self) -> dict[str, int]:
        """Dead letters kept per queue (within the retention)."""
        queues = self.queues()
        if not queues:
            return {}
        since = time.time() - self.ttl_s
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.zcount(dead_letter_key(queue), since, "+inf")
        return {queue: int(n) for queue, n in zip(queues, pipe.execute())}

    def get(self, job_id: str) -> dict[str, Any] | None:
        """One dead letter, with what a replay needs (`Submission.from_entry`)."""
        fields = self.redis.hgetall(dead_entry_key(job_id))
        if not fields:
            return None
        entry = {text(k): text(v) for k, v in fields.items()}
        out = _decode(entry)
        out["_request"] = entry.get("request") or None
        out["_legacy"] = bool(entry.get("payload")) and not entry.get("request")
        return out

    def list(
        self,
        queue: str | None = None,
        code: str | None = None,
        limit: int = 100,
        since: float | None = None,
        before: float | None = None,
    ) -> list[dict[str, Any]]:
        """Dead letters, newest first: of one queue or all; `code` matches the reason or the error's code; `before`
        (exclusive, epoch s) pages on from the last one of a previous page."""
        queues = [queue] if queue else self.queues()
        floor = max(time.time() - self.ttl_s, since or 0)
        ceiling = f"({before!r}" if before is not None else "+inf"
        ranked: list[tuple[float, str]] = []
        pipe = self.redis.pipeline(transaction=False)
        for name in queues:
            pipe.zrevrangebyscore(dead_letter_key(name), ceiling, floor, withscores=True)
        for found in pipe.execute():
            ranked.extend((float(score), text(job_id)) for job_id, score in found)
        ranked.sort(reverse=True)
        out: list[dict[str, Any]] = []
        for start in range(0, len(ranked), 200):
            pipe = self.redis.pipeline(transaction=False)
            chunk = ranked[start : start + 200]
            for _score, job_id in chunk:
                pipe.hmget(dead_entry_key(job_id), _LISTED)
                pipe.hstrlen(dead_entry_key(job_id), "request")
            replies = pipe.execute()
            for values, request_bytes in zip(replies[::2], replies[1::2]):
                if values[0] is None:
                    continue  # expired
                entry = {name: text(v) for name, v in zip(_LISTED, values) if v is not None}
                entry["request"] = "kept" if request_bytes else ""
                decoded = _decode(entry)
                if code and code not in (decoded["reason"], (decoded.get("error") or {}).get("code")):
                    continue
                out.append(decoded)
                if len(out) >= limit:
                    return out
        return out

    def mark_replayed(self, job_id: str, new_id: str) -> None:
        self._mark_replayed(keys=[dead_entry_key(job_id)], args=[new_id])

    def counts(self) -> dict[tuple[str, str], int]:
        """Dead letters recorded since Redis was new, by (queue, reason): /metrics' counter."""
        out = {}
        for field_name, value in self.redis.hgetall(METRICS_DEAD_LETTERS).items():
            queue, _, reason = text(field_name).rpartition("|")
            out[(queue, reason)] = int(value)
        return out


def _decode(entry: Mapping[str, str]) -> dict[str, Any]:
    return {
        "job_id": entry.get("job_id"),
        "queue": entry.get("queue"),
        "reason": entry.get("reason"),
        "dead_at": float(entry["dead_at"]) if entry.get("dead_at") else None,
        "kind": entry.get("kind") or None,
        "model_id": entry.get("model_id") or None,
        "owner": entry.get("owner") or None,
        "role": entry.get("role") or None,
        "request_id": entry.get("request_id") or None,
        "error": orjson.loads(entry["error"]) if entry.get("error") else None,
        "webhook": orjson.loads(entry["webhook"]) if entry.get("webhook") else None,
        "result_ttl": int(entry["result_ttl"]) if entry.get("result_ttl") else None,
        "delivery_id": entry.get("delivery_id") or None,
        "replayed_as": entry.get("replayed_as") or None,
        "replayable": bool(entry.get("delivery_id")) or bool(entry.get("request") and entry.get("role")),
    }
