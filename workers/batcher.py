"""Dynamic batching inside the worker: many queued jobs for one model become one forward pass.

Task threads hand their request to the model's batcher and wait on a future; one batching
thread per model forms batches and runs them, as Ray Serve's batching queue and Triton's
dynamic batcher do:

* a batch closes when it holds `max_batch_size` jobs or `max_batch_delay_ms` after its first
  job arrived, whichever comes first (a lone job is never held back longer than the delay);
* jobs are only batched with jobs of equal `parameters` (e.g. the same max_length);
* the waiting jobs are sorted by input length and cut where padding would cost more than one
  more forward pass (`split_by_length`): fewer padded tokens, more sentences per second;
* `instances` batching threads (Triton's instance count) run forward passes side by side, each
  with its share of the intra-op threads: two single-threaded forwards on two cores degrade far
  more gracefully than one two-threaded forward when the cores are shared with other processes;
* if a batch fails, its jobs are retried one by one, so one bad input fails only its own job;
* the thread that runs the forward pass sets torch's intra-op threads for itself (the setting
  is per thread; see workers/runtimes/base.py).

Messages stay unacknowledged until their job's result is written (the task thread returns only
then), so a job waiting in a batch is redelivered if the worker dies.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from loguru import logger

from workers.runtimes.base import Runtime

# The fixed cost of one forward pass, in characters of input (~40 tokens): measured on minilm, a
# batch-1 forward costs about as much as 40 more padded tokens in a larger batch.
FORWARD_OVERHEAD_CHARS = 200


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


@dataclass
class BatchOutcome:
    output: dict[str, Any]
    batch_size: int
    batch_wait_ms: float
    inference_ms: float


@dataclass
class _Request:
    inputs: Any
    parameters: dict[str, Any]
    key: str
    length: int
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


def _length(inputs: Any) -> int:
    if isinstance(inputs, dict) and isinstance(inputs.get("text"), str):
        return len(inputs["text"])
    return 0


class ModelBatcher:
    def __init__(self, runtime: Runtime, max_batch_size: int, max_batch_delay_ms: float, instances: int = 1,
                 setup_thread: Callable[[], None] = lambda: None,
                 on_batch: Callable[[int], None] = lambda size: None) -> None:
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_batch_delay_ms / 1000.0
        self._setup_thread = setup_thread
        self._on_batch = on_batch
        self._pending: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"batcher-{runtime.spec.id}-{i}", daemon=True)
                         for i in range(instances)]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: Any, parameters: dict[str, Any]) -> Future:
        request = _Request(inputs, parameters, json.dumps(parameters, sort_keys=True, default=str), _length(inputs))
        with self._cond:
            if self._closed:
                raise RuntimeError(f"model {self.runtime.spec.id!r} was unloaded")
            self._pending.append(request)
            self._cond.notify()
        return request.future

    def close(self) -> None:
        """Stop after the jobs already handed over have run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- the batching thread -----------------------------------------------------------------
    def _collect(self) -> list[_Request] | None:
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._pending[0].arrived + self.max_delay_s
            while len(self._pending) < self.max_batch_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            # At most one batch: other instances take the next jobs meanwhile.
            take = min(len(self._pending), self.max_batch_size)
            return [self._pending.popleft() for _ in range(take)]

    def _loop(self) -> None:
        self._setup_thread()  # e.g. torch's intra-op threads, a per-thread setting
        while True:
            requests = self._collect()
            if requests is None:
                return
            groups: dict[str, list[_Request]] = {}
            for request in requests:
                groups.setdefault(request.key, []).append(request)
            for group in groups.values():
                group.sort(key=lambda r: r.length)
                start = 0
                for end in split_by_length([r.length for r in group], self.max_batch_size):
                    self._run(group[start:end])
                    start = end

    def _run(self, batch: list[_Request]) -> None:
        self._on_batch(len(batch))
        started = time.monotonic()
        try:
            outputs = self.runtime.run_batch([r.inputs for r in batch], batch[0].parameters)
            if len(outputs) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outputs)} outputs for {len(batch)} inputs")
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            logger.bind(model_id=self.runtime.spec.id).info(
                "batch of {} failed ({}); retrying its jobs one by one", len(batch), exc)
            for request in batch:
                self._run([request])
            return
        inference_ms = (time.monotonic() - started) * 1000
        for request, output in zip(batch, outputs):
            request.future.set_result(BatchOutcome(output, len(batch), (started - request.arrived) * 1000,
                                                   inference_ms))
