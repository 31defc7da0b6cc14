"""The Celery worker's handle on its model processes (see workers/model_host.py for the other side).

`ModelProcess` is one spawned process holding one model instance: a pipe, a reader thread that
routes replies to the futures of the calls waiting for them, and a watchdog (calls in flight but no
message from the process within the model's `timeout_s` -> the process is killed and every call in it
fails with `ModelTimeout`). A generation model answers with one `events` message per decoding step:
the reader hands that step's text of every streamed call to the `StreamSink` in one go (one Redis
round trip for the whole running batch), then resolves the calls that ended, so a job's last chunk is
always written before its end.

`RemoteRuntime` is what the model cache holds: it looks like a runtime (load, describe, memory,
close) and owns the model's `instances` processes. The Celery worker process never imports torch or
onnxruntime; it moves whole batches across the boundary, once each way.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

from loguru import logger

from config.models import ModelSpec
from config.settings import REPO_ROOT, Settings
from workers.device import anon_bytes_of, rss_bytes_of
from workers.runtimes.base import InvalidInput, intra_op_threads

STOP_GRACE_S = 5.0


class ModelProcessError(RuntimeError):
    """The model process failed the call (a bug or a crash inside the model, not the caller's input)."""

    code = "internal_error"


class ModelProcessDied(ModelProcessError):
    code = "model_process_died"


class ModelTimeout(ModelProcessError):
    code = "model_timeout"


class CallCancelled(Exception):
    pass


class DeadlineExceeded(Exception):
    """A generation ran past its job's deadline and was dropped from the batch."""


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
    """A streamed call's job: the next chunk index, and when its first piece was written."""

    job_id: str
    model_id: str
    submitted_at: float | None = None
    index: int = 0
    first_piece_at: float | None = None


@dataclass
class _Call:
    future: Future
    stream: StreamTarget | None = None


class ModelProcess:
    def __init__(
        self, spec: ModelSpec, settings: Settings, device: str, instance: int = 0, sink: StreamSink | None = None
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.device = device
        self.instance = instance
        self.sink = sink
        self.info: dict[str, Any] = {}
        self.generation: dict[str, int] = {}  # the running batch's last stats (running, waiting, kv bytes)
        self._conn: Any = None
        self._process: Any = None
        self._send_lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._calls_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._dead = threading.Event()
        self._stopping = False
        self._timed_out = False
        self._last_progress = time.monotonic()

    @property
    def busy(self) -> int:
        """Calls in flight: a hint for picking an instance."""
        return len(self._calls)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout_s: float) -> dict[str, Any]:
        """Start a fresh interpreter (`python -m workers.model_host`, never a fork) and load the model in it;
        raise ModelLoadError when it cannot."""
        from workers.cache import ModelLoadError

        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # OpenMP's worker threads otherwise spin for milliseconds after every parallel region, burning the
        # cores the worker, the API and Redis need between batches. Measured on 2 cores (minilm, 32 clients):
        # passive waiting served ~20 % more requests per second than the default spin. An operator's own
        # OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
        if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "workers.model_host", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                cwd=REPO_ROOT,
                env=env,
            )
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        threads = intra_op_threads(self.settings, self.spec.instances)
        try:
            self._conn.send((self.spec, self.settings, self.device, threads))
            ready = self._conn.poll(timeout_s if timeout_s > 0 else None)
            message = self._conn.recv() if ready else None
        except (EOFError, OSError):
            code = self._exit_code(5)
            self.kill()
            raise ModelLoadError(
                f"the process loading model {self.spec.id!r} died (exit code {code})", "model_load_failed"
            ) from None
        if message is None:
            self.kill()
            raise ModelLoadError(
                f"model {self.spec.id!r} did not load within {timeout_s:.0f} s (AETHERCORE_LOAD_TIMEOUT)",
                "model_load_timeout",
            )
        if message[0] != "ready":
            self.stop()
            raise ModelLoadError(message[2], message[1])
        self.info = message[1]
        threading.Thread(
            target=self._read_loop, name=f"model-reader-{self.spec.id}-{self.instance}", daemon=True
        ).start()
        threading.Thread(target=self._watch, name=f"model-watchdog-{self.spec.id}-{self.instance}", daemon=True).start()
        return self.info

    def _exit_code(self, wait_s: float) -> int | None:
        try:
            return self._process.wait(wait_s)
        except subprocess.TimeoutExpired:
            return None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None and not self._dead.is_set()

    def rss_bytes(self) -> int:
        return rss_bytes_of(self.pid) if self.alive else 0

    def memory_bytes(self) -> int:
        """What this instance takes for its model: the private memory it gained since its libraries were
        imported (weights, tokenizer, activations, allocator caches), at least the weights themselves."""
        grown = (anon_bytes_of(self.pid) if self.alive else 0) - self.info.get("anon_baseline_bytes", 0)
        # A generation model's KV-cache budget is reserved in full (allocated as rows join the batch).
        reserved = self.info.get("weights_bytes", 0) + (self.spec.kv_cache_memory or 0)
        return max(grown, reserved, 0)

    def stop(self) -> None:
        """Ask the process to exit; kill it if it does not within a few seconds. Its memory goes with it."""
        if self._process is None:
            return
        self._stopping = True
        try:
            with self._send_lock:
                self._conn.send(("exit",))
        except (OSError, ValueError, BrokenPipeError):
            pass
        self._exit_code(STOP_GRACE_S)
        self.kill()

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            try:
                self._process.kill()
            except ProcessLookupError:
                pass
            self._exit_code(STOP_GRACE_S)
        self._mark_dead()

    def _mark_dead(self) -> None:
        self._dead.set()
        with self._calls_lock:
            calls, self._calls = self._calls, {}
        for call in calls.values():
            if self._timed_out:
                error: Exception = ModelTimeout(
                    f"model {self.spec.id!r} made no progress within its timeout_s of {self.spec.timeout_s:g} s; "
                    "its process was restarted"
                )
            else:
                error = ModelProcessDied(f"the process of model {self.spec.id!r} died while running this job")
            _settle(call.future, error=error)
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass

    def _read_loop(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError, ValueError):
                break
            self._last_progress = time.monotonic()
            if message[0] == "events":
                self._route_events(message[1])
                self.generation = message[2]
                if self.sink is not None:
                    self.sink.stepped(self.spec.id, message[2])
            else:
                self._settle(message)
        if not self._dead.is_set() and not self._stopping:
            code = self._exit_code(1)
            log = logger.bind(model_id=self.spec.id)
            if code == -signal.SIGTERM:  # the whole worker is being stopped (its process group got SIGTERM)
                log.info("model process {} (pid {}) stopped", self.instance, self.pid)
            elif not self._timed_out:
                log.error("model process {} (pid {}) died (exit code {})", self.instance, self.pid, code)
        self._mark_dead()

    def _route_events(self, events: list[tuple]) -> None:
        """One decoding step: write every streamed piece first (one round trip), then settle the ends."""
        pieces, queued, ends = [], [], []
        with self._calls_lock:
            for event in events:
                call = self._calls.get(event[1])
                if call is None:
                    continue
                if event[0] == "chunk":
                    if call.stream is not None:
                        pieces.append((event[1], call.stream, event[2]))
                elif event[0] == "queued":
                    if call.stream is not None:
                        queued.append(call.stream)
                else:
                    ends.append(event)
        if self.sink is not None and queued:
            self.sink.queued(queued)
        if self.sink is not None and pieces:
            keep = self.sink.publish([(target, text) for _id, target, text in pieces])
            for (call_id, _target, _text), going in zip(pieces, keep):
                if not going:
                    self._send_quietly(("cancel", call_id))
        for event in ends:
            self._settle(event)

    def _settle(self, message: tuple) -> None:
        with self._calls_lock:
            call = self._calls.pop(message[1], None)
        if call is None:
            return
        kind = message[0]
        if kind == "result":
            _settle(call.future, result=message[2])
        elif kind == "cancelled":
            _settle(call.future, error=CallCancelled())
        elif kind == "error" and message[2] == "invalid_input":
            _settle(call.future, error=InvalidInput(message[3]))
        elif kind == "error" and message[2] == "deadline":
            _settle(call.future, error=DeadlineExceeded(message[3]))
        else:
            _settle(call.future, error=ModelProcessError(message[3] if kind == "error" else f"unexpected {kind!r}"))

    def _watch(self) -> None:
        """Kill the process when calls wait on it and it sent nothing for `timeout_s` (a hang)."""
        timeout = self.spec.timeout_s
        while not self._dead.wait(min(1.0, timeout / 4)):
            if self._calls and time.monotonic() - self._last_progress > timeout:
                logger.bind(model_id=self.spec.id).error(
                    "model process {} (pid {}) made no progress for {} s (timeout_s); killing it",
                    self.instance,
                    self.pid,
                    timeout,
                )
                self._timed_out = True
                self.kill()
                return

    def _send_quietly(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):
            pass

    # -- calls --------------------------------------------------------------------------------
    def submit(self, message: tuple, stream: StreamTarget | None = None) -> tuple[int, Future]:
        """Send one request (its call id is filled in); its future resolves with the result or the error."""
        future: Future = Future()
        call_id = next(self._ids)
        with self._calls_lock:
            # Checked under the lock that _mark_dead swaps the calls under: a call is either seen by it, or
            # sees the process dead here; none is left waiting on a process that is gone.
            if self._dead.is_set():
                future.set_exception(ModelProcessDied(f"the process of model {self.spec.id!r} is not running"))
                return 0, future
            if not self._calls:
                self._last_progress = time.monotonic()  # an idle process owes no progress
            self._calls[call_id] = _Call(future, stream)
        try:
            with self._send_lock:
                self._conn.send((message[0], call_id, *message[1:]))
        except (OSError, ValueError) as exc:
            with self._calls_lock:
                self._calls.pop(call_id, None)
            _settle(future, error=ModelProcessDied(f"the process of model {self.spec.id!r} is gone ({exc})"))
        return call_id, future

    def call(self, op: str, inputs: Any, parameters: dict[str, Any]) -> Any:
        """Run one operation and wait for its result."""
        return self.submit((op, inputs, parameters))[1].result()


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


