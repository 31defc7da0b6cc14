"""What a model's batcher (workers/batcher.py) works with: a job handed to it (`Request`) and what its pass gave
(`BatchOutcome`), where its batches run (`Executor`), how a pass's failure is told apart (`PoisonInput`,
`ResultsNotWritten`), and where the waiting jobs, sorted by length, are cut into passes (`split_by_length`).

Imports tasks/ and workers/retry.py only."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from tasks.errors import POISON_JOB
from tasks.names import DEFAULT_LANE
from workers.retry import Revivable

# The fixed cost of one forward pass, in characters of input (~80 tokens): measured on minilm (2 cores), a
# batch-1 forward costs about as much as 60-80 more padded tokens in a larger batch (~8 ms).
FORWARD_OVERHEAD_CHARS = 400


def split_by_length(lengths: list[int], max_size: int, overhead: int = FORWARD_OVERHEAD_CHARS) -> list[int]:
    """Cut points for `lengths` (sorted ascending) that minimise padded size + overhead per batch.

    A batch costs (its size x its longest input) + `overhead`; dynamic programming over the sorted
    lengths finds the cheapest cuts with at most `max_size` per batch. Returns the end index of
    each batch.
    """
    n = len(lengths)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - max_size), end):
            cost = best[start] + (end - start) * lengths[end - 1] + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    ends, end = [], n
    while end > 0:
        ends.append(end)
        end = cut[end]
    return ends[::-1]


class Executor(Revivable, Protocol):
    """Where batches run: RemoteRuntime (model processes), or a stand-in in unit tests."""

    instances: list[Any]

    def run_batch_on(self, index: int, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]: ...


class PoisonInput(RuntimeError):
    code = POISON_JOB


class ResultsNotWritten(RuntimeError):
    """The completion could not write a batch's ends: the jobs' task threads must end them (not a job's own
    failure, which the completion did write)."""


@dataclass
class BatchOutcome:
    output: Any
    batch_size: int
    batch_wait_ms: float
    inference_ms: float


@dataclass
class Request:
    inputs: Any
    parameters: dict[str, Any]
    key: str
    length: int
    context: Any = None
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    crashes: int = 0
    exclusive: bool = False
    lane: str = DEFAULT_LANE  # its priority lane, with the times its urgency grows by (workers/lanes.py)
    submitted_at: float | None = None
    deadline: float | None = None
    rank: int = 1  # its effective rank when its pass was formed (0 high .. 2 low)
    outcome: BatchOutcome | None = None
    error: BaseException | None = None
    trace: str | None = None  # its job's traceparent (workers/pass_trace.py)


def input_length(inputs: Any) -> int:
    """A job's input length in characters (a text job's), what its pass is cut by; 0 for any other input."""
    if isinstance(inputs, dict) and isinstance(inputs.get("text"), str):
        return len(inputs["text"])
    return 0
