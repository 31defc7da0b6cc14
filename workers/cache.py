"""The resident model cache of one worker process: at most one copy of each model, an LRU memory budget.

Loading is serialised per model (two threads asking for the same model load it once, and a thread that
waited for a load that failed gets that failure rather than trying again: concurrent jobs share one load
attempt, so a failing or timing-out load ends all of them within one AETHERCORE_LOAD_TIMEOUT). Before a
load, the model's size on disk is the memory estimate: a model larger than its own
`max_memory` or than the whole budget is refused before anything is read; otherwise the least
recently used models are evicted until the estimate fits. Once loaded, a model's memory is what it
really takes: for a model in its own process, that process's RSS beyond the interpreter and
libraries (workers/model_process.py), refreshed with every heartbeat.

The cache holds whatever the factory builds: model processes in the worker, in-process runtimes in
unit tests. It never imports torch itself.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from loguru import logger

from config.models import ModelSpec
from config.units import format_size
from tasks.errors import MODEL_EVICTED, MODEL_LOAD_FAILED, MODEL_TOO_LARGE, MODEL_UNAVAILABLE, MODEL_UNLOADED
from tasks.states import LOADED, LOADING


class Resident(Protocol):
    """What the cache holds a model as: RemoteRuntime in a worker (its processes), a Runtime in tests."""

    dtype_name: str | None

    def load(self) -> None: ...

    def memory_bytes(self) -> int: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


ResidentT = TypeVar("ResidentT", bound=Resident)


class ModelLoadError(RuntimeError):
    """A model could not be made resident; `code` is the API error code."""

    def __init__(self, message: str, code: str = MODEL_LOAD_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Entry(Generic[ResidentT]):
    runtime: ResidentT
    memory_bytes: int
    generation: int
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    load_ms: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    gpu_memory_bytes: int | None = None


def release_memory(device: str) -> None:
    """Return freed memory: collect cycles, give the C heap back to the OS, empty the CUDA cache."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    if device.startswith("cuda") and "torch" in sys.modules:  # an in-process runtime (unit tests)
        import torch

        torch.cuda.empty_cache()


