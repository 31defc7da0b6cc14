"""The spans of one forward pass (tracing/spans.py; nothing when tracing is off or no job of the pass is sampled).

A pass serves many jobs, each in its own trace. Each sampled job gets an `aethercore.batch` span in its trace: from
its arrival at the model's batcher to the end of the pass it joined (the batch's size, the job's wait for it, its
lane and rank). The pass itself is one `aethercore.forward` span, timed by the model process (wall clock, its pid),
linked to every sampled job's batch span and each of those linked back to it; it is a child of the first one, so a
ratio sampler that kept that job keeps its pass too. Imports tracing/ only."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from tracing import spans

# What the model process reports of a pass: (start ns, end ns, its pid), epoch nanoseconds.
PassTiming = tuple[int, int, int]


def pass_timing(executor: Any) -> PassTiming | None:
    """What the executor's model process reported of the pass this thread just ran (RemoteRuntime), if anything."""
    read = getattr(executor, "pass_timing", None)
    return read() if read is not None else None


class PassTrace:
    def __init__(self, model_id: str, index: int, size: int, jobs: list[Any]) -> None:
        self.model_id, self.index, self.size = model_id, index, size
        self.jobs = jobs  # the sampled jobs' batch spans
        self.started_ns = time.time_ns()

    @staticmethod
    def begin(model_id: str, index: int, batch: Sequence[Any]) -> PassTrace | None:
        """When a pass of `batch` (workers/batch_requests.py Request: `trace`, `arrived`, `lane`, `rank`) starts;
        None when none of its jobs is traced."""
        if not spans.on():
            return None
        traced = [request for request in batch if spans.recording(request.trace)]
        if not traced:
            return None
        wall, mono = time.time(), time.monotonic()
        opened = []
        for request in traced:
            waited = mono - request.arrived
            span = spans.start(
                "aethercore.batch",
                request.trace,
                start_ns=int((wall - waited) * 1e9),
                attributes={
                    "aethercore.model_id": model_id,
                    "aethercore.batch.size": len(batch),
                    "aethercore.batch.wait_ms": round(waited * 1000, 3),
                    "aethercore.lane": request.lane,
                    "aethercore.batch.rank": request.rank,
                },
            )
            if span is not None:
                opened.append(span)
        return PassTrace(model_id, index, len(batch), opened) if opened else None

    def end(self, timing: PassTiming | None, error: str | None = None) -> None:
        """The pass ended (`timing` from its model process, None if it reported none: crashed, or a stand-in);
        `error`: its failure's type."""
        started, ended, pid = timing if timing is not None else (self.started_ns, time.time_ns(), None)
        first = spans.traceparent(self.jobs[0])
        attributes: dict[str, Any] = {
            "aethercore.model_id": self.model_id,
            "aethercore.batch.size": self.size,
            "aethercore.model_process.instance": self.index,
        }
        if pid is not None:
            attributes["aethercore.model_process.pid"] = pid
        forward = spans.start(
            "aethercore.forward",
            first,
            start_ns=started,
            attributes=attributes,
            links=[spans.traceparent(span) for span in self.jobs],
        )
        spans.end(forward, error, end_ns=ended)
        context = forward.get_span_context() if forward is not None else None
        for span in self.jobs:
            if context is not None:
                span.add_link(context, {"aethercore.link": "forward pass"})
            spans.end(span, error, end_ns=ended)
