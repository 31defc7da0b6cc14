"""A simulated device: forward passes that take a declared amount of wall time and no CPU.

A capacity-planning and benchmarking tool, in the spirit of Triton's `identity` backend: with the model's
own cost replaced by a sleep (which releases the GIL, as a thread waiting on a synchronous CUDA call does),
what a benchmark measures is the serving stack's cost around each request, at the speed of the device the
profile describes. A simulated model is declared in models.yaml (`model_type: simulated` and a `simulate:`
profile, config/models.py `Simulation`) and served like any other: it runs in its own model process, behind
the worker's batcher, and a text-generation profile runs the same running batch (admission, cancel,
deadlines, `queued`, stop strings, usage) as a real causal LM (workers/runtimes/scheduling.py).

  feature-extraction  a batch of b texts sleeps base_ms + per_item_ms x b and gives each text a float32 unit
                      vector of `dim` values (one of a fixed set, picked by the text: deterministic), in the
                      shape, dtype and normalisation of the transformers runtime's embeddings;
  text-generation     each decoding step over r running rows sleeps step_ms + per_row_ms x r and gives every row
                      one token (a word, deterministic for its prompt, so a retry streams the same text).

It imports neither torch nor transformers: its process is an interpreter, numpy and the pipe.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from config.models import ModelSpec, Simulation
from config.parameters import DEFAULT_CHAT_TEMPLATE
from config.settings import Settings
from workers.runtimes.base import TextRuntime
from workers.runtimes.scheduling import RunningBatch, Sampling, Sequence, run_to_end

# Distinct embeddings a simulated encoder gives (a text picks one by its checksum), and their seed.
BASIS_ROWS = 1024
SEED = 1234
# What a simulated decoder says, one word per token.
WORDS = (
    " the",
    " device",
    " serves",
    " every",
    " row",
    " one",
    " token",
    " per",
    " step",
    " while",
    " the",
    " stack",
    " around",
    " it",
    " is",
    " measured",
)


_PR_SET_TIMERSLACK = 29  # linux/prctl.h
_slack_set = threading.local()


def device_sleep(seconds: float) -> None:
    """A simulated pass's wall time: `time.sleep`, on a thread whose timer slack is 1 ns.

    Linux lets a sleeping thread wake up to its timer slack late (50 µs by default, and the wake-up itself adds
    ~25 µs): a 3.11 ms pass slept ~3.19 ms, 2.4 % more device time than the profile declares and, at one
    client, 0.05 ms of latency charged to the stack (docs/CAPACITY.md). A device waits no slack, so the
    simulated one asks for none (prctl PR_SET_TIMERSLACK, per thread, once)."""
    if not getattr(_slack_set, "done", False):
        _slack_set.done = True
        if sys.platform == "linux":
            ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    time.sleep(seconds)


def tokens_of(text: str) -> list[int]:
    """A simulated tokenizer: one token per word (its checksum); what usage counts."""
    return [zlib.crc32(word.encode()) for word in text.split()]


class _Simulated(TextRuntime):
    """What both simulated runtimes share: the profile, the clock (replaceable in tests), memory, description."""

    # Called with each pass's seconds. time.sleep releases the GIL: the process takes no CPU while it "runs".
    sleep: Callable[[float], None] = staticmethod(device_sleep)

    def __init__(self, spec: ModelSpec, settings: Settings, device: str) -> None:
        super().__init__(spec, settings, device)
        if spec.simulate is None:
            raise ValueError(f"model {spec.id!r}: a simulated model needs its `simulate:` profile")
        self.profile: Simulation = spec.simulate
        self.dtype_name = "float32"

    def memory_bytes(self) -> int:
        return self.profile.memory  # declared (nothing is allocated for it)

    def describe(self) -> dict[str, Any]:
        return {
            "parameter_count": 0,
            "architecture": "simulated device",
            "simulate": asdict(self.profile),
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": self.outputs(),
        }

    def outputs(self) -> list[dict[str, Any]]:
        return []


class SimulatedFeatureExtraction(_Simulated):
    """Embeddings: one pass per batch, base_ms + per_item_ms x batch of wall time."""

    def load(self) -> None:
        basis = np.random.default_rng(SEED).standard_normal((BASIS_ROWS, self.profile.dim)).astype(np.float32)
        self.basis = basis / np.linalg.norm(basis, axis=1, keepdims=True)

    def pass_seconds(self, batch: int) -> float:
        return (self.profile.base_ms + self.profile.per_item_ms * batch) / 1000.0

    def run_batch(self, inputs: list[dict[str, Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        texts = self.texts(inputs)
        max_length = self.max_length(parameters)
        self.sleep(self.pass_seconds(len(texts)))
        vectors = self.basis[[zlib.crc32(text.encode()) % BASIS_ROWS for text in texts]]
        # As the transformers runtime gives them: float32 unit rows, and `tokens` (the input's length after
        # truncation, with the encoder's two special tokens) for usage.
        return [
            {"embedding": vector, "tokens": min(len(tokens_of(text)) + 2, max_length)}
            for vector, text in zip(vectors, texts)
        ]

    def outputs(self) -> list[dict[str, Any]]:
        return [{"name": "embedding", "datatype": "FP32", "shape": [self.profile.dim]}]


@dataclass
class SimulatedSequence(Sequence):
    first: int = 0  # the word its first token is (from its prompt)
    decoded: str = ""  # the text of generated[:decoded_count], kept as tokens arrive
    decoded_count: int = 0


class SimulatedBatcher(RunningBatch):
    """The running batch of a simulated decoder: each step, the joiners enter and every row gets one token.
    Who runs, waits or leaves is RunningBatch's, as for a real model; only the pass is a sleep."""

    def __init__(self, spec: ModelSpec, sleep: Callable[[float], None]) -> None:
        profile = spec.simulate or Simulation()
        super().__init__(
            max_batch_size=spec.max_batch_size,
            kv_budget_bytes=spec.kv_cache_memory or 0,
            bytes_per_token=profile.kv_bytes_per_token,
        )
        self.profile = profile
        self.sleep = sleep

    def step_seconds(self, rows: int) -> float:
        return (self.profile.step_ms + self.profile.per_row_ms * rows) / 1000.0

    def _advance(self, joining: list[Sequence], events: list[tuple]) -> None:
        self.running.extend(joining)
        if not self.running:
            return
        self.sleep(self.step_seconds(len(self.running)))
        tokens = [(getattr(s, "first", 0) + len(s.generated)) % len(WORDS) for s in self.running]
        self._emit(self.running, tokens, events)

    def _text(self, sequence: Sequence) -> str:
        if not isinstance(sequence, SimulatedSequence):
            return "".join(WORDS[token] for token in sequence.generated)
        for token in sequence.generated[sequence.decoded_count :]:
            sequence.decoded += WORDS[token]
        sequence.decoded_count = len(sequence.generated)
        return sequence.decoded


