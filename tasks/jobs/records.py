"""Creating and reading jobs: the API's part of the job store.

A job is a Redis hash (`aethercore:job:{id}`) created `queued`, counted against its caller's rate limits (and taking
its Idempotency-Key) in the same Lua step (create_limited.lua), or created with the broker message that carries it
(create_many_push.lua, submission/dispatch.py). Read by the API (GET /jobs, waits, the stream relay), the batch driver
(its lines' jobs) and the webhook dispatcher (the job a delivery reports). Its transitions are tasks/jobs/lifecycle.py.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis

from tasks.holdings import IDEMPOTENCY, Holdings, Quota
from tasks.jobs.codec import decode
from tasks.jobs.scripts import CREATE_LIMITED, CREATE_MANY_PUSH, RELEASE_KEY
from tasks.names import RECENT_JOBS, RECENT_JOBS_MAX, job_key, queued_key
from tasks.redis_client import text
from tasks.states import QUEUED


def new_job_id() -> str:
    # 128 random bits as 32 hex digits, uuid4().hex's shape without building a UUID (two ids per request).
    return secrets.token_hex(16)


class JobNotFound(KeyError):
    pass


class IdempotencyConflict(Exception):
    """An Idempotency-Key already used by this caller: `reused` False for the same request (its job is `job_id`),
    True for a different request under the same key."""

    def __init__(self, job_id: str, reused: bool) -> None:
        super().__init__(job_id)
        self.job_id = job_id
        self.reused = reused


class RateLimited(Exception):
    """The caller is over a rate limit; nothing was created."""

    def __init__(self, index: int, retry_after_ms: int) -> None:
        super().__init__(f"rate limit {index} exceeded")
        self.index = index
        self.retry_after_s = max(1, -(-max(retry_after_ms, 0) // 1000))


def job_fields(
    kind: str,
    model_id: str,
    device: str,
    request_id: str | None,
    owner: str | None,
    job_id: str,
    notify: str | None,
    now: float,
    ttl: int | None = None,
    payload: bytes | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A new queued job's hash fields."""
    fields: dict[str, Any] = {
        "job_id": job_id,
        "kind": kind,
        "model_id": model_id,
        "status": QUEUED,
        "device": device,
        "created_at": repr(now),
        "attempts": "0",
    }
    if request_id:
        fields["request_id"] = request_id
    if owner:
        fields["owner"] = owner
    if notify:
        fields["notify"] = notify
    if ttl:
        fields["ttl"] = str(int(ttl))  # this job's retention (result_ttl), honoured by every transition
    if payload:
        fields["payload"] = payload  # how to queue it again should its message be lost; dropped as it starts
    if extra:
        fields.update({k: v for k, v in extra.items() if v is not None})  # webhook, replay_of
    return fields


