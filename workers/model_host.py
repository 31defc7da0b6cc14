"""The model process: one model instance, its main thread running forward passes and nothing else.

Started by `workers/model_process.py` as `python -m workers.model_host FD` (a fresh interpreter, never a
fork of a process that may hold a CUDA context), FD being its end of a socket pair. It receives
(spec, settings, device, threads), pins its device, imports torch/onnxruntime, loads the model, reports
`ready`, then answers requests from its one connection, in order:

    parent -> host   ("run", call_id, inputs, parameters)      one whole batch; -> ("result", call_id, outputs)
                     ("stream", call_id, inputs, parameters)   one generation;  -> ("chunk", call_id, text)...
                                                                                    then ("result", call_id, output)
                     ("cancel", call_id)                        stop that generation at its next token
                     ("exit",)
    host -> parent   ("ready", info) | ("load_error", code, message) once, at start
                     ("error", call_id, kind, message)          kind: invalid_input | error
                     ("cancelled", call_id)

Messages are pickled by multiprocessing's Connection (binary: texts in, float32 arrays out), one message
per batch each way. No Celery, no Redis and no logging set-up here: the process only computes, so no other
Python thread competes with the forward pass for the GIL.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections import deque
from typing import Any

from config.models import TEXT_TASKS, ModelSpec
from config.settings import Settings
from workers.device import anon_bytes_of, rss_bytes_of


class Cancelled(Exception):
    pass


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
        self.deferred: deque[tuple] = deque()
        self.cancelled: set[int] = set()

    # -- start-up -----------------------------------------------------------------------------
    def load(self) -> bool:
        from workers.device import pin_device

        pin_device(self.device, self.settings.gpu_index)
        interpreter = rss_bytes_of()
        try:
            import importlib

            from workers.cache import release_memory
            from workers.runtimes import RUNTIME_MODULES, create_runtime

            # Libraries first, so the baseline below is the process without the model: what loading adds
            # on top is the model's own memory (what the worker's budget counts).
            importlib.import_module(RUNTIME_MODULES[self.spec.model_type])
            if self.spec.task in TEXT_TASKS:
                # The tokenizer's library, for every text model (transformers imports lazily: touch the class).
                getattr(importlib.import_module("transformers"), "AutoTokenizer")
            if self.spec.model_type != "onnx":
                from workers.runtimes.base import set_torch_threads

                set_torch_threads(self.threads)  # this main thread runs every forward pass
            baseline = anon_bytes_of()
            self.runtime = create_runtime(self.spec, self.settings, self.device)
            self.runtime.load()
            release_memory(self.device)  # what loading allocated only transiently goes back
            describe = self.runtime.describe()
            weights = self.runtime.memory_bytes()
        except Exception as exc:
            code = getattr(exc, "code", "model_load_failed")
            message = str(exc) if self.spec.id in str(exc) else f"model {self.spec.id!r} failed to load: {exc}"
            self.conn.send(("load_error", code, message))
            return False
        self.conn.send(("ready", {
            "pid": os.getpid(),
            "anon_baseline_bytes": baseline,
            "rss_interpreter_bytes": interpreter,
            "rss_bytes": rss_bytes_of(),
            "weights_bytes": weights,
            "gpu_memory_bytes": _gpu_bytes(self.device),
            "dtype": self.runtime.dtype_name,
            "describe": describe,
        }))
        return True

    # -- the loop -----------------------------------------------------------------------------
    def next_message(self) -> tuple:
        return self.deferred.popleft() if self.deferred else self.conn.recv()

    def serve(self) -> None:
        while True:
            try:
                message = self.next_message()
            except (EOFError, OSError):
                return  # the worker went away: nothing left to serve
            op = message[0]
            if op == "exit":
                return
            if op == "cancel":
                self.cancelled.add(message[1])
                continue
            _op, call_id, inputs, parameters = message
            if call_id in self.cancelled:
                self.cancelled.discard(call_id)
                self.conn.send(("cancelled", call_id))
                continue
            try:
                if op == "run":
                    reply = ("result", call_id, self.runtime.run_batch(inputs, parameters))
                elif op == "stream":
                    reply = ("result", call_id, self.runtime.stream(
                        inputs, parameters, lambda text, cid=call_id: self._chunk(cid, text)))
                else:
                    reply = ("error", call_id, "error", f"unknown operation {op!r}")
            except Cancelled:
                reply = ("cancelled", call_id)
            except Exception as exc:
                from workers.runtimes.base import InvalidInput

                kind = "invalid_input" if isinstance(exc, InvalidInput) else "error"
                detail = str(exc) if kind == "invalid_input" else f"{type(exc).__name__}: {exc}"
                if kind == "error":
                    traceback.print_exc(file=sys.stderr)
                reply = ("error", call_id, kind, detail)
            self.conn.send(reply)

    def _chunk(self, call_id: int, text: str) -> None:
        """Send one piece of a generation; between tokens, take in what the parent sent meanwhile."""
        self.conn.send(("chunk", call_id, text))
        while self.conn.poll():
            message = self.conn.recv()
            if message[0] == "cancel":
                if message[1] == call_id:
                    raise Cancelled()
                self.cancelled.add(message[1])
            else:
                self.deferred.append(message)


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
