"""Follow a job's event stream (Redis Stream per job): replay from any id, then live, until `done`.

Any number of readers, joining at any time, each get every chunk exactly once and in order,
because they read the same append-only stream from where they stand.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tasks.jobs import TERMINAL, JobStore
from tasks.names import job_events_key

POLL_MS = 250


@dataclass
class Event:
    kind: str  # chunk | done | keepalive
    id: str
    data: dict[str, Any]


def follow_job(jobs: JobStore, job_id: str, last_id: str = "0-0", alive: Callable[[], bool] = lambda: True,
               keepalive_s: float | None = None) -> Iterator[Event]:
    """Yield chunk events after `last_id`, then one `done` event carrying the finished job.

    Stops early (without `done`) once `alive()` turns false; yields `keepalive` events every
    `keepalive_s` of silence when asked.
    """
    silent_ms = 0
    while alive():
        entries = jobs.events(job_id, last_id, POLL_MS)
        if not entries:
            silent_ms += POLL_MS
            if keepalive_s and silent_ms >= keepalive_s * 1000:
                silent_ms = 0
                yield Event("keepalive", last_id, {})
            job = jobs.get(job_id)
            # A job whose stream expired (or never had a done event) still ends the stream.
            if job is None or (job["status"] in TERMINAL and not jobs.redis.exists(job_events_key(job_id))):
                if job is not None:
                    yield Event("done", last_id, job)
                return
            continue
        silent_ms = 0
        for entry_id, data in entries:
            last_id = entry_id
            if data.get("type") == "chunk":
                yield Event("chunk", entry_id, {"index": int(data["index"]), **json.loads(data["data"])})
            elif data.get("type") == "done":
                yield Event("done", entry_id, jobs.get(job_id) or {"job_id": job_id, "status": data.get("status")})
                return