class ModelCache(Generic[ResidentT]):
    def __init__(
        self,
        budget_bytes: int,
        device: str,
        factory: Callable[[ModelSpec], ResidentT],
        estimate: Callable[[ModelSpec], int],
        on_change: Callable[[], None] = lambda: None,
        on_evict: Callable[[str], None] = lambda model_id: None,
        on_unload: Callable[[str, Any, str, float], None] = lambda model_id, runtime, reason, drain_s: None,
    ) -> None:
        """`on_unload(model_id, runtime, reason, drain_s)` runs before a runtime is closed: `reason` is
        MODEL_UNLOADED or MODEL_EVICTED (tasks/errors.py), `drain_s` how long its jobs in flight may still run."""
        self.budget_bytes = budget_bytes
        self.device = device
        self._factory = factory
        self._estimate = estimate
        self._on_change = on_change
        self._on_evict = on_evict
        self._on_unload = on_unload
        self._entries: OrderedDict[str, Entry[ResidentT]] = OrderedDict()  # least recently used first
        self._loading: dict[str, float] = {}
        self._lock = threading.RLock()
        self._model_locks: dict[str, threading.Lock] = {}
        self._attempts: dict[str, int] = {}  # loads finished (loaded or failed), per model
        self._last_error: dict[str, ModelLoadError] = {}  # the last load's failure, per model (None: it loaded)

    # -- reads -------------------------------------------------------------------------------
    def get(self, model_id: str) -> ResidentT | None:
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None:
                return None
            entry.last_used = time.time()
            self._entries.move_to_end(model_id)
            return entry.runtime

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.memory_bytes for e in self._entries.values())

    def process_rss_bytes(self) -> int:
        """The model processes' whole RSS (interpreter and libraries included), for the heartbeat."""
        with self._lock:
            runtimes = [e.runtime for e in self._entries.values()]
        return sum(getattr(r, "process_rss_bytes", lambda: 0)() for r in runtimes)

    def gpu_bytes(self) -> int:
        """GPU memory held by the resident models (their processes' CUDA reservations)."""
        with self._lock:
            return sum(e.gpu_memory_bytes or 0 for e in self._entries.values())

    def refresh(self) -> None:
        """Re-measure every resident model's memory (a model process grows as it serves)."""
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            try:
                entry.memory_bytes = entry.runtime.memory_bytes()
                entry.info = entry.runtime.describe()  # a restarted model process has a new pid
            except Exception:
                pass

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            models = {
                mid: {
                    "state": LOADED,
                    "memory_bytes": e.memory_bytes,
                    "loaded_at": e.loaded_at,
                    "last_used": e.last_used,
                    "generation": e.generation,
                    "load_ms": round(e.load_ms, 1),
                    "gpu_memory_bytes": e.gpu_memory_bytes,
                    "dtype": e.runtime.dtype_name,
                    "info": e.info,
                    **_decoding(e.runtime),
                }
                for mid, e in self._entries.items()
            }
            for mid, since in self._loading.items():
                models.setdefault(mid, {"state": LOADING, "memory_bytes": 0, "since": since})
            return models

    # -- load / unload -----------------------------------------------------------------------
    def load(self, spec: ModelSpec, generation: int = 0) -> ResidentT:
        with self._lock:
            lock = self._model_locks.setdefault(spec.id, threading.Lock())
            seen = self._attempts.get(spec.id, 0)
        with lock:
            runtime = self.get(spec.id)
            if runtime is not None:
                return runtime
            failed = self._last_error.get(spec.id)
            if failed is not None and self._attempts.get(spec.id, 0) != seen:
                raise ModelLoadError(str(failed), failed.code)  # the load this thread waited for failed
            try:
                runtime = self._load(spec, generation)
            except ModelLoadError as exc:
                self._last_error[spec.id] = exc
                raise
            finally:
                # Counted when the attempt ends, not when it starts: a thread that read `seen` while this
                # load was running must see a change afterwards and share its failure.
                with self._lock:
                    self._attempts[spec.id] = self._attempts.get(spec.id, 0) + 1
            self._last_error.pop(spec.id, None)
            return runtime

    def _load(self, spec: ModelSpec, generation: int) -> ResidentT:
        """The body of load(), under the model's lock."""
        estimate = self._check_fits(spec)
        self._make_room(spec.id, estimate)
        with self._lock:
            self._loading[spec.id] = time.time()
        self._on_change()
        started = time.perf_counter()
        runtime: ResidentT | None = None
        try:
            runtime = self._factory(spec)
            runtime.load()
            memory = runtime.memory_bytes()
            info = runtime.describe()
        except Exception as exc:
            with self._lock:
                self._loading.pop(spec.id, None)
            runtime = None  # the failed model's memory goes before release_memory
            release_memory(self.device)
            self._on_change()
            logger.bind(model_id=spec.id).warning("loading failed: {}", exc)
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(
                str(exc) if spec.id in str(exc) else f"model {spec.id!r} failed to load: {exc}",
                getattr(exc, "code", MODEL_LOAD_FAILED),
            ) from exc
        load_ms = (time.perf_counter() - started) * 1000
        gpu_bytes = getattr(runtime, "gpu_memory_bytes", lambda: None)()
        with self._lock:
            self._loading.pop(spec.id, None)
            self._entries[spec.id] = Entry(
                runtime, memory, generation, load_ms=load_ms, info=info, gpu_memory_bytes=gpu_bytes
            )
        logger.bind(model_id=spec.id).info("model resident: {} in {:.0f} ms", format_size(memory), load_ms)
        self._on_change()
        return runtime

    def unload(self, model_id: str, reason: str = MODEL_UNLOADED, drain_s: float = 0.0) -> bool:
        """Take the model out of the cache (nothing new finds it), let `on_unload` drain or end its jobs, then
        close it: its memory goes."""
        with self._lock:
            entry = self._entries.pop(model_id, None)
        if entry is None:
            return False
        try:
            self._on_unload(model_id, entry.runtime, reason, drain_s)
        except Exception:
            logger.bind(model_id=model_id).exception("ending the jobs of an unloaded model failed")
        entry.runtime.close()
        del entry
        release_memory(self.device)
        logger.bind(model_id=model_id).info("model unloaded")
        self._on_change()
        return True

    def _check_fits(self, spec: ModelSpec) -> int:
        try:
            estimate = self._estimate(spec)
        except Exception as exc:  # files missing or unreadable: nothing was loaded
            raise ModelLoadError(str(exc), getattr(exc, "code", MODEL_UNAVAILABLE)) from exc
        if spec.max_memory is not None and estimate > spec.max_memory:
            raise ModelLoadError(
                f"model {spec.id!r} needs about {format_size(estimate)}, more than its max_memory of "
                f"{format_size(spec.max_memory)}",
                MODEL_TOO_LARGE,
            )
        if estimate > self.budget_bytes:
            raise ModelLoadError(
                f"model {spec.id!r} needs about {format_size(estimate)}, more than the whole model cache "
                f"(AETHERCORE_MODEL_CACHE_SIZE={format_size(self.budget_bytes)})",
                MODEL_TOO_LARGE,
            )
        return estimate

    def _make_room(self, model_id: str, needed: int) -> None:
        while True:
            with self._lock:
                if self.used_bytes() + needed <= self.budget_bytes or not self._entries:
                    return
                victim = next(iter(self._entries))
            logger.bind(model_id=victim).info("evicting least recently used model to make room for {}", model_id)
            # Withdraw it from the desired state first, so no reconcile pass loads it right back. Its running jobs
            # end at once (model_evicted): the load that needs the room waits for nothing.
            self._on_evict(victim)
            self.unload(victim, MODEL_EVICTED)


def _decoding(runtime: Any) -> dict[str, Any]:
    """A generation model's running batch as last reported (running, waiting, kv_cache_bytes)."""
    stats = runtime.generation_stats() if hasattr(runtime, "generation_stats") else None
    return {"decoding": stats} if stats else {}
