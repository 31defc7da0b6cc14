"""Generated text into the jobs' Redis Streams: the `StreamSink` of the model processes.

A model process sends one message per decoding step holding the new text of every row in its running
batch; its reader thread hands all of it here, and it is appended in one pipelined round trip (one Lua
call per chunk: an index already published by an earlier try is skipped, a cancelled or ended job says
stop). So streaming costs one Redis round trip per step, however many streams the batch serves.
"""

from __future__ import annotations

import time

import redis
from loguru import logger

from tasks.jobs.events import CHUNK_CANCELLED, CHUNK_NOT_RUNNING, Events
from tasks.metrics import BATCH_SIZE, TIME_TO_FIRST_TOKEN, LocalMetrics
from tasks.states import QUEUED
from workers.stream_target import StreamTarget

QUEUED_NOTE = {"status": QUEUED, "reason": "waiting for room in the model's running batch"}


class JobStreams:
    def __init__(self, events: Events, metrics: LocalMetrics) -> None:
        self.events = events
        self.metrics = metrics

    def publish(self, pieces: list[tuple[StreamTarget, str]]) -> list[bool]:
        chunks = []
        for target, text in pieces:
            chunks.append((target.job_id, target.index, {"text": text}))
            target.index += 1
        try:
            outcomes = self.events.append_chunks(chunks)
        except redis.RedisError as exc:
            # The text of this step is lost to live readers; the job's result still carries all of it.
            logger.warning("cannot append {} streamed chunk(s): {}", len(chunks), exc)
            return [True] * len(pieces)
        now = time.time()
        for target, _text in pieces:
            if target.first_piece_at is None:
                target.first_piece_at = now
                if target.submitted_at:
                    self.metrics.observe(TIME_TO_FIRST_TOKEN, target.model_id, max(0.0, now - target.submitted_at))
        return [outcome not in (CHUNK_CANCELLED, CHUNK_NOT_RUNNING) for outcome in outcomes]

    def queued(self, targets: list[StreamTarget]) -> None:
        try:
            self.events.append_status([t.job_id for t in targets], QUEUED_NOTE)
        except redis.RedisError as exc:
            logger.warning("cannot note {} queued generation(s): {}", len(targets), exc)

    def stepped(self, model_id: str, stats: dict[str, int]) -> None:
        if stats.get("running"):
            self.metrics.observe(BATCH_SIZE, model_id, stats["running"])  # rows in this decoding step
