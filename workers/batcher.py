"""Dynamic batching inside the worker: many queued jobs for one model become one forward pass.

Celery task threads hand each job to the model's batcher and wait on a future. One feeder thread
per model instance (process) forms batches and sends each across to its model process in one
message; a completion thread writes each finished batch back (one Redis round trip, see
workers/service.py) and resolves its futures, so the feeder is already sending the next batch
while the last one's results are being written. As in Ray Serve's batching queue and Triton's
dynamic batcher:

* an idle model runs a lone job at once; under load a batch waits up to `max_batch_delay_ms`
  (from its first job) for as many companions as the previous batch had, or `max_batch_size`;
* jobs are only batched with jobs of equal `parameters` (e.g. the same max_length);
* the waiting jobs are sorted by input length and cut where padding would cost more than one
  more forward pass (`split_by_length`): fewer padded tokens, more sentences per second;
* `instances` feeder threads, one per model process, run batches side by side;
* priority lanes (workers/lanes.py): a job waits behind the pending jobs of its own and higher effective rank
  only; a pass that carries higher-lane jobs takes lower-lane ones only up to the size that costs what the
  higher-lane jobs' own pass would (`PassCosts`: pass times measured by size), and while higher-lane work was seen
  recently, a pass of lower lanes alone is kept short;
* if a batch fails, its jobs are retried one by one, so one bad input fails only its own job;
* if the model process dies or hangs (killed after the model's `timeout_s`), it is restarted and
  the batch's jobs are retried each on its own (workers/retry.py: only a job that crashes the model
  when run alone is charged, and after `max_attempts` such crashes it fails as `poison_job`); a
  process that cannot be restarted fails the batch (`model_process_died`) and the model is unloaded;
* when the model goes away (unload, eviction: `close(gone, drain_s)`), nothing new is taken, the jobs
  already handed over may run for `drain_s`, and those still pending then end with `gone`'s code.

Messages stay unacknowledged until their job's result is written (the task thread returns only
then), so a job waiting in a batch is redelivered if the worker dies.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from itertools import islice
from typing import Any

from loguru import logger

from tasks.names import DEFAULT_LANE
from workers.batch_requests import (
    BatchOutcome,
    Executor,
    PoisonInput,
    Request,
    ResultsNotWritten,
    input_length,
    split_by_length,
)
from workers.lanes import HIGHER_LANE_MEMORY_S, PassCosts, effective_rank
from workers.model_errors import ModelGone, ModelProcessDied, ModelTimeout, unloaded
from workers.pass_trace import PassTrace, pass_timing
from workers.retry import RetryPolicy

# How long the size of the last batch predicts the next one (beyond this the model counts as idle).
LOAD_MEMORY_S = 0.1


class ModelBatcher:
    def __init__(
        self,
        executor: Executor,
        model_id: str,
        max_batch_size: int,
        max_batch_delay_ms: float,
        *,
        on_batch: Callable[[int], None] = lambda size: None,
        on_complete: Callable[[list[Request]], None] | None = None,
        on_model_dead: Callable[[ModelGone], None] = lambda gone: None,
        on_forward: Callable[[list[Request]], AbstractContextManager[Any]] = lambda batch: nullcontext(),
        policy: RetryPolicy,
        lane_aging_s: float = 0.0,
    ) -> None:
        self.executor = executor
        self.lane_aging_s = lane_aging_s  # AETHERCORE_LANE_AGING_S: how fast a waiting job's rank rises
        self.costs = PassCosts()
        self.model_id = model_id
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_batch_delay_ms / 1000.0
        self.policy = policy  # the worker's one RetryPolicy (WorkerService.policy)
        self._on_batch = on_batch
        self._on_complete = on_complete
        self._on_model_dead = on_model_dead
        self._on_forward = on_forward
        self._pending: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._gone: ModelGone | None = None
        self._open = 0  # requests handed over and not yet completed (their futures unresolved)
        self._last_size: dict[int, int] = {}  # per effective rank: the size of the last pass it led
        self._last_end = 0.0
        self._seen: dict[int, float] = {}  # per effective rank: when a job of it was last handed over
        self._done: queue.SimpleQueue[list[Request] | None] = queue.SimpleQueue()
        count = max(1, len(executor.instances))
        self._feeders_left = count
        self._feeders = [
            threading.Thread(target=self._feed, args=(i,), name=f"batcher-{model_id}-{i}", daemon=True)
            for i in range(count)
        ]
        self._completer = threading.Thread(target=self._complete_loop, name=f"complete-{model_id}", daemon=True)
        for thread in (*self._feeders, self._completer):
            thread.start()

    def submit(
        self,
        inputs: Any,
        parameters: dict[str, Any],
        context: Any = None,
        exclusive: bool = False,
        lane: str = DEFAULT_LANE,
        submitted_at: float | None = None,
        deadline: float | None = None,
        trace: str | None = None,
    ) -> Future:
        """Queue one job's inputs; `exclusive`: it runs in a forward pass of its own. `lane`, `submitted_at` and
        `deadline` make its effective rank: it waits behind the pending jobs of its own and higher ranks only.
        `trace`: the job's traceparent (its pass is traced when it is sampled: workers/pass_trace.py)."""
        request = Request(
            inputs,
            parameters,
            json.dumps(parameters, sort_keys=True, default=str),
            input_length(inputs),
            context,
            exclusive=exclusive,
            lane=lane,
            submitted_at=submitted_at,
            deadline=deadline,
            trace=trace,
        )
        with self._cond:
            if self._closed:
                gone = self._gone or unloaded(self.model_id)
                raise ModelGone(gone.code, str(gone))
            self._enqueue(request)
            self._open += 1
            self._cond.notify()
        return request.future

    def close(
        self, gone: ModelGone | None = None, drain_s: float | None = None, refused: ModelGone | None = None
    ) -> None:
        """Take nothing new (a job handed over from now on is refused with `refused`, default `gone`). Without
        `gone`: the jobs already handed over still run. With it (the model goes away): they may run for
        `drain_s` seconds; those still pending then end with `gone` (the ones in a forward pass end when the
        runtime closes)."""
        with self._cond:
            self._closed = True
            self._gone = refused or gone
            self._cond.notify_all()
        if gone is None:
            return
        deadline = time.monotonic() + (drain_s or 0.0)
        with self._cond:
            while self._open and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            left = list(self._pending)
            self._pending.clear()
            if left:  # settled before a feeder can see the queue empty and end the completion thread
                self._settle(left, error=gone)
        if left:
            logger.bind(model_id=self.model_id).warning("{} pending job(s) ended: {}", len(left), gone.code)

    def _rank(self, request: Request, now: float) -> int:
        return effective_rank(request.lane, request.submitted_at, request.deadline, self.lane_aging_s, now)

    def _enqueue(self, request: Request) -> None:
        """Into the pending queue behind every job whose effective rank is as high as its own, ahead of the others
        (FIFO within a rank); the common case, a rank no higher than the last pending job's, is an append."""
        pending = self._pending
        now = time.time()
        rank = self._rank(request, now)
        self._seen[rank] = time.monotonic()
        at = len(pending)
        while at > 0 and self._rank(pending[at - 1], now) > rank:
            at -= 1
        pending.insert(at, request)

    # -- forming batches ----------------------------------------------------------------------
    def _target(self, rank: int) -> int:
        """How many jobs to wait for: the size of the last pass this rank led while the model is under load, else
        one."""
        if time.monotonic() - self._last_end > LOAD_MEMORY_S:
            return 1
        return max(1, min(self._last_size.get(rank, 1), self.max_batch_size))

    def _collect(self) -> list[Request] | None:
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            target = self._target(self._rank(self._pending[0], time.time()))
            deadline = self._pending[0].arrived + self.max_delay_s
            while len(self._pending) < target and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            # At most one pass's worth: other instances take the next jobs meanwhile.
            return [self._pending.popleft() for _ in range(self._take())]

    def _take(self) -> int:
        """How many pending jobs (in rank order) the next pass takes: behind the jobs of the best rank (the lead),
        lower ranks only while the pass costs what the lead's alone would; a pass without a better rank than its
        own that was seen recently, at most a short one."""
        now = time.time()
        head = list(islice(self._pending, self.max_batch_size))
        if not head:  # another instance's feeder took them meanwhile
            return 0
        for request in head:
            request.rank = self._rank(request, now)
        lead = next((i for i, r in enumerate(head) if r.rank != head[0].rank), len(head))
        if lead < len(head):
            return self.costs.fill_size(lead, len(head))
        if self._better_seen(head[0].rank):
            return min(len(head), self.costs.short_size(self.max_batch_size))
        return len(head)

    def _better_seen(self, rank: int) -> bool:
        """Whether a job of a better rank than `rank` was handed over within HIGHER_LANE_MEMORY_S."""
        since = time.monotonic() - HIGHER_LANE_MEMORY_S
        return any(at > since for better, at in self._seen.items() if better < rank)

    def _feed(self, index: int) -> None:
        try:
            while True:
                requests = self._collect()
                if requests is None:
                    return
                try:
                    self._feed_batches(index, requests)
                except Exception as exc:
                    # A bug or a failing callback: the jobs this feeder holds end (internal_error) rather than
                    # stay running, and the feeder goes on serving.
                    logger.bind(model_id=self.model_id).opt(exception=exc).error("a batcher feeder failed")
                    held = [r for r in requests if r.outcome is None and r.error is None]  # not yet completed
                    if held:
                        self._settle(held, error=exc)
        finally:
            with self._cond:
                self._feeders_left -= 1
                if self._feeders_left == 0:
                    self._done.put(None)  # the completion thread ends after the last batch

    def _feed_batches(self, index: int, requests: list[Request]) -> None:
        """Run one collected set of requests: the exclusive ones alone, the rest grouped and cut by length."""
        if not requests:
            return
        groups: dict[str, list[Request]] = {}
        for request in requests:
            if request.exclusive:
                self._run(index, [request])
                continue
            groups.setdefault(request.key, []).append(request)
        passes = []
        for group in groups.values():
            group.sort(key=lambda r: r.length)
            ends = split_by_length([r.length for r in group], self.max_batch_size)
            passes += [group[start:end] for start, end in zip([0, *ends], ends)]
        for batch in sorted(passes, key=lambda batch: min(r.rank for r in batch)):  # the best-ranked jobs first
            self._run(index, batch)
        with self._cond:
            self._last_size[requests[0].rank], self._last_end = len(requests), time.monotonic()

    # -- running them -------------------------------------------------------------------------
    def _run(self, index: int, batch: list[Request]) -> None:
        self._on_batch(len(batch))
        started = time.monotonic()
        traced = PassTrace.begin(self.model_id, index, batch)  # None unless a job of it is traced
        try:
            with self._on_forward(batch):  # entered before the pass runs, left when it has ended
                outputs = self.executor.run_batch_on(index, [r.inputs for r in batch], batch[0].parameters)
            if len(outputs) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outputs)} outputs for {len(batch)} inputs")
        except Exception as exc:
            if traced is not None:
                traced.end(None, getattr(exc, "code", None) or type(exc).__name__)
            self._failed(index, batch, exc)
            return
        if traced is not None:
            traced.end(pass_timing(self.executor))
        inference_ms = (time.monotonic() - started) * 1000
        self.costs.observe(len(batch), inference_ms / 1000)
        for request, output in zip(batch, outputs):
            request.outcome = BatchOutcome(output, len(batch), (started - request.arrived) * 1000, inference_ms)
        self._done.put(batch)

    def _failed(self, index: int, batch: list[Request], exc: Exception) -> None:
        """A pass that failed: the model went away (final), its process died or hung (the retry policy), or it raised
        (a batch's jobs tried one by one, a lone job failed)."""
        if isinstance(exc, ModelGone):  # the model went away under the batch: final, not a crash
            self._settle(batch, error=exc)
            return
        if isinstance(exc, (ModelProcessDied, ModelTimeout)):
            self._crashed(index, batch, exc)
            return
        if len(batch) == 1:
            self._settle(batch, error=exc)
            return
        logger.bind(model_id=self.model_id).info(
            "batch of {} failed ({}); retrying its jobs one by one", len(batch), exc
        )
        for request in batch:
            self._run(index, [request])

    def _crashed(self, index: int, batch: list[Request], exc: BaseException) -> None:
        """Its model process died or hung: the policy restarts it and decides each job's fate (workers/retry.py)."""
        lost = _LostPass(self, index, len(batch))
        self.policy.crashed(self.executor, self.model_id, lost, batch, exc, alone=len(batch) == 1, index=index)

    def _settle(self, batch: list[Request], error: BaseException) -> None:
        for request in batch:
            request.error = error
        self._done.put(batch)

    def _complete_loop(self) -> None:
        while True:
            batch = self._done.get()
            if batch is None:
                return
            failure: BaseException | None = None
            if self._on_complete is not None:
                try:
                    self._on_complete(batch)
                except Exception as exc:  # e.g. Redis unreachable: the task thread reports it
                    logger.bind(model_id=self.model_id).opt(exception=exc).error("writing a batch's results failed")
                    failure = ResultsNotWritten(f"writing the job's result failed ({type(exc).__name__}: {exc})")
                    failure.__cause__ = exc
            for request in batch:
                if failure is not None:
                    request.future.set_exception(failure)
                elif request.error is not None:
                    request.future.set_exception(request.error)
                else:
                    request.future.set_result(request.outcome)
            with self._cond:
                self._open -= len(batch)
                if self._closed:  # only close() waits on `_open` (draining); no wake-up per batch otherwise
                    self._cond.notify_all()


