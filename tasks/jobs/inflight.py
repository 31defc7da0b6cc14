"""What the reaper needs: who holds which running jobs, and taking back the jobs nobody will finish.

A running job is in its worker's in-flight hash (`aethercore:inflight:{worker}`: job id -> how to queue it again,
`requeue_payload`), written by the step that starts it and removed by the step that ends it (tasks/jobs/lifecycle.py).
Each worker notes the forward pass a job is in (`note_forward`: alone or shared), which decides who is charged a
crash. Used by workers/reaper.py (a dead worker's jobs: `reap`; a job its live holder dropped: `reclaim`; queued jobs
whose message is lost: `sweep_queued`), by the workers' batcher and generation loop (the pass note), and by the API
and the workers for `requeue_payload` (kept with a job until it starts, and in the in-flight hash while it runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from config.lanes import LANES
from tasks.jobs.codec import as_bytes, encode
from tasks.jobs.scripts import REAP, RECLAIM, SWEEP_QUEUED
from tasks.names import INFLIGHT_HOLDERS, inflight_key, job_key, lane_list
from tasks.redis_client import send_now_read_later, text


def requeue_payload(task: str, queue: str, kwargs: dict[str, Any]) -> bytes:
    """What the reaper needs to queue a job again: the Celery task, its queue and its arguments."""
    return encode({"task": task, "queue": queue, "kwargs": kwargs})


class Inflight:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._reap = client.register_script(REAP)
        self._reclaim = client.register_script(RECLAIM)
        self._sweep_queued = client.register_script(SWEEP_QUEUED)

    # -- the worker's note of a job's forward pass ---------------------------------------------
    def mark_forward(self, job_ids: list[str], alone: bool) -> None:
        """These running jobs are now in a forward pass, on their own or shared: if the worker dies before
        they end, only a job that was alone is charged a crash (see lua/reap.lua)."""
        self.note_forward(job_ids, alone)()

    def note_forward(self, job_ids: list[str], alone: bool) -> Callable[[], Any]:
        """mark_forward, sent without waiting: the note is on Redis's socket when this returns, ahead of the
        pass, and the returned call (made once, after the pass) reads Redis's answer. A lone job at GPU speed
        does not wait a round trip in front of the device."""
        value = "alone" if alone else "shared"
        return send_now_read_later(self.redis, [("HSET", job_key(job_id), "pass", value) for job_id in job_ids])

    # -- the reaper's reads ----------------------------------------------------------------------
    def holders(self) -> list[str]:
        """Workers that may hold in-flight jobs (dead ones included: that is what the reaper looks for)."""
        return [text(h) for h in self.redis.smembers(INFLIGHT_HOLDERS)]

    def held_by(self, worker: str) -> dict[str, bytes]:
        """The jobs `worker` holds: job id -> how to queue it again."""
        return {text(k): as_bytes(v) for k, v in self.redis.hgetall(inflight_key(worker)).items()}

    def running_since(self, job_ids: list[str]) -> list[str | None]:
        """Each job's `started_at` as stored (the running try's start, epoch seconds as text), None if gone."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(job_key(job_id), "started_at")
        return [text(v) if v is not None else None for v in pipe.execute()]

    # -- taking jobs back --------------------------------------------------------------------------
    def reap(self, dead: str) -> list[tuple[str, bytes, int]]:
        """Take the jobs a dead worker was running back to `queued` (see lua/reap.lua): (job id, payload, crashes)
        for each; nothing if the worker is alive or another reaper was first."""
        flat = self._reap(args=[dead, repr(time.time())])
        return [(text(flat[i]), as_bytes(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]

    def reclaim(self, holder: str, job_id: str, started_at: str) -> tuple[bytes, int] | None:
        """Take a job its live holder no longer works on back to `queued` (see lua/reclaim.lua): (payload, crashes),
        or None if it ended, moved or started again meanwhile."""
        reply = self._reclaim(args=[holder, job_id, repr(time.time()), started_at])
        return (as_bytes(reply[0]), int(reply[1])) if reply else None

    def sweep_queued(self, queue: str, stale_s: float, limit: int = 100) -> list[tuple[str, bytes]]:
        """Jobs of `queue` whose message is lost (see lua/sweep_queued.lua), claimed for another `stale_s`."""
        lanes = [lane_list(queue, lane) for lane in LANES]  # a message waiting in any lane is not lost
        flat = self._sweep_queued(keys=lanes, args=[queue, repr(time.time()), stale_s, limit])
        return [(text(flat[i]), as_bytes(flat[i + 1])) for i in range(0, len(flat), 2)]
