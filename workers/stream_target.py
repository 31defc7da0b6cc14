"""Where a streamed generation call's text goes: the `StreamSink` the worker service gives its model processes
(the jobs' Redis Streams, workers/streams.py), and each streamed call's `StreamTarget` (its job, its next chunk,
the pieces held until they make one).

Imports nothing of ours."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class StreamSink(Protocol):
    """Where the text of streamed generation calls goes (the worker service: the jobs' Redis Streams)."""

    def publish(self, pieces: list[tuple[StreamTarget, str]]) -> list[bool]:
        """Append each piece to its job's stream, in order; False for a job that should stop (cancelled)."""

    def queued(self, targets: list[StreamTarget]) -> None:
        """These jobs wait for room in the running batch."""

    def stepped(self, model_id: str, stats: dict[str, int]) -> None:
        """One decoding step ran with stats["running"] rows."""


@dataclass
class StreamTarget:
    """A streamed call's job: the next chunk index, when its first piece was written, and the pieces (one per
    decoding step) held until `interval` of them make a chunk. The first piece is a chunk of its own (time to
    first token), the rest go `interval` at a time, and the held ones when the call ends: the boundaries depend
    only on the piece count, so a retry that generates the same text cuts the same chunks, and the chunks an
    earlier try published are skipped by index."""

    job_id: str
    model_id: str
    submitted_at: float | None = None
    index: int = 0
    first_piece_at: float | None = None
    interval: int = 1
    held: list[str] = field(default_factory=list)
    pieces: int = 0
    span: Any = None  # its job's `aethercore.generate` span: one event per chunk (workers/streams.py)

    def add(self, piece: str) -> str | None:
        """One step's piece; the chunk to publish now, or None while it is held."""
        self.held.append(piece)
        self.pieces += 1
        return self.flush() if self.pieces == 1 or len(self.held) >= self.interval else None

    def flush(self) -> str | None:
        """The held pieces as one chunk (None when none are held)."""
        if not self.held:
            return None
        chunk = "".join(self.held)
        self.held.clear()
        return chunk
