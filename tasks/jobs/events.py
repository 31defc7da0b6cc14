"""Hearing from a job: its event stream (`aethercore:job:{id}:events`) and the note of its end.

A running job's worker appends its chunks and status notes to the stream (workers/streams.py: `append_chunks`,
`append_status`); a reader follows it (`follow`, then `read`: tasks/jobs/follow.py, behind SSE, the WebSocket and the
/v1 streams), and the step that ends the job appends its `done` (tasks/jobs/lifecycle.py). A caller that waits for
a job's end without streaming adds its API process's reply channel to the job (`watch`: submission/submitter.py
`wait`, GET /jobs/{id}?wait), and the end's note is published there in the same step.
"""

from __future__ import annotations

from typing import Any

import redis

from tasks.jobs.codec import decode, encode
from tasks.jobs.scripts import APPEND_CHUNK, APPEND_STATUS, FOLLOW, WATCH
from tasks.names import job_events_key, job_key
from tasks.redis_client import text
from tasks.script_batch import ScriptBatch

# append_chunk.lua's outcomes.
CHUNK_APPENDED, CHUNK_SKIPPED, CHUNK_NOT_RUNNING, CHUNK_CANCELLED = 1, 0, -1, -2


class Events:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._watch = client.register_script(WATCH)
        self._follow = client.register_script(FOLLOW)
        self._append_chunk = client.register_script(APPEND_CHUNK)
        self._append_status = client.register_script(APPEND_STATUS)

    # -- waiting and following -----------------------------------------------------------------
    def watch(self, job_id: str, channel: str) -> dict[str, Any] | None:
        """The job as it stands; if it has not ended, `channel` is told when it does."""
        flat = self._watch(keys=[job_key(job_id)], args=[channel])
        if not flat:
            return None
        return decode({text(k): text(v) for k, v in zip(flat[::2], flat[1::2])})

    def follow(self, job_id: str) -> tuple[str, bool] | None:
        """Mark the job followed (its end goes into its event stream); its status and whether the stream
        exists, or None for an unknown job."""
        reply = self._follow(keys=[job_key(job_id), job_events_key(job_id)])
        return (text(reply[0]), bool(int(reply[1]))) if reply else None

    def read(self, job_id: str, last_id: str, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        """Events after `last_id` ('0-0': from the start), blocking up to `block_ms` for the first."""
        reply: Any = self.redis.xread({job_events_key(job_id): last_id}, block=max(1, block_ms), count=500)
        return [entry for _stream, entries in (reply or []) for entry in entries]

    # -- the worker's writes -------------------------------------------------------------------
    def append_chunks(self, chunks: list[tuple[str, int, dict[str, Any]]]) -> list[int]:
        """Append (job_id, index, chunk) items in one round trip (see lua/append_chunk.lua); one outcome (CHUNK_*)
        per item, in order."""
        batch = ScriptBatch(self.redis, (self._append_chunk,))
        for job_id, index, chunk in chunks:
            keys, args = [job_key(job_id), job_events_key(job_id)], [index, encode(chunk), self.ttl_s]
            # redis-py types a Script's client as a Redis; a ScriptBatch is the client it queues on (its evalsha).
            self._append_chunk(keys=keys, args=args, client=batch)  # type: ignore[arg-type]
        return [int(outcome) for outcome in batch.execute()]

    def append_status(self, job_ids: list[str], status: dict[str, Any]) -> None:
        """Add a status note to the streams of these running jobs, in one round trip."""
        batch = ScriptBatch(self.redis, (self._append_status,))
        for job_id in job_ids:
            keys, args = [job_key(job_id), job_events_key(job_id)], [encode(status), self.ttl_s]
            self._append_status(keys=keys, args=args, client=batch)  # type: ignore[arg-type]  # as append_chunks
        batch.execute()
