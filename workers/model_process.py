"""The Celery worker's handle on its model processes (see workers/model_host.py for the other side).

`ModelProcess` is one spawned process holding one model instance: a pipe, a reader thread that
routes replies to the calls waiting for them, and a watchdog per call (no reply or chunk within the
model's `timeout_s` -> the process is killed and the call fails with `ModelTimeout`).

`RemoteRuntime` is what the model cache holds: it looks like a runtime (load, describe, memory,
close) and owns the model's `instances` processes. The Celery worker process never imports torch or
onnxruntime; it moves whole batches across the boundary, once each way.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable

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


class ModelProcess:
    def __init__(self, spec: ModelSpec, settings: Settings, device: str, instance: int = 0) -> None:
        self.spec = spec
        self.settings = settings
        self.device = device
        self.instance = instance
        self.info: dict[str, Any] = {}
        self._conn: Any = None
        self._process: Any = None
        self._send_lock = threading.Lock()
        self._calls: dict[int, queue.SimpleQueue] = {}
        self._calls_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._dead = threading.Event()
        self._stopping = False
        self.busy = 0  # calls in flight (read without a lock: a hint for picking an instance)

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
                [sys.executable, "-m", "workers.model_host", str(theirs.fileno())], pass_fds=[theirs.fileno()],
                cwd=REPO_ROOT, env=env)
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
            raise ModelLoadError(f"the process loading model {self.spec.id!r} died (exit code {code})",
                                 "model_load_failed") from None
        if message is None:
            self.kill()
            raise ModelLoadError(f"model {self.spec.id!r} did not load within {timeout_s:.0f} s "
                                 "(AETHERCORE_LOAD_TIMEOUT)", "model_load_timeout")
        if message[0] != "ready":
            self.stop()
            raise ModelLoadError(message[2], message[1])
        self.info = message[1]
        threading.Thread(target=self._read_loop, name=f"model-reader-{self.spec.id}-{self.instance}",
                         daemon=True).start()
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
        return max(grown, self.info.get("weights_bytes", 0), 0)

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
        for replies in calls.values():
            replies.put(("died",))
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
            with self._calls_lock:
                replies = self._calls.get(message[1])
            if replies is not None:
                replies.put(message)
        if not self._dead.is_set() and not self._stopping:
            code = self._exit_code(1)
            log = logger.bind(model_id=self.spec.id)
            if code == -signal.SIGTERM:  # the whole worker is being stopped (its process group got SIGTERM)
                log.info("model process {} (pid {}) stopped", self.instance, self.pid)
            else:
                log.error("model process {} (pid {}) died (exit code {})", self.instance, self.pid, code)
        self._mark_dead()

    # -- calls --------------------------------------------------------------------------------
    def call(self, op: str, inputs: Any, parameters: dict[str, Any],
             on_chunk: Callable[[str], bool] | None = None) -> Any:
        """Run one operation; `on_chunk(text)` returning False cancels a stream."""
        if self._dead.is_set():
            raise ModelProcessDied(f"the process of model {self.spec.id!r} is not running")
        call_id = next(self._ids)
        replies: queue.SimpleQueue = queue.SimpleQueue()
        with self._calls_lock:
            self._calls[call_id] = replies
        self.busy += 1
        try:
            try:
                with self._send_lock:
                    self._conn.send((op, call_id, inputs, parameters))
            except (OSError, ValueError) as exc:
                raise ModelProcessDied(f"the process of model {self.spec.id!r} is gone ({exc})") from None
            return self._await(call_id, replies, on_chunk)
        finally:
            self.busy -= 1
            with self._calls_lock:
                self._calls.pop(call_id, None)

    def _await(self, call_id: int, replies: queue.SimpleQueue, on_chunk: Callable[[str], bool] | None) -> Any:
        timeout = self.spec.timeout_s
        while True:
            try:
                message = replies.get(timeout=timeout)
            except queue.Empty:
                logger.bind(model_id=self.spec.id).error(
                    "model process {} (pid {}) made no progress for {} s (timeout_s); killing it",
                    self.instance, self.pid, timeout)
                self.kill()
                raise ModelTimeout(f"model {self.spec.id!r} made no progress within its timeout_s of "
                                   f"{timeout:g} s; its process was restarted") from None
            kind = message[0]
            if kind == "result":
                return message[2]
            if kind == "chunk":
                if on_chunk is not None and on_chunk(message[2]) is False:
                    with self._send_lock:
                        try:
                            self._conn.send(("cancel", call_id))
                        except (OSError, ValueError):
                            pass
                continue
            if kind == "cancelled":
                raise CallCancelled()
            if kind == "error":
                if message[2] == "invalid_input":
                    raise InvalidInput(message[3])
                raise ModelProcessError(message[3])
            raise ModelProcessDied(f"the process of model {self.spec.id!r} died while running this job")


class RemoteRuntime:
    """The cache's view of a model whose instances run in their own processes."""

    def __init__(self, spec: ModelSpec, settings: Settings, device: str) -> None:
        self.spec = spec
        self.settings = settings
        self.device = device
        self.instances: list[ModelProcess] = []
        self.dtype_name: str | None = None  # what the model process reports once loaded
        self._restart_lock = threading.Lock()
        self.restarts = 0

    def load(self) -> None:
        try:
            for index in range(self.spec.instances):
                process = ModelProcess(self.spec, self.settings, self.device, index)
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

    def stream(self, inputs: Any, parameters: dict[str, Any], on_chunk: Callable[[str], bool]) -> Any:
        process = min(self.instances, key=lambda p: p.busy)
        return process.call("stream", inputs, parameters, on_chunk)

    def revive(self, index: int) -> bool:
        """Replace a dead instance with a fresh process (the model is loaded again); False if that fails."""
        with self._restart_lock:
            if index >= len(self.instances):
                return False
            if self.instances[index].alive:
                return True
            process = ModelProcess(self.spec, self.settings, self.device, index)
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
