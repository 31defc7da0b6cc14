"""The model process: one model instance, its main thread running forward passes and nothing else.

Started by `workers/model_process.py` as `python -m workers.model_host FD` (a fresh interpreter, never a
fork of a process that may hold a CUDA context), FD being its end of a socket pair. It receives
(spec, settings, device, threads), pins its device, imports torch/onnxruntime, loads the model, reports
`ready`, then answers requests from its one connection. Every message kind, both ways, is in
workers/wire.py: a batch model answers RUN with RESULT or ERROR; a text-generation model takes GENERATE
and CANCEL and answers with one EVENTS message per decoding step; EXIT ends either.

Messages are pickled by multiprocessing's Connection (binary: texts in, float32 arrays out), one message
per batch or decoding step each way. A text-generation model is served by continuous batching
(workers/runtimes/decoding.py): between two decoding steps the loop takes in whatever the parent sent, so
requests join and leave the running batch at every step. No Celery, no Redis and no logging set-up here:
the process only computes, so no other Python thread competes with the forward pass for the GIL.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

from config.models import TEXT_TASKS, ModelSpec
from config.settings import Settings
from tasks.errors import MODEL_LOAD_FAILED
from workers import wire
from workers.device import anon_bytes_of, rss_bytes_of

if TYPE_CHECKING:  # imported in the process once its device is pinned
    from workers.runtimes.base import GenerationRuntime
    from workers.runtimes.scheduling import RunningBatch


def _gpu_bytes(device: str) -> int | None:
    if not device.startswith("cuda") or "torch" not in sys.modules:
        return None
    import torch

    return int(torch.cuda.memory_reserved()) if torch.cuda.is_available() else None


class _Host:
    def __init__(self, conn: Any, spec: ModelSpec, settings: Settings, device: str, threads: int) -> None:
        self.conn = conn
        self.spec = spec
        self.settings = settings
        self.device = device
        self.threads = threads

    # -- start-up -----------------------------------------------------------------------------
    def load(self) -> bool:
        from workers.device import pin_device

        pin_device(self.device, self.settings.gpu_index)
        interpreter = rss_bytes_of()
        try:
            import importlib

            from workers.cache import release_memory
            from workers.runtimes import RUNTIME_MODULES, TOKENIZER_TYPES, TORCH_TYPES, create_runtime

            # Libraries first, so the baseline below is the process without the model: what loading adds
            # on top is the model's own memory (what the worker's budget counts).
            importlib.import_module(RUNTIME_MODULES[self.spec.model_type])
            if self.spec.task in TEXT_TASKS and self.spec.model_type in TOKENIZER_TYPES:
                # The tokenizer's library, for every tokenized text model (transformers imports lazily: touch it).
                _ = importlib.import_module("transformers").AutoTokenizer
            if self.spec.model_type in TORCH_TYPES:
                from workers.runtimes.base import set_torch_threads

                set_torch_threads(self.threads)  # this main thread runs every forward pass
            baseline = anon_bytes_of()
            if self.spec.has_files:  # a simulated model has none to verify
                from model_store.paths import resolve_model_path
                from model_store.verify import verify_artifact

                verify_artifact(self.spec, self.settings, resolve_model_path(self.spec, self.settings))
            self.runtime = create_runtime(self.spec, self.settings, self.device)
            self.runtime.load()
            release_memory(self.device)  # what loading allocated only transiently goes back
            describe = self.runtime.describe()
            weights = self.runtime.memory_bytes()
        except Exception as exc:
            code = getattr(exc, "code", MODEL_LOAD_FAILED)
            message = str(exc) if self.spec.id in str(exc) else f"model {self.spec.id!r} failed to load: {exc}"
            self.conn.send(wire.load_error(code, message))
            return False
        self.conn.send(
            wire.ready(
                {
                    "pid": os.getpid(),
                    "anon_baseline_bytes": baseline,
                    "rss_interpreter_bytes": interpreter,
                    "rss_bytes": rss_bytes_of(),
                    "weights_bytes": weights,
                    "gpu_memory_bytes": _gpu_bytes(self.device),
                    "dtype": self.runtime.dtype_name,
                    "describe": describe,
                },
            )
        )
        return True

    # -- the loop -----------------------------------------------------------------------------
    def serve(self) -> None:
        from workers.runtimes.base import GenerationRuntime

        if isinstance(self.runtime, GenerationRuntime):
            self.serve_generation(self.runtime)
            return
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return  # the worker went away: nothing left to serve
            op = message[0]
            if op == wire.EXIT:
                return
            if op == wire.CANCEL:
                continue  # a batch is never cancelled half-way; its call already ended
            call_id = message[1]
            try:
                if op != wire.RUN:
                    raise ValueError(f"operation {op!r} is not served by a {self.spec.task} model")
                _op, _id, inputs, parameters = message
                started = time.time_ns()
                output = self.runtime.run_batch(inputs, parameters)
                reply = wire.result(call_id, output, (started, time.time_ns(), os.getpid()))
            except Exception as exc:
                reply = self._error(call_id, exc)
            self.conn.send(reply)

    def serve_generation(self, runtime: GenerationRuntime) -> None:
        """Continuous batching: take in requests and cancels, run one step, send its events; repeat."""
        batcher = runtime.continuous_batcher()
        while True:
            try:
                # Block only when there is nothing to step; otherwise take what arrived since the last step.
                while not batcher.has_work() or self.conn.poll():
                    if not self._take(runtime, batcher, self.conn.recv()):
                        return
            except (EOFError, OSError):
                return
            events = batcher.step()
            if events or batcher.has_work():
                self.conn.send(wire.events(events, batcher.stats()))

    def _take(self, runtime: GenerationRuntime, batcher: RunningBatch, message: tuple) -> bool:
        op = message[0]
        if op == wire.EXIT:
            return False
        if op == wire.CANCEL:
            batcher.cancel(message[1])  # unknown: it already ended, and its end is on its way
            return True
        call_id = message[1]
        try:
            if op != wire.GENERATE:
                raise ValueError(f"operation {op!r} is not served by a text-generation model")
            _op, _id, inputs, parameters, options = message
            batcher.add(runtime.sequence(call_id, inputs, parameters, **options))
        except Exception as exc:
            self.conn.send(self._error(call_id, exc))
        return True

    @staticmethod
    def _error(call_id: int, exc: Exception) -> tuple:
        from workers.runtimes.base import InvalidInput

        kind = wire.INVALID_INPUT if isinstance(exc, InvalidInput) else wire.FAILURE
        detail = str(exc) if kind == wire.INVALID_INPUT else f"{type(exc).__name__}: {exc}"
        if kind == wire.FAILURE:
            traceback.print_exc(file=sys.stderr)
        return wire.error(call_id, kind, detail)


def main(conn: Any, spec: ModelSpec, settings: Settings, device: str, threads: int) -> None:
    host = _Host(conn, spec, settings, device, threads)
    if host.load():
        try:
            host.serve()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker went away mid-reply: nothing left to serve
    conn.close()


if __name__ == "__main__":
    from multiprocessing.connection import Connection

    connection = Connection(int(sys.argv[1]))
    main(connection, *connection.recv())
