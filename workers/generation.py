"""Generation jobs of one message: every one joins the model's running batch at once; each ends on its own.

The model process serves text generation by continuous batching (workers/runtimes/decoding.py), so a
task thread does not run a generation: it hands each of its message's jobs to the running batch (a
/serve/batch job: each of its items) and ends each job the moment its request ends, several in one
Redis round trip when they end together. The streamed text goes from the model process's reader thread
straight to the jobs' streams (workers/streams.py); the message stays unacknowledged until every job
of it has ended, so a worker crash redelivers them and the chunk index keeps the stream exactly-once.

A crash or hang of the model process fails every request in its batch: each is tried again on a fresh
process *alone* (workers/retry.py: only a job that brings the model down when it runs alone is charged;
after `max_attempts` such crashes it fails as `poison_job`). A model that goes away (unload past its drain,
eviction, a process that cannot be restarted) ends each request with its reason; a request that cannot even
be handed over ends the same way. Nothing leaves this loop without its job's end.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any

import redis

from config.models import ModelSpec
from tasks.errors import CANCELLED, DEADLINE_EXCEEDED, error_body
from tasks.states import INFERENCE
from tracing import spans
from workers.completion import BatchItems, Ending, JobContext, classify, logged
from workers.lanes import aging_step, effective_rank
from workers.model_errors import CallCancelled, DeadlineExceeded, ModelGone, ModelProcessDied, ModelTimeout
from workers.remote_runtime import GenerationCall, RemoteRuntime
from workers.service import WorkerService
from workers.stream_target import StreamTarget


@dataclass
class _Request:
    """One request in the running batch: a job, or one item of a /serve/batch job."""

    ctx: JobContext
    inputs: Any
    item: int | None = None  # index in a batch job's items; None for a job of its own
    stream: StreamTarget | None = None
    crashes: int = 0  # crashes charged to it (only those it was alone in)
    span: Any = None  # its `aethercore.generate` span, from hand-over to end (a traced job of its own)


# What becomes of a request at each turn: its call (handed to the running batch, again after a crash: wait for
# it), its job's end, or None (an item of a batch job whose other items are still to come).
Outcome = GenerationCall | Ending | None


class _Run:
    """The generation jobs of one message, from hand-over to their ends."""

    def __init__(self, svc: WorkerService, spec: ModelSpec, runtime: RemoteRuntime) -> None:
        self.svc = svc
        self.spec = spec
        self.runtime = runtime
        self.policy = svc.policy  # the worker's one RetryPolicy
        self.batches: dict[str, BatchItems] = {}

    def run(self, contexts: list[JobContext]) -> None:
        requests: list[_Request] = []
        ended: list[Ending] = []
        now = time.perf_counter()
        for ctx in contexts:
            ctx.begin = now  # inference_ms counts from here, not from before a lazy load
            if ctx.is_batch:
                items = self.batches[ctx.job_id] = BatchItems(ctx)
                requests += [_Request(ctx, item, index) for index, item in enumerate(items.inputs)]
                if items.complete:
                    ended.append(self._batch_end(items))
            else:
                requests.append(_Request(ctx, ctx.job["inputs"]))
        waiting: dict[Future, tuple[_Request, GenerationCall]] = {}
        for request in requests:
            # A job queued again after its worker died runs alone: it may be what killed it.
            outcome = self._send(request, exclusive=request.ctx.isolate)
            if isinstance(outcome, GenerationCall):
                waiting[outcome.future] = (request, outcome)
                continue
            _end_span(request, outcome)
            if outcome is not None:
                ended.append(outcome)
        self.svc.completion.finish(INFERENCE, self.spec.id, ended)
        while waiting:
            done, _ = wait(list(waiting), return_when=FIRST_COMPLETED)
            endings = []
            for future in done:
                request, call = waiting.pop(future)
                outcome = self._settle(request, call)
                if isinstance(outcome, GenerationCall):
                    waiting[outcome.future] = (request, outcome)
                    continue
                _end_span(request, outcome, call)
                if outcome is not None:
                    endings.append(outcome)
            self.svc.completion.finish(INFERENCE, self.spec.id, endings)

    def _send(self, request: _Request, exclusive: bool) -> Outcome:
        """Hand the request to the running batch: its call when it was, else its end (as `_end` returns it)."""
        ctx = request.ctx
        if request.item is None:
            # A fresh target on every try: chunk indexes restart at 0, so what an earlier try already
            # published is skipped (by index) and readers see each chunk once.
            first = request.stream.first_piece_at if request.stream else None
            if request.span is None:
                request.span = spans.start(
                    "aethercore.generate",
                    ctx.trace,
                    attributes={"aethercore.model_id": self.spec.id, "aethercore.lane": ctx.lane},
                )
            else:  # sent again after its model process died
                spans.event(request.span, "retry", {"aethercore.exclusive": exclusive})
            request.stream = StreamTarget(
                ctx.job_id,
                self.spec.id,
                ctx.job.get("submitted_at"),
                first_piece_at=first,
                interval=self.svc.settings.stream_interval,
                span=request.span,
            )
            try:  # what the reaper charges if the worker dies now: a row alone in its batch, never a companion
                self.svc.jobs.inflight.mark_forward([ctx.job_id], alone=exclusive)
            except redis.RedisError:
                pass
        try:
            aging_s = self.svc.settings.lane_aging_s
            submitted, deadline = ctx.job.get("submitted_at"), ctx.job.get("deadline")
            return self.runtime.generate(
                request.inputs,
                ctx.parameters,
                request.stream,
                exclusive=exclusive,
                deadline=deadline,
                rank=effective_rank(ctx.lane, submitted, deadline, aging_s),
                aging_s=aging_step(submitted, deadline, aging_s),  # the running batch's admission ages by the same step
            )
        except Exception as exc:  # the model is going away, or has no process: the request ends here
            return self._end(request, classify(exc))

    def _settle(self, request: _Request, call: GenerationCall) -> Outcome:
        """The end of one request's `call`: its job's Ending, a new call if it was sent again, or None (an item
        whose batch job has more to come)."""
        ctx = request.ctx
        log = ctx.log(self.spec.id)
        try:
            output = call.future.result()
        except ModelGone as exc:
            log.info("generation ended: {}", exc)
            return self._end(request, classify(exc))
        except (ModelProcessDied, ModelTimeout) as exc:
            return self._crashed(request, call, exc)
        except CallCancelled:
            log.info("generation cancelled")
            return self.svc.completion.cancelled(ctx, error_body(CANCELLED, "the job was cancelled while it ran"))
        except DeadlineExceeded as exc:
            error = error_body(
                DEADLINE_EXCEEDED, f"{exc} (its timeout was {ctx.job['deadline'] - ctx.job['submitted_at']:.1f} s)"
            )
            if request.item is not None:
                return self._end(request, error)
            return self.svc.completion.expired(ctx, error)
        except Exception as exc:
            return self._end(request, logged(log, exc) if request.item is None else classify(exc))
        self.svc.metrics.count_tokens(self.spec.id, int(output.get("tokens", 0)))
        if request.item is not None:
            return self._item_ended(ctx, request.item, output=output)
        running = call.process.generation.get("running", 1)
        ctx.chunks = request.stream.index if request.stream is not None else None
        inference_ms = (time.perf_counter() - ctx.begin) * 1000
        return self.svc.completion.succeeded(
            self.spec,
            ctx,
            {"output": output},
            {"batch_wait_ms": 0.0, "inference_ms": round(inference_ms, 3), "batch_size": running},
        )

    def _crashed(self, request: _Request, call: GenerationCall, exc: BaseException) -> Outcome:
        """Its model process died or hung: the policy restarts it and decides its fate (workers/retry.py); charged
        only if it ran alone (`exclusive`)."""
        return self.policy.crashed(self.runtime, self.spec.id, self, [request], exc, alone=call.exclusive)[0]

    # -- the generation path's side of a crash (workers/retry.py CrashSite) ----------------------------
    def model_gone(self, lost: Sequence[_Request], gone: ModelGone, dead: bool) -> list[Outcome]:
        if dead:
            self.svc.model_died(self.spec.id, self.runtime, gone)
        return [self._end(request, classify(gone)) for request in lost]

    def poisoned(self, request: _Request, error: dict[str, str]) -> Outcome:
        return self._end(request, error)

    def run_alone(self, request: _Request, cause: BaseException, charged: bool) -> Outcome:
        request.ctx.log(self.spec.id).warning("generation lost its model process ({}); trying it again alone", cause)
        return self._send(request, exclusive=True)

    def _end(self, request: _Request, error: dict[str, str]) -> Ending | None:
        """A request failed: the job's own end, or one item's of a batch job (which ends with its last item)."""
        if request.item is None:
            return self.svc.completion.failed(request.ctx, error)
        return self._item_ended(request.ctx, request.item, error=error)

    def _item_ended(
        self, ctx: JobContext, item: int, output: Any = None, error: dict[str, str] | None = None
    ) -> Ending | None:
        """One item of a batch job ended: the job's end once it was the last, else None."""
        items = self.batches[ctx.job_id]
        return self._batch_end(items) if items.put(item, output, error) else None

    def _batch_end(self, items: BatchItems) -> Ending:
        inference_ms = (time.perf_counter() - items.ctx.begin) * 1000
        return items.ending(
            self.svc.completion, self.spec, {"inference_ms": round(inference_ms, 3), "batch_size": len(items.outputs)}
        )


def _end_span(request: _Request, outcome: Outcome, call: GenerationCall | None = None) -> None:
    """A job's generation ended (`outcome`: its Ending): its span ends with its status, chunks and running batch."""
    span = request.span
    if span is None:
        return
    request.span = None
    if request.stream is not None:
        span.set_attribute("aethercore.stream.chunks", request.stream.index)
    if call is not None:
        span.set_attribute("aethercore.generation.running", call.process.generation.get("running", 0))
    code = outcome.code if isinstance(outcome, Ending) else None
    if isinstance(outcome, Ending):
        span.set_attribute("aethercore.job.status", outcome.status)
    spans.end(span, code)


def run_generation_jobs(
    svc: WorkerService, spec: ModelSpec, runtime: RemoteRuntime, contexts: list[JobContext]
) -> None:
    _Run(svc, spec, runtime).run(contexts)