class _LostPass:
    """The batcher's side of a crash (workers/retry.py CrashSite): the jobs of a forward pass on process `index`
    end through the completion thread, or run again alone on the restarted process."""

    def __init__(self, batcher: ModelBatcher, index: int, size: int) -> None:
        self.batcher = batcher
        self.index = index
        self.size = size
        self.log = logger.bind(model_id=batcher.model_id)
        self._told = False  # the bystanders of a lost batch get one line, not one each

    def model_gone(self, lost: Sequence[Request], gone: ModelGone, dead: bool) -> list[None]:
        self.log.error("model process {} is not running again ({}); ending {} job(s)", self.index, gone.code, len(lost))
        self.batcher._settle(list(lost), error=gone)
        if dead:
            try:
                self.batcher._on_model_dead(gone)
            except Exception as dead_exc:  # e.g. Redis unreachable: the batch is settled; keep serving
                self.log.opt(exception=dead_exc).error("reporting model process {} dead failed", self.index)
        return [None for _ in lost]

    def poisoned(self, request: Request, error: dict[str, str]) -> None:
        self.batcher._settle([request], error=PoisonInput(error["message"]))

    def run_alone(self, request: Request, cause: BaseException, charged: bool) -> None:
        if charged:
            self.log.warning(
                "a job alone lost its model process ({}); retrying it ({} of {})",
                cause,
                request.crashes,
                self.batcher.policy.max_attempts,
            )
        elif not self._told:  # only the job that kills the model when run alone is to blame; the others are innocent
            self._told = True
            self.log.warning("batch of {} lost with its model process ({}); retrying each job alone", self.size, cause)
        self.batcher._run(self.index, [request])
