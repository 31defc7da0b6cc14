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
from collections.abc import Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

from loguru import logger

from config.models import ModelSpec
from config.settings import REPO_ROOT, Settings, model_process_env
from tasks.errors import (
    CODES,
    INTERNAL_ERROR,
    MODEL_EVICTED,
    MODEL_LOAD_FAILED,
    MODEL_LOAD_TIMEOUT,
    MODEL_PROCESS_DIED,
    MODEL_TIMEOUT,
    MODEL_UNLOADED,
)
from workers import wire
from workers.device import anon_bytes_of, rss_bytes_of
from workers.runtimes.base import InvalidInput, intra_op_threads

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


class ModelProcessError(RuntimeError):
    """The model process failed the call (a bug or a crash inside the model, not the caller's input)."""

    code = INTERNAL_ERROR


class ModelProcessDied(ModelProcessError):
    """The process died under the call (crash, OOM kill): the call may be tried again on a restarted one."""

    code = MODEL_PROCESS_DIED


class ModelTimeout(ModelProcessError):
    code = MODEL_TIMEOUT


class ModelGone(RuntimeError):
    """The model was taken away while the call waited or ran: unloaded, evicted, or its process could not be
    started again. Final: the call is not tried again on this worker; its job ends with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def unloaded(model_id: str, why: str = "it was unloaded (POST /models/{id}/unload)") -> ModelGone:
    return ModelGone(MODEL_UNLOADED, f"model {model_id!r} went away while the job ran: {why.format(id=model_id)}")


def evicted(model_id: str) -> ModelGone:
    return ModelGone(
        MODEL_EVICTED,
        f"model {model_id!r} was evicted (least recently used) to make room for another model while the job "
        "ran; send it again (AETHERCORE_MODEL_CACHE_SIZE bounds the models a worker keeps)",
    )


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
    """A streamed call's job: the next chunk index, when its first piece was written, and the pieces (one per
    decoding step) held until `interval` of them make a chunk. The first piece is a chunk of its own (time to
    first token), the rest go `interval` at a time, and the held ones when the call ends: the boundaries depend
    only on the piece count, so a retry that generates the same text cuts the same chunks, and the chunks an
    earlier try published are skipped by index."""

    job_id: str
    model_id: str
    submitted_at: float | None = None
    index: int = 0
    first_piece_at: float | None = None
    interval: int = 1
    held: list[str] = field(default_factory=list)
    pieces: int = 0

    def add(self, piece: str) -> str | None:
        """One step's piece; the chunk to publish now, or None while it is held."""
        self.held.append(piece)
        self.pieces += 1
        return self.flush() if self.pieces == 1 or len(self.held) >= self.interval else None

    def flush(self) -> str | None:
        """The held pieces as one chunk (None when none are held)."""
        if not self.held:
            return None
        chunk = "".join(self.held)
        self.held.clear()
        return chunk


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
    """The cache's view of a model whose instances run in their own processes.

    Taking the model away is two steps: `retire(gone)` refuses new work (a GENERATE, a restart) while the
    calls in flight may still end (an unload's drain), then `close()` stops the processes and every call still
    in flight fails with `gone` (model_unloaded, model_evicted, or model_process_died when a restart failed).
    """

    def __init__(self, spec: ModelSpec, settings: Settings, device: str, sink: StreamSink | None = None) -> None:
        self.spec = spec
        self.settings = settings
        self.device = device
        self.sink = sink
        self.instances: list[ModelProcess] = []
        self.dtype_name: str | None = None  # what the model process reports once loaded
        self._restart_lock = threading.Lock()  # one restart at a time
        self._lock = threading.Lock()  # `instances` and `_gone` change together
        self._gone: ModelGone | None = None
        self._ending: ModelGone | None = None  # what the calls still in flight at close() end with
        self.restarts = 0
        self.death_handled = False  # its death reported and acted on (WorkerService.model_died)

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
        instances = list(self.instances)
        info = dict(instances[0].info.get("describe", {})) if instances else {}
        info["processes"] = [{"pid": p.pid, "rss_bytes": p.rss_bytes()} for p in instances]
        info["restarts"] = self.restarts
        return info

    def memory_bytes(self) -> int:
        return sum(p.memory_bytes() for p in list(self.instances))

    def process_rss_bytes(self) -> int:
        return sum(p.rss_bytes() for p in list(self.instances))

    def gpu_memory_bytes(self) -> int | None:
        values = [p.info.get("gpu_memory_bytes") for p in list(self.instances)]
        known = [v for v in values if v is not None]
        return sum(known) if values and len(known) == len(values) else None

    # -- going away ---------------------------------------------------------------------------
    @property
    def gone(self) -> ModelGone | None:
        """Why the model is going (or went) away; None while it serves."""
        return self._gone

    def retire(self, gone: ModelGone, ending: ModelGone | None = None) -> None:
        """Refuse new work from now on with `gone` (the first reason given wins); the calls in flight go on until
        close(), which ends them with `ending` (default: `gone`; a drained unload says they outran the drain)."""
        with self._lock:
            if self._gone is None:
                self._gone, self._ending = gone, ending

    @property
    def ending(self) -> ModelGone | None:
        """What the calls still in flight at close() end with."""
        return self._ending or self._gone

    def check_open(self) -> None:
        """Raise ModelGone (a fresh copy, for this caller's traceback) once the model is going away."""
        gone = self._gone
        if gone is not None:
            raise ModelGone(gone.code, str(gone))

    def in_flight(self) -> int:
        return sum(p.busy for p in list(self.instances))

    def close(self) -> None:
        """Stop every process; the calls still in flight fail with why the model went away."""
        with self._lock:
            if self._gone is None:
                self._gone = unloaded(self.spec.id)
            instances, self.instances = self.instances, []
        for process in instances:
            process.stop(self.ending)

    # -- calls --------------------------------------------------------------------------------
    def run_batch_on(self, index: int, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
        instances = self.instances
        if index >= len(instances):
            self.check_open()
            raise ModelProcessDied(f"model {self.spec.id!r} has no process {index}")
        outputs = instances[index].call(wire.RUN, inputs, parameters)
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
        rank: int = 1,
        aging_s: float = 0.0,
    ) -> GenerationCall:
        """Hand one generation request to the running batch of the least busy instance (ModelGone once the
        model is going away: nothing new joins a batch that is draining)."""
        self.check_open()
        instances = self.instances
        if not instances:
            raise ModelProcessDied(f"model {self.spec.id!r} has no running process")
        process = min(instances, key=lambda p: p.busy)
        options = {
            "stream": stream is not None,
            "exclusive": exclusive,
            "deadline": deadline,
            "rank": rank,  # admission order into the running batch (priority lanes)
            "aging_s": aging_s,
        }
        _call_id, future = process.submit((wire.GENERATE, inputs, parameters, options), stream)
        return GenerationCall(process, future, exclusive)

    def generation_stats(self) -> dict[str, int]:
        """The running batches of every instance, added up (for the heartbeat and the metrics)."""
        total: dict[str, int] = {}
        for process in list(self.instances):
            for key, value in process.generation.items():
                total[key] = total.get(key, 0) + value
        return total

    def revive(self, index: int) -> bool:
        """Replace a dead instance with a fresh process (the model is loaded again). False if the model is going
        away, or if the restart failed: then the model retires with `model_process_died` (see `gone`)."""
        with self._restart_lock:
            with self._lock:
                if self._gone is not None or index >= len(self.instances):
                    return False
                if self.instances[index].alive:
                    return True
            process = ModelProcess(self.spec, self.settings, self.device, index, self.sink)
            try:
                process.start(self.settings.load_timeout)
            except Exception as exc:
                logger.bind(model_id=self.spec.id).error("could not restart model process {}: {}", index, exc)
                self.retire(
                    ModelGone(
                        MODEL_PROCESS_DIED,
                        f"the process of model {self.spec.id!r} died and could not be started again ({exc}); "
                        f"the model was unloaded: load it again with POST /models/{self.spec.id}/load",
                    )
                )
                return False
            with self._lock:
                placed = self._gone is None and index < len(self.instances)
                if placed:
                    self.instances[index] = process
            if not placed:  # the model went away while it restarted
                process.stop(self._gone)
                return False
            self.restarts += 1
            logger.bind(model_id=self.spec.id).warning("model process {} restarted (pid {})", index, process.pid)
            return True

    def revive_all(self) -> bool:
        return all(self.revive(i) for i in range(len(self.instances))) and self._gone is None

    def alive(self) -> bool:
        instances = self.instances
        return bool(instances) and all(p.alive for p in instances)
