"""Dead letters: jobs an operator should look at, kept per queue with what it takes to run them again.

A job becomes a dead letter when it ends `poison_job` (it took its model process or worker down
AETHERCORE_MAX_ATTEMPTS times), when it expired in its queue (its `timeout` passed before a worker started it), or
when its completion webhook failed for good. The first two are written by the Lua step that ends the job
(tasks/jobs.py `_TRANSITION`, with the reason the worker gives: workers/completion.py `Ending.dead_letter`), so a
dead letter exists exactly when its job ended so; the third by the webhook dispatcher (api/webhook_dispatcher.py).

Keys (tasks/names.py): `dead:<queue>` sorted set (job id -> when), trimmed to AETHERCORE_DEAD_LETTER_MAX and
AETHERCORE_DEAD_LETTER_TTL at every addition and expiring with the retention; `dead-entry:<job id>` hash per
dead letter, expiring with the retention. An entry's fields:

job_id, queue, reason (POISON / EXPIRED_IN_QUEUE / WEBHOOK_FAILED), dead_at (epoch s), kind, model_id, owner,
request_id, error (the job's error JSON, or the delivery's last error), payload (the requeue payload the job was
running with: what a replay sends again; '' when none was kept), webhook (JSON, when the job had one),
delivery_id (webhook failures), replayed_as (the job a replay created).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis

from tasks.names import (
    DEAD_LETTER_QUEUES,
    METRICS_DEAD_LETTERS,
    dead_entry_key,
    dead_letter_key,
)

POISON = "poison_job"
EXPIRED_IN_QUEUE = "expired_in_queue"
WEBHOOK_FAILED = "webhook_failed"
REASONS = (POISON, EXPIRED_IN_QUEUE, WEBHOOK_FAILED)


class DeadLetters:
    def __init__(self, client: redis.Redis, ttl_s: int, max_per_queue: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.max_per_queue = max_per_queue

    def add(self, job_id: str, queue: str, reason: str, **fields: Any) -> None:
        """Record a dead letter from Python (the webhook dispatcher); the Lua writer in tasks/jobs.py writes the
        same fields."""
        now = time.time()
        entry = {"job_id": job_id, "queue": queue, "reason": reason, "dead_at": repr(now)}
        entry.update({k: v if isinstance(v, str | bytes) else orjson.dumps(v) for k, v in fields.items() if v})
        index = dead_letter_key(queue)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(dead_entry_key(job_id), mapping=entry)
        pipe.expire(dead_entry_key(job_id), self.ttl_s)
        pipe.zadd(index, {job_id: now})
        pipe.zremrangebyscore(index, "-inf", now - self.ttl_s)
        pipe.zremrangebyrank(index, 0, -self.max_per_queue - 1)
        pipe.expire(index, self.ttl_s)
        pipe.sadd(DEAD_LETTER_QUEUES, queue)
        pipe.hincrby(METRICS_DEAD_LETTERS, f"{queue}|{reason}", 1)
        pipe.execute()

    def queues(self) -> list[str]:
        return sorted(_text(q) for q in self.redis.smembers(DEAD_LETTER_QUEUES))

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
        fields = self.redis.hgetall(dead_entry_key(job_id))
        return _decode(fields) if fields else None

    def list(
        self, queue: str | None = None, code: str | None = None, limit: int = 100, since: float | None = None
    ) -> list[dict[str, Any]]:
        """Dead letters, newest first: of one queue or all; `code` matches the reason or the error's code."""
        queues = [queue] if queue else self.queues()
        floor = max(time.time() - self.ttl_s, since or 0)
        ranked: list[tuple[float, str]] = []
        pipe = self.redis.pipeline(transaction=False)
        for name in queues:
            pipe.zrevrangebyscore(dead_letter_key(name), "+inf", floor, withscores=True)
        for found in pipe.execute():
            ranked.extend((float(score), _text(job_id)) for job_id, score in found)
        ranked.sort(reverse=True)
        out: list[dict[str, Any]] = []
        for start in range(0, len(ranked), 200):
            pipe = self.redis.pipeline(transaction=False)
            chunk = ranked[start : start + 200]
            for _score, job_id in chunk:
                pipe.hgetall(dead_entry_key(job_id))
            for fields in pipe.execute():
                if not fields:
                    continue  # expired
                entry = _decode(fields)
                if code and code not in (entry["reason"], (entry.get("error") or {}).get("code")):
                    continue
                out.append(entry)
                if len(out) >= limit:
                    return out
        return out

    def mark_replayed(self, job_id: str, new_id: str) -> None:
        self.redis.hset(dead_entry_key(job_id), "replayed_as", new_id)

    def counts(self) -> dict[tuple[str, str], int]:
        """Dead letters recorded since Redis was new, by (queue, reason): /metrics' counter."""
        out = {}
        for field, value in self.redis.hgetall(METRICS_DEAD_LETTERS).items():
            queue, _, reason = _text(field).rpartition("|")
            out[(queue, reason)] = int(value)
        return out


def _decode(fields: dict[Any, Any]) -> dict[str, Any]:
    entry = {_text(k): _text(v) for k, v in fields.items()}
    out: dict[str, Any] = {
        "job_id": entry.get("job_id"),
        "queue": entry.get("queue"),
        "reason": entry.get("reason"),
        "dead_at": float(entry["dead_at"]) if entry.get("dead_at") else None,
        "kind": entry.get("kind") or None,
        "model_id": entry.get("model_id") or None,
        "owner": entry.get("owner") or None,
        "request_id": entry.get("request_id") or None,
        "error": orjson.loads(entry["error"]) if entry.get("error") else None,
        "webhook": orjson.loads(entry["webhook"]) if entry.get("webhook") else None,
        "delivery_id": entry.get("delivery_id") or None,
        "replayed_as": entry.get("replayed_as") or None,
        "replayable": bool(entry.get("payload")) or bool(entry.get("delivery_id")),
    }
    out["_payload"] = orjson.loads(entry["payload"]) if entry.get("payload") else None
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value