class SimulatedTextGeneration(_Simulated):
    """Generation: served by continuous batching in the model process, like the transformers runtime."""

    _chat_template: Any = None

    def load(self) -> None:
        pass  # nothing to load

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The default chat template (a real model without a template of its own renders the same), with jinja2
        as transformers' apply_chat_template renders it (imported on first use: a plain-text run never needs it)."""
        if self._chat_template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._chat_template = environment.from_string(DEFAULT_CHAT_TEMPLATE)
        return self._chat_template.render(messages=messages, add_generation_prompt=True)

    def run_batch(self, inputs: list[dict[str, Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        sequences = [self.sequence(index, item, parameters, stream=False) for index, item in enumerate(inputs)]
        return [result for _key, result in run_to_end(self.continuous_batcher(), sequences)]

    def outputs(self) -> list[dict[str, Any]]:
        return [{"name": "text", "datatype": "BYTES", "shape": [-1]}]

    def continuous_batcher(self) -> SimulatedBatcher:
        return SimulatedBatcher(self.spec, self.sleep)

    def sequence(self, key: Any, inputs: dict[str, Any], parameters: dict[str, Any], **options: Any) -> Sequence:
        """One request for the running batch; InvalidInput for a bad text or parameter (the same checks)."""
        messages = self.chat_messages(inputs)
        if messages is None:
            text = self.texts([inputs])[0]
        else:
            text = self.render_chat(messages)
        prompt = tokens_of(text)
        return SimulatedSequence(
            key=key,
            prompt=prompt,
            max_new=self.max_length(parameters),
            sampling=Sampling.from_parameters(parameters),  # checked; the device has nothing to sample from
            first=sum(prompt) % len(WORDS),
            **options,
        )