class Records:
    # The index of recent jobs is trimmed once per this many creations, not on every request.
    TRIM_EVERY = 256

    def __init__(self, client: redis.Redis, ttl_s: int, quotas: Mapping[str, Quota] | None = None) -> None:
        """`quotas`: each kind's per-owner limits (tasks/holdings.py quotas_from): the Idempotency-Keys a creation
        takes are charged and bounded with them."""
        self.redis = client
        self.ttl_s = ttl_s
        self.quotas = dict(quotas or {})
        self.holdings = Holdings(client, self.quotas)
        self._create_limited = client.register_script(CREATE_LIMITED)
        self._create_many_push = client.register_script(CREATE_MANY_PUSH)
        self._release_key = client.register_script(RELEASE_KEY)
        self._created = 0

    # -- creating ------------------------------------------------------------------------------
    def create(self, **fields: Any) -> dict[str, Any]:
        """Write a queued job (one round trip) with no rate limit to count; the arguments of create_limited."""
        return self.create_limited([], **fields)[0]

    def create_limited(
        self,
        limits: list[tuple[str, int, int]],
        *,
        kind: str,
        model_id: str,
        device: str,
        request_id: str | None = None,
        owner: str | None = None,
        job_id: str | None = None,
        notify: str | None = None,
        ttl: int | None = None,
        payload: bytes | None = None,
        now: float | None = None,
        extra: dict[str, Any] | None = None,
        idempotency: tuple[str, str, int, str] | None = None,
    ) -> tuple[dict[str, Any], list[int]]:
        """Count the caller against `limits` [(counter key, amount, window seconds)] and create the job, in
        one round trip; raise RateLimited (creating nothing) when a limit is already reached. Returns the job
        and the use of each limit. `idempotency`: (the key's record, the request's fingerprint, retention s, the key's
        owner): a key already used raises IdempotencyConflict (creating nothing, counting nothing); a new one past
        its owner's AETHERCORE_IDEMPOTENCY_MAX_KEYS raises QuotaExceeded (creating nothing)."""
        job_id = job_id or new_job_id()
        now = now or time.time()
        fields = job_fields(kind, model_id, device, request_id, owner, job_id, notify, now, ttl, payload, extra)
        args: list[Any] = [ttl or self.ttl_s, repr(now), job_id, len(limits)]
        for _key, amount, window in limits:
            args += [amount, window]
        max_keys = self.quotas.get(IDEMPOTENCY, Quota()).max_count
        args += [*idempotency[1:], max_keys] if idempotency else ["", "", "", ""]
        for key, value in fields.items():
            args += [key, value]
        keys = [job_key(job_id), RECENT_JOBS, queued_key(device), *(k for k, _a, _w in limits)]
        if idempotency:
            keys.append(idempotency[0])
        reply = self._create_limited(keys=keys, args=args)
        if int(reply[0]) == 0:
            raise RateLimited(int(reply[1]) - 1, int(reply[2]))
        if int(reply[0]) in (2, 3):
            raise IdempotencyConflict(text(reply[1]), reused=int(reply[0]) == 3)
        if int(reply[0]) == 4 and idempotency:
            raise self.holdings.refusal(idempotency[3], IDEMPOTENCY, int(reply[1]), 0)
        self._trim_recent(now)
        return decode(fields), [int(v) for v in reply[1:]]

    def create_and_push(
        self,
        device: str,
        queue_list: str,
        entries: list[dict[str, Any]],
        build_message: Callable[[list[int]], bytes | None],
    ) -> list[tuple[dict[str, Any], list[int]] | RateLimited]:
        """Create queued jobs bound for `device` and push their one broker message onto `queue_list`, in one round
        trip (another only when a job is refused). `entries`: create_limited's arguments (no `idempotency`), each
        with its `limits`; `build_message(indexes)`: the message carrying the entries at those indexes (and any job
        created before), None when it carries nothing. Returns per entry its job and the use of each limit, or the
        RateLimited that refused it (it is in no message)."""
        outcome: list[tuple[dict[str, Any], list[int]] | RateLimited | None] = [None] * len(entries)
        optional = {"request_id": None, "owner": None, "notify": None}  # as create_limited's defaults
        fields = [job_fields(**optional | {k: v for k, v in e.items() if k != "limits"}) for e in entries]
        live = list(range(len(entries)))
        while (message := build_message(live)) is not None:
            keys: list[Any] = [RECENT_JOBS, queued_key(device), queue_list]
            args: list[Any] = [message, len(live)]
            for at in live:
                entry, job = entries[at], fields[at]
                keys.append(job_key(job["job_id"]))
                args += [job["job_id"], job["created_at"], entry.get("ttl") or self.ttl_s, len(entry["limits"])]
                for key, amount, window in entry["limits"]:
                    keys.append(key)
                    args += [amount, window]
                args.append(len(job))
                for key, value in job.items():
                    args += [key, value]
            reply = self._create_many_push(keys=keys, args=args)
            if int(reply[0]) == 1:
                for at, used in zip(live, reply[1]):
                    self._trim_recent(float(fields[at]["created_at"]))
                    outcome[at] = (decode(fields[at]), [int(v) for v in used])
                break
            for at, verdict in zip(list(live), reply[1]):
                if verdict:
                    outcome[at] = RateLimited(int(verdict[0]) - 1, int(verdict[1]))
                    live.remove(at)
        answered = [entry for entry in outcome if entry is not None]
        if len(answered) != len(entries):
            raise ValueError("build_message carried nothing for entries neither created nor refused")
        return answered

    def release_key(self, record: str, job_id: str, owner: str) -> None:
        """Free `owner`'s Idempotency-Key record if it still names `job_id` (its creation failed after all)."""
        self._release_key(keys=[record], args=[job_id, owner])

    def _trim_recent(self, now: float) -> None:
        """Bound the recent-jobs index (by count and by the result TTL), once per TRIM_EVERY creations."""
        self._created += 1
        if self._created % self.TRIM_EVERY != 1:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyrank(RECENT_JOBS, 0, -RECENT_JOBS_MAX - 1)
        pipe.zremrangebyscore(RECENT_JOBS, "-inf", now - self.ttl_s)
        pipe.execute()

    # -- reading -------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any] | None:
        fields = self.redis.hgetall(job_key(job_id))
        return decode(fields) if fields else None

    def get_many(self, job_ids: list[str]) -> list[dict[str, Any] | None]:
        """Several jobs in one round trip, in order (None for one that is gone)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(job_key(job_id))
        return [decode(fields) if fields else None for fields in pipe.execute()]

    def recent(self, limit: int = 50, **filters: str) -> list[dict[str, Any]]:
        """Newest first; `filters` match job fields exactly (status, model_id, kind)."""
        found: list[dict[str, Any]] = []
        start, page = 0, 200
        while len(found) < limit and start < RECENT_JOBS_MAX:
            ids = self.redis.zrevrange(RECENT_JOBS, start, start + page - 1)
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(job_key(text(job_id)))
            for fields in pipe.execute():
                if not fields:
                    continue  # expired
                job = decode(fields)
                if all(job.get(k) == v for k, v in filters.items() if v is not None):
                    found.append(job)
                    if len(found) == limit:
                        break
            start += page
        return found
