"""Generated text into the jobs' Redis Streams: the `StreamSink` of the model processes.

A model process sends one message per decoding step holding the new text of every row in its running
batch; its reader thread hands all of it here, and it is appended in one pipelined round trip (one Lua
call per chunk: an index already published by an earlier try is skipped, a cancelled or ended job says
stop). So streaming costs one Redis round trip per step, however many streams the batch serves.

Chunks Redis did not take (unreachable, a failover under way, replicas not confirming) are kept, in order, and sent
before the next step's and before any job ends (`flush`, from workers/completion.py): a chunk's index must reach
the stream before the next one's, or append_chunk.lua skips it for good, and a job that ended takes no more chunks.
A reader resuming with Last-Event-ID then gets every chunk; one that read a chunk the failover lost gets it again.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from loguru import logger

from tasks.jobs.events import CHUNK_CANCELLED, CHUNK_NOT_RUNNING, Events
from tasks.metrics import BATCH_SIZE, TIME_TO_FIRST_TOKEN, LocalMetrics
from tasks.states import QUEUED
from tracing import spans
from workers.stream_target import StreamTarget

QUEUED_NOTE = {"status": QUEUED, "reason": "waiting for room in the model's running batch"}
# Chunks kept while Redis does not take them (a few minutes of a full batch's steps); past this the oldest are
# dropped, and their text is then only in the jobs' results.
MAX_UNSENT_CHUNKS = 50_000


class JobStreams:
    def __init__(self, events: Events, metrics: LocalMetrics) -> None:
        self.events = events
        self.metrics = metrics
        self._unsent: list[tuple[str, int, dict[str, Any]]] = []
        self._lock = threading.Lock()  # chunks reach Redis in the order they were made

    def publish(self, pieces: list[tuple[StreamTarget, str]]) -> list[bool]:
        chunks = []
        for target, text in pieces:
            chunks.append((target.job_id, target.index, {"text": text}))
            target.index += 1
        with self._lock:
            waiting = len(self._unsent)
            try:
                outcomes = self._send(self._unsent + chunks)[waiting:]
            except redis.RedisError as exc:
                self._failed(chunks, exc)
                return [True] * len(pieces)
        now = time.time()
        for (target, text), (_job_id, index, _chunk) in zip(pieces, chunks):
            if target.first_piece_at is None:
                target.first_piece_at = now
                if target.submitted_at:
                    ttft = max(0.0, now - target.submitted_at)
                    exemplar = spans.traceparent(target.span)[3:35] if target.span is not None else None
                    self.metrics.observe(TIME_TO_FIRST_TOKEN, target.model_id, ttft, exemplar=exemplar)
                    if target.span is not None:
                        target.span.set_attribute("aethercore.ttft_ms", round(ttft * 1000, 3))
                spans.event(target.span, "first_token", {"aethercore.chunk.chars": len(text)}, at_s=now)
            elif target.span is not None:  # one event per chunk (a stream interval's pieces), not per token
                spans.event(
                    target.span,
                    "chunk",
                    {"aethercore.chunk.index": index, "aethercore.chunk.chars": len(text)},
                    at_s=now,
                )
        return [outcome not in (CHUNK_CANCELLED, CHUNK_NOT_RUNNING) for outcome in outcomes]

    def flush(self) -> None:
        """Send the chunks kept from earlier steps; RedisError if Redis still does not take them (the caller, about
        to end jobs, retries both)."""
        with self._lock:
            if not self._unsent:
                return
            try:
                self._send(self._unsent)
            except redis.RedisError as exc:
                self._failed([], exc)
                if self._unsent:
                    raise

    def _send(self, chunks: list[tuple[str, int, dict[str, Any]]]) -> list[int]:
        outcomes = self.events.append_chunks(chunks)
        if self._unsent:
            logger.info("sent {} streamed chunk(s) kept while Redis did not take them", len(self._unsent))
        self._unsent = []
        return outcomes

    def _failed(self, chunks: list[tuple[str, int, dict[str, Any]]], exc: redis.RedisError) -> None:
        """A lost connection or an unconfirmed write: the chunks are kept, in order. A refusal of Redis's (a damaged
        job's stream) is no reason to wait: every other call of that round trip ran, and keeping the chunks would
        hold every later step and end on this worker; they are dropped (their text stays in the results)."""
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            self._keep(chunks, exc)
            return
        logger.warning("Redis refused a streamed chunk ({}); its step's chunks are dropped from the streams", exc)
        self._unsent = []

    def _keep(self, chunks: list[tuple[str, int, dict[str, Any]]], exc: Exception) -> None:
        if not self._unsent:
            logger.warning("cannot append streamed chunks ({}); keeping them until Redis takes them", exc)
        self._unsent += chunks
        if len(self._unsent) > MAX_UNSENT_CHUNKS:
            dropped = len(self._unsent) - MAX_UNSENT_CHUNKS
            del self._unsent[:dropped]
            logger.error("dropped the {} oldest unsent streamed chunks: their text is only in the results", dropped)

    def queued(self, targets: list[StreamTarget]) -> None:
        try:
            self.events.append_status([t.job_id for t in targets], QUEUED_NOTE)
        except redis.RedisError as exc:
            logger.warning("cannot note {} queued generation(s): {}", len(targets), exc)

    def stepped(self, model_id: str, stats: dict[str, int]) -> None:
        if stats.get("running"):
            self.metrics.observe(BATCH_SIZE, model_id, stats["running"])  # rows in this decoding step
