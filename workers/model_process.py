"""One model process, as the Celery worker sees it (see workers/model_host.py for the other side).

`ModelProcess` is one spawned process holding one model instance: a pipe, a reader thread that
routes replies to the futures of the calls waiting for them, and a watchdog (calls in flight but no
message from the process within the model's `timeout_s` -> the process is killed and every call in it
fails with `ModelTimeout`). A generation model answers with one `events` message per decoding step:
the reader hands that step's text of every streamed call to the `StreamSink` in one go (one Redis
round trip for the whole running batch), then resolves the calls that ended, so a job's last chunk is
always written before its end. workers/remote_runtime.py owns a model's processes.
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
from collections.abc import Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from loguru import logger

from config.models import ModelSpec
from config.settings import Settings, model_process_env
from config.values import REPO_ROOT
from tasks.errors import CODES, MODEL_LOAD_FAILED, MODEL_LOAD_TIMEOUT
from workers import wire
from workers.device import anon_bytes_of, rss_bytes_of
from workers.model_errors import (
    CallCancelled,
    DeadlineExceeded,
    ModelGone,
    ModelProcessDied,
    ModelProcessError,
    ModelTimeout,
)
from workers.runtimes.base import InvalidInput, intra_op_threads
from workers.stream_target import StreamSink, StreamTarget

STOP_GRACE_S = 5.0
# libgomp spin rounds before an idle OpenMP thread sleeps (tens of microseconds; see model_process_environment)
OPENMP_SPIN_ROUNDS = 30_000


def model_process_environment(parent: Mapping[str, str]) -> dict[str, str]:
    """A model process's environment: the parent's without secrets, tuned for forward passes."""
    env = model_process_env(parent)  # no secret crosses into a model process
    # OpenMP's worker threads spin after every parallel region before they sleep. libgomp's default spin
    # (300,000 rounds, about a millisecond) outlasts the gap between batches and burns the cores the worker,
    # the API and Redis need; no spin at all (OMP_WAIT_POLICY=PASSIVE) puts a thread to sleep and wakes it
    # again between every two operators of one forward pass. A short spin bridges the gaps inside a forward
    # pass and not those between batches. Measured on 2 cores (minilm, one run, interleaved): batch-1
    # forward in the model process 14.9-18.3 ms with 30,000 rounds against 22.3-23.3 ms passive and
    # 18.5-19.0 ms default; 32 clients 138-154 req/s against passive's 150-156 and the default's 132-135.
    # An operator's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = str(OPENMP_SPIN_ROUNDS)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


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
        self._gone: ModelGone | None = None  # why it was stopped: what the calls in flight end with
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
        env = model_process_environment(os.environ)
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
            self._conn.send((self.spec, self.settings.for_model_process(), self.device, threads))
            ready = self._conn.poll(timeout_s if timeout_s > 0 else None)
            message = self._conn.recv() if ready else None
        except (EOFError, OSError):
            code = self._exit_code(5)
            self.kill()
            raise ModelLoadError(
                f"the process loading model {self.spec.id!r} died (exit code {code})", MODEL_LOAD_FAILED
            ) from None
        if message is None:
            self.kill()
            raise ModelLoadError(
                f"model {self.spec.id!r} did not load within {timeout_s:g} s (AETHERCORE_LOAD_TIMEOUT)",
                MODEL_LOAD_TIMEOUT,
            )
        try:
            self.info = self.loaded(message)
        except ModelLoadError:
            self.stop()
            raise
        threading.Thread(
            target=self._read_loop, name=f"model-reader-{self.spec.id}-{self.instance}", daemon=True
        ).start()
        threading.Thread(target=self._watch, name=f"model-watchdog-{self.spec.id}-{self.instance}", daemon=True).start()
        return self.info

    @staticmethod
    def loaded(message: tuple) -> dict[str, Any]:
        """The model process's answer to the load (wire.START_REPLIES): its info, or ModelLoadError."""
        from workers.cache import ModelLoadError

        if message[0] == wire.READY:
            return message[1]
        if message[0] == wire.LOAD_ERROR:
            return_code, text = message[1], message[2]
            raise ModelLoadError(text, return_code if return_code in CODES else MODEL_LOAD_FAILED)
        raise ModelLoadError(f"the model process answered its load with {message[0]!r}", MODEL_LOAD_FAILED)

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
        pid = self.pid
        return rss_bytes_of(pid) if pid is not None and self.alive else 0

    def memory_bytes(self) -> int:
        """What this instance takes for its model: the private memory it gained since its libraries were
        imported (weights, tokenizer, activations, allocator caches), at least the weights themselves."""
        pid = self.pid
        grown = (anon_bytes_of(pid) if pid is not None and self.alive else 0) - self.info.get("anon_baseline_bytes", 0)
        # A generation model's KV-cache budget is reserved in full (allocated as rows join the batch).
        reserved = self.info.get("weights_bytes", 0) + (self.spec.kv_cache_memory or 0)
        return max(grown, reserved, 0)

    def stop(self, gone: ModelGone | None = None) -> None:
        """Ask the process to exit; kill it if it does not within a few seconds (STOP_GRACE_S). Its memory goes
        with it; calls still in flight fail with `gone` (why the model went away)."""
        if self._process is None:
            return
        self._stopping = True
        self._gone = gone
        try:
            with self._send_lock:
                self._conn.send(wire.exit_())
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
            if self._gone is not None:
                error: Exception = self._gone
            elif self._timed_out:
                error = ModelTimeout(
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
            if message[0] == wire.EVENTS:
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
        pieces: list[tuple[Any, StreamTarget, str]] = []  # (call id, its stream, the text to write)
        queued: list[StreamTarget] = []
        ends: list[tuple] = []
        with self._calls_lock:
            for event in events:
                call = self._calls.get(event[1])
                if call is None:
                    continue
                stream = call.stream
                if event[0] == wire.CHUNK:
                    if stream is not None and (chunk := stream.add(event[2])) is not None:
                        pieces.append((event[1], stream, chunk))
                elif event[0] == wire.QUEUED:
                    if stream is not None:
                        queued.append(stream)
                else:
                    # written before the call's end settles its job
                    if stream is not None and (rest := stream.flush()) is not None:
                        pieces.append((event[1], stream, rest))
                    ends.append(event)
        if self.sink is not None and queued:
            self.sink.queued(queued)
        if self.sink is not None and pieces:
            keep = self.sink.publish([(target, text) for _id, target, text in pieces])
            for (call_id, _target, _text), going in zip(pieces, keep):
                if not going:
                    self._send_quietly(wire.cancel(call_id))
        for event in ends:
            self._settle(event)

    def _settle(self, message: tuple) -> None:
        """A call's end (wire.CALL_ENDS): its future resolved with the output or the matching error."""
        with self._calls_lock:
            call = self._calls.pop(message[1], None)
        if call is None:
            return
        kind = message[0]
        if kind == wire.RESULT:
            call.future.pass_timing = message[3] if len(message) > 3 else None  # type: ignore[attr-defined]
            _settle(call.future, result=message[2])
        elif kind == wire.CANCELLED:
            _settle(call.future, error=CallCancelled())
        elif kind == wire.ERROR and message[2] == wire.INVALID_INPUT:
            _settle(call.future, error=InvalidInput(message[3]))
        elif kind == wire.ERROR and message[2] == wire.DEADLINE:
            _settle(call.future, error=DeadlineExceeded(message[3]))
        else:
            _settle(call.future, error=ModelProcessError(message[3] if kind == wire.ERROR else f"unexpected {kind!r}"))

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
        """Send one request (a wire.RUN or wire.GENERATE message without its call id, which is filled in here);
        its future resolves with the result or the error."""
        future: Future = Future()
        call_id = next(self._ids)
        with self._calls_lock:
            # Checked under the lock that _mark_dead swaps the calls under: a call is either seen by it, or
            # sees the process dead here; none is left waiting on a process that is gone.
            if self._dead.is_set():
                future.set_exception(
                    self._gone or ModelProcessDied(f"the process of model {self.spec.id!r} is not running")
                )
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

    def call_timed(self, op: str, inputs: Any, parameters: dict[str, Any]) -> tuple[Any, Any]:
        """Run one operation and wait for its result, with the pass timing the process reported (or None)."""
        future = self.submit((op, inputs, parameters))[1]
        result = future.result()
        return result, getattr(future, "pass_timing", None)


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
