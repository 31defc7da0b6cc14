"""The worker <-> model process contract (workers/wire.py): every message kind is sent to the end that receives it,
and that end handles it (no process is started: both ends are driven through a stand-in pipe)."""

from __future__ import annotations

import os
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from workers import wire
from workers.cache import ModelLoadError
from workers.model_errors import CallCancelled, DeadlineExceeded, ModelProcessError
from workers.model_host import _Host
from workers.model_process import ModelProcess, _Call
from workers.runtimes.base import InvalidInput
from workers.stream_target import StreamTarget


class Pipe:
    """One end of the pipe: what it will receive, and what was sent through it."""

    def __init__(self, incoming: list[tuple]) -> None:
        self.incoming = list(incoming)
        self.sent: list[tuple] = []

    def recv(self) -> tuple:
        if not self.incoming:
            raise EOFError
        return self.incoming.pop(0)

    def poll(self, timeout: float | None = None) -> bool:
        return bool(self.incoming)

    def send(self, message: tuple) -> None:
        self.sent.append(message)


class BatchRuntime:
    def run_batch(self, inputs, parameters):
        for item in inputs:
            if item.get("text") == "bad":
                raise InvalidInput("bad input")
        return [{"echo": item["text"]} for item in inputs]


class Scheduler:
    def __init__(self) -> None:
        self.added, self.cancelled = [], []

    def has_work(self) -> bool:
        return False

    def add(self, sequence) -> None:
        self.added.append(sequence)

    def cancel(self, key) -> None:
        self.cancelled.append(key)


class GenerationRuntime:
    def __init__(self) -> None:
        self.scheduler = Scheduler()

    def continuous_batcher(self) -> Scheduler:
        return self.scheduler

    def sequence(self, call_id, inputs, parameters, **options):
        return (call_id, inputs, options)


def host(runtime, incoming: list[tuple]) -> tuple[_Host, Pipe]:
    pipe = Pipe(incoming)
    h = _Host(pipe, SimpleNamespace(id="m", task="feature-extraction"), None, "cpu", 1)
    h.runtime = runtime
    return h, pipe


# -- the model process's end: every kind the worker sends ---------------------------------------------------
def test_a_batch_model_handles_every_message_the_worker_sends():
    handled = {
        wire.RUN: [wire.run(1, [{"text": "a"}], {}), wire.run(2, [{"text": "bad"}], {})],
        wire.GENERATE: [wire.generate(3, {"text": "x"}, {}, {})],
        wire.CANCEL: [wire.cancel(1)],
        wire.EXIT: [wire.exit_(), wire.run(9, [{"text": "never"}], {})],
    }
    assert set(handled) == set(wire.TO_HOST)
    h, pipe = host(BatchRuntime(), [m for kind in wire.TO_HOST for m in handled[kind]])
    h.serve()
    assert pipe.sent == [
        wire.result(1, [{"echo": "a"}], pipe.sent[0][3]),  # with the pass as the process timed it
        wire.error(2, wire.INVALID_INPUT, "bad input"),
        pipe.sent[2],  # GENERATE to a batch model: refused with an error naming it
    ]
    started, ended, pid = pipe.sent[0][3]
    assert started <= ended and pid == os.getpid()
    assert pipe.sent[2][:3] == (wire.ERROR, 3, wire.FAILURE) and "not served" in pipe.sent[2][3]
    assert pipe.incoming == [wire.run(9, [{"text": "never"}], {})]  # EXIT ended the loop


def test_a_generation_model_handles_every_message_the_worker_sends():
    runtime = GenerationRuntime()
    handled = {
        wire.GENERATE: [wire.generate(1, {"text": "x"}, {"max_length": 2}, {"stream": True})],
        wire.CANCEL: [wire.cancel(1)],
        wire.RUN: [wire.run(2, [{"text": "a"}], {})],
        wire.EXIT: [wire.exit_(), wire.cancel(7)],
    }
    assert set(handled) == set(wire.TO_HOST)
    h, pipe = host(runtime, [m for kind in wire.TO_HOST for m in handled[kind]])
    h.serve()
    assert runtime.scheduler.added == [(1, {"text": "x"}, {"stream": True})]
    assert runtime.scheduler.cancelled == [1]
    assert len(pipe.sent) == 1 and pipe.sent[0][:3] == (wire.ERROR, 2, wire.FAILURE)  # RUN is not served
    assert pipe.incoming == [wire.cancel(7)]


# -- the worker's end: every kind the model process sends ---------------------------------------------------
class Sink:
    def __init__(self, keep: bool = True) -> None:
        self.pieces, self.waiting, self.steps, self.keep = [], [], [], keep

    def publish(self, pieces):
        self.pieces += [(target.job_id, text) for target, text in pieces]
        return [self.keep] * len(pieces)

    def queued(self, targets):
        self.waiting += [t.job_id for t in targets]

    def stepped(self, model_id, stats):
        self.steps.append(stats)


