"""What crosses the pipe between a worker and its model process: every message kind, defined once.

Used by both ends (workers/model_process.py in the worker, workers/model_host.py in the model process);
tests/unit/test_wire.py sends every kind to the end that receives it and checks it is handled. Messages are
tuples pickled by multiprocessing's `Connection`, one per batch or decoding step each way:

    worker -> model process
      (CONFIG: spec, settings, device, threads)       once, first: what to load (a bare tuple, no kind)
      (RUN, call_id, inputs, parameters)              one whole batch                   -> RESULT | ERROR
      (GENERATE, call_id, inputs, parameters, options)  one request for the running batch of a generation
                                                      model (options: stream, exclusive, deadline)
                                                                                        -> EVENTS ... | ERROR
      (CANCEL, call_id)                               drop that generation at the next step (a batch model
                                                      ignores it: a batch is never cut short)
      (EXIT,)                                         end the process
    model process -> worker
      (READY, info) | (LOAD_ERROR, code, message)     once, after the load
      (RESULT, call_id, output[, timing])             a call's end (timing: a batch's pass, start/end ns, pid)
      (ERROR, call_id, kind, message)                 kind: INVALID_INPUT | DEADLINE | FAILURE
      (CANCELLED, call_id)
      (EVENTS, [event, ...], stats)                   one per decoding step: (CHUNK, call_id, text),
                                                      (QUEUED, call_id), and the ends of the rows that finished
                                                      as RESULT / ERROR / CANCELLED tuples
"""

from __future__ import annotations

from typing import Any

# worker -> model process
RUN = "run"
GENERATE = "generate"
CANCEL = "cancel"
EXIT = "exit"
TO_HOST = (RUN, GENERATE, CANCEL, EXIT)

# model process -> worker
READY = "ready"
LOAD_ERROR = "load_error"
RESULT = "result"
ERROR = "error"
CANCELLED = "cancelled"
EVENTS = "events"
FROM_HOST = (READY, LOAD_ERROR, RESULT, ERROR, CANCELLED, EVENTS)
START_REPLIES = (READY, LOAD_ERROR)  # the first message, answering the load
CALL_ENDS = (RESULT, ERROR, CANCELLED)  # a call's last message (alone, or inside EVENTS)

# inside EVENTS, besides the call ends
CHUNK = "chunk"
QUEUED = "queued"
EVENT_KINDS = (CHUNK, QUEUED, *CALL_ENDS)

# the kinds of ERROR
INVALID_INPUT = "invalid_input"  # the caller's input (the message says which rule)
DEADLINE = "deadline"  # the job's deadline passed while it ran
FAILURE = "error"  # anything else: a bug or a fault in the model
ERROR_KINDS = (INVALID_INPUT, DEADLINE, FAILURE)


def run(call_id: int, inputs: list[Any], parameters: dict[str, Any]) -> tuple:
    return (RUN, call_id, inputs, parameters)


def generate(call_id: int, inputs: Any, parameters: dict[str, Any], options: dict[str, Any]) -> tuple:
    return (GENERATE, call_id, inputs, parameters, options)


def cancel(call_id: int) -> tuple:
    return (CANCEL, call_id)


def exit_() -> tuple:
    return (EXIT,)


def ready(info: dict[str, Any]) -> tuple:
    return (READY, info)


def load_error(code: str, message: str) -> tuple:
    return (LOAD_ERROR, code, message)


def result(call_id: int, output: Any, timing: tuple[int, int, int] | None = None) -> tuple:
    """`timing`: a batch's pass as the model process saw it, (start ns, end ns, pid) in epoch nanoseconds (the
    worker's trace of the pass, workers/pass_trace.py); None for a generation's end."""
    return (RESULT, call_id, output) if timing is None else (RESULT, call_id, output, timing)


def error(call_id: int, kind: str, message: str) -> tuple:
    return (ERROR, call_id, kind, message)


def cancelled(call_id: int) -> tuple:
    return (CANCELLED, call_id)


def events(items: list[tuple], stats: dict[str, int]) -> tuple:
    return (EVENTS, items, stats)


def chunk(call_id: int, text: str) -> tuple:
    return (CHUNK, call_id, text)


def queued(call_id: int) -> tuple:
    return (QUEUED, call_id)
