"""The runtime contract and the input checks every runtime shares."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from config.models import ModelSpec
from config.parameters import MAX_LENGTH, checked, messages_error, text_error
from config.settings import Settings

if TYPE_CHECKING:  # scheduling imports this module (InvalidInput)
    from workers.runtimes.scheduling import RunningBatch, Sequence


class InvalidInput(ValueError):
    """The request's inputs or parameters cannot be run by this model; fails only that job."""


class Runtime(ABC):
    """A loaded model. `run_batch` takes the inputs of several jobs that share `parameters`."""

    def __init__(self, spec: ModelSpec, settings: Settings, device: str) -> None:
        self.spec = spec
        self.settings = settings
        self.device = device  # worker device label: cpu | cuda:N
        # Inside a pinned worker the one visible GPU is always cuda:0.
        self.torch_device = "cuda" if device.startswith("cuda") else "cpu"
        # Half precision only where it pays: on a GPU. A CPU worker serves float32 whatever the config says.
        self.dtype_name = spec.dtype if self.torch_device == "cuda" else "float32"

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype_name)

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def run_batch(self, inputs: list[dict[str, Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]: ...

    def run(self, inputs: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
        return self.run_batch([inputs], parameters)[0]

    @abstractmethod
    def memory_bytes(self) -> int: ...

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """parameter_count, inputs, outputs: what /models/{id}/info shows once loaded."""

    def close(self) -> None:  # noqa: B027 -- a default that does nothing, not a method every runtime must write
        """Drop references to the model; the cache collects garbage afterwards."""


@runtime_checkable
class GenerationRuntime(Protocol):
    """What a text-generation runtime adds to `Runtime`: its process serves it by continuous batching
    (workers/model_host.py) instead of one `run_batch` per message."""

    def continuous_batcher(self) -> RunningBatch:
        """The scheduler the model process steps (workers/runtimes/scheduling.py)."""
        ...

    def sequence(self, key: Any, inputs: dict[str, Any], parameters: dict[str, Any], **options: Any) -> Sequence:
        """One request for the scheduler; InvalidInput for a bad text or parameter."""
        ...


class TextRuntime(Runtime):
    """Shared input handling for text models."""

    def __init__(self, spec: ModelSpec, settings: Settings, device: str) -> None:
        super().__init__(spec, settings, device)
        # Fast tokenizers are not safe to call from several threads at once ("Already borrowed").
        self._tokenizer_lock = threading.Lock()

    def texts(self, inputs: list[dict[str, Any]]) -> list[str]:
        texts = []
        for item in inputs:
            text = item.get("text") if isinstance(item, dict) else None
            problem = text_error(text)  # the rules the API checked (config/parameters.py); a non-string fails them
            if problem or not isinstance(text, str):
                raise InvalidInput(f"inputs.text {problem}")
            texts.append(text)
        return texts

    def chat_messages(self, inputs: Any) -> list[dict[str, Any]] | None:
        """`inputs.messages` (text-generation), checked by the rules the API checked; None for a `text` input."""
        if not isinstance(inputs, dict) or "messages" not in inputs:
            return None
        problem = messages_error(inputs["messages"])
        if problem:
            raise InvalidInput(f"inputs.messages {problem}")
        return inputs["messages"]

    def max_length(self, parameters: dict[str, Any]) -> int:
        try:
            return checked(MAX_LENGTH, parameters.get("max_length", self.spec.max_length), self.spec.max_length_limit)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None


_thread_state = threading.local()


def intra_op_threads(settings: Settings, instances: int = 1) -> int:
    """Intra-op threads per forward pass: the cores shared out among a model's parallel instances."""
    import os

    return settings.torch_threads or max(1, (os.cpu_count() or 1) // max(1, instances))


def set_torch_threads(count: int) -> None:
    """torch's intra-op thread count is per thread: call this in the thread that runs forward passes."""
    import torch

    torch.set_num_threads(count)
    _thread_state.torch_threads_set = True


def ensure_torch_threads(settings: Settings) -> None:
    """For threads that were not set up by a batcher (e.g. a task thread streaming a generation)."""
    if not getattr(_thread_state, "torch_threads_set", False):
        set_torch_threads(intra_op_threads(settings))


def torch_module_bytes(module: Any) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def torch_parameter_count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())