@dataclass
class GenerationCall:
    process: ModelProcess
    future: Future
    exclusive: bool


class RemoteRuntime:
    """The cache's view of a model whose instances run in their own processes."""

    def __init__(self, spec: ModelSpec, settings: Settings, device: str, sink: StreamSink | None = None) -> None:
        self.spec = spec
        self.settings = settings
        self.device = device
        self.sink = sink
        self.instances: list[ModelProcess] = []
        self.dtype_name: str | None = None  # what the model process reports once loaded
        self._restart_lock = threading.Lock()
        self.restarts = 0

    def load(self) -> None:
        try:
            for index in range(self.spec.instances):
                process = ModelProcess(self.spec, self.settings, self.device, index, self.sink)
                process.start(self.settings.load_timeout)
                self.instances.append(process)
        except Exception:
            self.close()
            raise
        self.dtype_name = self.instances[0].info.get("dtype")

    def describe(self) -> dict[str, Any]:
        info = dict(self.instances[0].info.get("describe", {})) if self.instances else {}
        info["processes"] = [{"pid": p.pid, "rss_bytes": p.rss_bytes()} for p in self.instances]
        info["restarts"] = self.restarts
        return info

    def memory_bytes(self) -> int:
        return sum(p.memory_bytes() for p in self.instances)

    def process_rss_bytes(self) -> int:
        return sum(p.rss_bytes() for p in self.instances)

    def gpu_memory_bytes(self) -> int | None:
        values = [p.info.get("gpu_memory_bytes") for p in self.instances]
        return sum(values) if values and all(v is not None for v in values) else None

    def close(self) -> None:
        instances, self.instances = self.instances, []
        for process in instances:
            process.stop()

    # -- calls --------------------------------------------------------------------------------
    def run_batch_on(self, index: int, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        outputs = self.instances[index].call("run", inputs, parameters)
        if len(outputs) != len(inputs):
            raise ModelProcessError(f"the model returned {len(outputs)} outputs for {len(inputs)} inputs")
        return outputs

    def generate(
        self,
        inputs: Any,
        parameters: dict[str, Any],
        stream: StreamTarget | None = None,
        *,
        exclusive: bool = False,
        deadline: float | None = None,
    ) -> GenerationCall:
        """Hand one generation request to the running batch of the least busy instance."""
        process = min(self.instances, key=lambda p: p.busy)
        options = {"stream": stream is not None, "exclusive": exclusive, "deadline": deadline}
        _call_id, future = process.submit(("generate", inputs, parameters, options), stream)
        return GenerationCall(process, future, exclusive)

    def generation_stats(self) -> dict[str, int]:
        """The running batches of every instance, added up (for the heartbeat and the metrics)."""
        total: dict[str, int] = {}
        for process in self.instances:
            for key, value in process.generation.items():
                total[key] = total.get(key, 0) + value
        return total

    def revive(self, index: int) -> bool:
        """Replace a dead instance with a fresh process (the model is loaded again); False if that fails."""
        with self._restart_lock:
            if index >= len(self.instances):
                return False
            if self.instances[index].alive:
                return True
            process = ModelProcess(self.spec, self.settings, self.device, index, self.sink)
            try:
                process.start(self.settings.load_timeout)
            except Exception as exc:
                logger.bind(model_id=self.spec.id).error("could not restart model process {}: {}", index, exc)
                return False
            self.instances[index] = process
            self.restarts += 1
            logger.bind(model_id=self.spec.id).warning("model process {} restarted (pid {})", index, process.pid)
            return True

    def revive_all(self) -> bool:
        return all(self.revive(i) for i in range(len(self.instances)))

    def alive(self) -> bool:
        return bool(self.instances) and all(p.alive for p in self.instances)
