"""The model cache's handle on a model whose instances run in processes of their own.

`RemoteRuntime` is what the model cache holds: it looks like a runtime (load, describe, memory,
close) and owns the model's `instances` processes (workers/model_process.py), restarting one that died. The
Celery worker process never imports torch or onnxruntime; it moves whole batches across the boundary, once each
way.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from loguru import logger

from config.models import ModelSpec
from config.settings import Settings
from tasks.errors import MODEL_PROCESS_DIED
from workers import wire
from workers.model_errors import ModelGone, ModelProcessDied, ModelProcessError, unloaded
from workers.model_process import ModelProcess
from workers.stream_target import StreamSink, StreamTarget


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
        self._passes = threading.local()  # per batcher thread: the pass it ran last, as its process timed it

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
        outputs, self._passes.timing = instances[index].call_timed(wire.RUN, inputs, parameters)
        if len(outputs) != len(inputs):
            raise ModelProcessError(f"the model returned {len(outputs)} outputs for {len(inputs)} inputs")
        return outputs

    def pass_timing(self) -> Any:
        """The pass this thread ran last, as its model process timed it: (start ns, end ns, pid), or None."""
        return getattr(self._passes, "timing", None)

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
