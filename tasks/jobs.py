"""Job records in Redis: the submit-and-poll contract's source of truth.

A job is a Redis hash (`aethercore:job:{id}`) plus a Redis Stream of its events
(`aethercore:job:{id}:events`). Status transitions run as one Lua script, so a job ends
exactly once (a redelivered or cancelled job cannot be finished twice), and the `done`
event is appended in the same step: a waiter reading the stream from its start can never
miss the end of a job, however late it arrives. Both keys expire `result_ttl` seconds
after the last transition.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import redis

from tasks.names import job_events_key, job_key

QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, CANCELLED, EXPIRED = "succeeded", "failed", "cancelled", "expired"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED, EXPIRED)
STATUSES = (QUEUED, RUNNING) + TERMINAL

_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return -1 end
if current == 'succeeded' or current == 'failed' or current == 'cancelled' or current == 'expired' then
  return 0
end
if ARGV[1] == 'running' and current ~= 'queued' and current ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], unpack(ARGV, 4))
if ARGV[3] == 'done' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'type', 'done', 'status', ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
return 1
"""


def new_job_id() -> str:
    return uuid.uuid4().hex


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobNotFound(KeyError):
    pass


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._transition = client.register_script(_TRANSITION)

    # -- writes ------------------------------------------------------------------------------
    def create(self, *, kind: str, model_id: str, device: str, job_id: str | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        job_id = job_id or new_job_id()
        now = time.time()
        fields = {
            "job_id": job_id, "kind": kind, "model_id": model_id, "status": QUEUED,
            "device": device, "created_at": repr(now), "attempts": "0",
        }
        for key, value in (extra or {}).items():
            fields[key] = json.dumps(value)
        pipe = self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping=fields)
        pipe.expire(job_key(job_id), self.ttl_s)
        pipe.execute()
        return self._decode(fields)

    def mark_running(self, job_id: str, worker: str) -> bool:
        """False when the job already ended (a redelivery after the result was written, or cancelled)."""
        ok = self._run(job_id, RUNNING, "status", started_at=repr(time.time()), worker=worker)
        if ok:
            self.redis.hincrby(job_key(job_id), "attempts", 1)
        return ok

    def finish(self, job_id: str, status: str, *, result: Any = None, error: dict | None = None,
               **fields: Any) -> bool:
        """End the job once; later calls for an ended job change nothing and return False."""
        if status not in TERMINAL:
            raise ValueError(f"{status!r} is not a final status")
        values = {"finished_at": repr(time.time())}
        if result is not None:
            values["result"] = json.dumps(result)
        if error is not None:
            values["error"] = json.dumps(error)
        values.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in fields.items()})
        return self._run(job_id, status, "done", **values)

    def _run(self, job_id: str, status: str, event: str, **values: str) -> bool:
        args: list[str] = [status, str(self.ttl_s), event]
        for key, value in values.items():
            args += [key, value]
        outcome = self._transition(keys=[job_key(job_id), job_events_key(job_id)], args=args)
        if outcome == -1:
            raise JobNotFound(job_id)
        return outcome == 1

    # -- reads -------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any] | None:
        fields = self.redis.hgetall(job_key(job_id))
        return self._decode(fields) if fields else None

    def wait(self, job_id: str, timeout_s: float) -> dict[str, Any] | None:
        """Block until the job ends or `timeout_s` passes; return the job as it then stands."""
        job = self.get(job_id)
        deadline = time.monotonic() + timeout_s
        last_id = "0-0"
        while job is not None and job["status"] not in TERMINAL:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Short blocks keep each call under the socket timeout; data wakes us at once anyway.
            block_ms = max(1, int(min(remaining, 2.0) * 1000))
            reply = self.redis.xread({job_events_key(job_id): last_id}, block=block_ms, count=100)
            for _stream, entries in reply or []:
                for entry_id, data in entries:
                    last_id = entry_id
                    if data.get("type") == "done":
                        return self.get(job_id)
            if not reply:
                job = self.get(job_id)
        return job

    @staticmethod
    def _decode(fields: dict[str, str]) -> dict[str, Any]:
        def ts(name: str) -> float | None:
            return float(fields[name]) if fields.get(name) else None

        def js(name: str) -> Any:
            return json.loads(fields[name]) if fields.get(name) else None

        created, started, finished = ts("created_at"), ts("started_at"), ts("finished_at")
        return {
            "job_id": fields["job_id"],
            "kind": fields.get("kind"),
            "model_id": fields.get("model_id"),
            "status": fields.get("status"),
            "device": fields.get("device"),
            "worker": fields.get("worker"),
            "attempts": int(fields.get("attempts") or 0),
            "created_at": iso(created),
            "started_at": iso(started),
            "finished_at": iso(finished),
            "result": js("result"),
            "error": js("error"),
            "_created_ts": created,
        }