def process(sink: Sink | None = None) -> tuple[ModelProcess, Pipe]:
    spec = SimpleNamespace(id="m", timeout_s=60, kv_cache_memory=None, instances=1)
    proc = ModelProcess(spec, None, "cpu", 0, sink)
    pipe = Pipe([])
    proc._conn = pipe
    return proc, pipe


def call(proc: ModelProcess, call_id: int, stream: StreamTarget | None = None) -> Future:
    future: Future = Future()
    proc._calls[call_id] = _Call(future, stream)
    return future


def test_the_worker_handles_every_call_end_the_model_process_sends():
    proc, _pipe = process()
    ends = {
        wire.RESULT: (wire.result(1, {"ok": 1}), lambda f: f.result() == {"ok": 1}),
        wire.CANCELLED: (wire.cancelled(2), lambda f: isinstance(f.exception(), CallCancelled)),
        wire.ERROR: (wire.error(3, wire.FAILURE, "boom"), lambda f: type(f.exception()) is ModelProcessError),
    }
    assert set(ends) == set(wire.CALL_ENDS)
    errors = {
        wire.INVALID_INPUT: InvalidInput,
        wire.DEADLINE: DeadlineExceeded,
        wire.FAILURE: ModelProcessError,
    }
    assert set(errors) == set(wire.ERROR_KINDS)
    for call_id, (message, check) in enumerate(ends.values(), start=1):
        future = call(proc, call_id)
        proc._settle(message)
        assert future.done() and check(future), message
    for call_id, (kind, exc_type) in enumerate(errors.items(), start=10):
        future = call(proc, call_id)
        proc._settle(wire.error(call_id, kind, "why"))
        assert type(future.exception()) is exc_type and str(future.exception()) == "why"


def test_the_worker_handles_every_event_of_a_decoding_step():
    sink = Sink(keep=False)  # the job was cancelled: the worker asks the model process to drop the row
    proc, pipe = process(sink)
    streamed = call(proc, 1, StreamTarget("job-1", "m"))
    ended = call(proc, 2)
    events = {
        wire.CHUNK: wire.chunk(1, "Hello"),
        wire.QUEUED: wire.queued(1),
        wire.RESULT: wire.result(2, {"text": "done"}),
        wire.ERROR: wire.error(1, wire.DEADLINE, "late"),
        wire.CANCELLED: wire.cancelled(99),  # a call already gone: ignored
    }
    assert set(events) == set(wire.EVENT_KINDS)
    proc._route_events(list(events.values()))
    assert sink.pieces == [("job-1", "Hello")] and sink.waiting == ["job-1"]
    assert pipe.sent == [wire.cancel(1)]
    assert ended.result() == {"text": "done"}
    assert isinstance(streamed.exception(), DeadlineExceeded)


def test_streamed_pieces_go_out_first_alone_then_interval_at_a_time_and_the_rest_at_the_end():
    sink = Sink()
    proc, _pipe = process(sink)
    future = call(proc, 1, StreamTarget("job-1", "m", interval=3))
    for step in range(8):  # one piece per decoding step
        proc._route_events([wire.chunk(1, f"t{step} ")])
    assert sink.pieces == [("job-1", "t0 "), ("job-1", "t1 t2 t3 "), ("job-1", "t4 t5 t6 ")]
    proc._route_events([wire.chunk(1, "t8 "), wire.result(1, {"text": "all"})])  # the end flushes what is held
    assert sink.pieces[3:] == [("job-1", "t7 t8 ")] and future.result() == {"text": "all"}
    # A retry's fresh target cuts the same pieces into the same chunks (the job skips those already written).
    again, cut = StreamTarget("job-1", "m", interval=3), []
    for step in range(9):
        cut.append(again.add(f"t{step} "))
    assert [c for c in cut + [again.flush()] if c is not None] == [text for _job, text in sink.pieces]


def test_the_worker_reads_both_answers_to_a_load():
    answers = {
        wire.READY: wire.ready({"pid": 1}),
        wire.LOAD_ERROR: wire.load_error("model_artifact_rejected", "bad digest"),
    }
    assert set(answers) == set(wire.START_REPLIES)
    assert ModelProcess.loaded(answers[wire.READY]) == {"pid": 1}
    with pytest.raises(ModelLoadError) as refused:
        ModelProcess.loaded(answers[wire.LOAD_ERROR])
    assert refused.value.code == "model_artifact_rejected" and str(refused.value) == "bad digest"
    with pytest.raises(ModelLoadError):
        ModelProcess.loaded(wire.result(1, None))


def test_every_kind_the_model_process_sends_is_covered_above():
    covered = set(wire.START_REPLIES) | set(wire.CALL_ENDS) | {wire.EVENTS}
    assert covered == set(wire.FROM_HOST)
    assert set(wire.EVENT_KINDS) == {wire.CHUNK, wire.QUEUED, *wire.CALL_ENDS}
