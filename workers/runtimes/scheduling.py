"""The running batch of a text-generation model process, written once: which requests are in it and what the
worker is told about each. Torch-free; the forward passes are a subclass's.

Every `step()`:
  1. cancelled requests and requests past their job's deadline leave       ("cancelled" / "error" deadline);
  2. waiting requests join, FIFO, while the batch has rows (`max_batch_size`) and, where a token of cache has a
     size, KV budget to spare; an `exclusive` request (a retry after a crash) joins only an empty batch and
     nothing joins it; every request left waiting is told so once                                ("queued");
  3. the subclass's `_advance(joining, events)`: the joiners enter the running batch and every running row
     gets its next token(s) (`_emit`);
  4. rows that reached max_length, an end-of-sequence token or a stop string leave   ("chunk", "result").
A failed forward pass fails the rows in it, not the process.

Two schedulers share these rules: `workers/runtimes/decoding.py` (a causal LM with a KV cache) and
`workers/runtimes/simulated.py` (a device that only takes time). Memory is bounded by admission: a request
reserves (prompt + max new tokens) tokens of cache for its whole life, and the batch admits a request only
while rows x longest reservation fits the budget (padded rows cost what the longest row costs).
"""

from __future__ import annotations

import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from config.parameters import SAMPLING, checked
from workers import wire
from workers.runtimes.base import InvalidInput

# Tokens prefilled in one iteration at most (the first request always gets in, however long).
PREFILL_TOKENS_PER_STEP = 2048


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings; defaults come from the model's generation_config."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any], config: Any = None) -> Sampling:
        """The request's settings, checked against their declarations (config/parameters.py); what it leaves out
        comes from the model's generation_config (None: the declared defaults)."""
        declared = {p.name: p for p in SAMPLING}

        def value(name: str, default: Any) -> Any:
            given = parameters.get(name)
            if given is None:
                return default
            try:
                return checked(declared[name], given)
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None

        temperature = value("temperature", getattr(config, "temperature", None) or 1.0)
        do_sample = value("do_sample", bool(getattr(config, "do_sample", False)))
        if "temperature" in parameters and "do_sample" not in parameters:
            do_sample = temperature > 0  # OpenAI's convention: a temperature asks for sampling, 0 for greedy
        return cls(
            do_sample=do_sample and temperature > 0,
            temperature=temperature,
            top_k=value("top_k", getattr(config, "top_k", None) or 0),
            top_p=value("top_p", getattr(config, "top_p", None) or 1.0),
            seed=value("seed", None),
            stop=value("stop", ()),
            repetition_penalty=value("repetition_penalty", getattr(config, "repetition_penalty", None) or 1.0),
        )


@dataclass
class Sequence:
    key: Any  # the caller's id for this request
    prompt: list[int]
    max_new: int
    sampling: Sampling = field(default_factory=Sampling)
    stream: bool = True  # send text as it is produced (else only the result)
    exclusive: bool = False  # run alone: a retry after a crash, to find out whether this request caused it
    deadline: float | None = None  # wall-clock time (time.time()) after which it is dropped
    rank: int = 1  # its priority lane's rank, aged (0 high .. 2 low; workers/lanes.py): admitted higher first
    aging_s: float = 0.0  # nothing is put ahead of a request that has waited this long (0: FIFO within ranks)
    queued_at: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already sent
    told_queued: bool = False
    cancelled: bool = False
    stopped: bool = False  # a stop string ended it
    generator: Any = None  # a seeded torch.Generator where the scheduler samples

    @property
    def horizon(self) -> int:
        """Tokens of cache this request holds at most: its prompt and every token it may generate."""
        return len(self.prompt) + self.max_new


class RunningBatch:
    """Admission, leaving, text and ends of the running batch; a subclass runs the passes (module docstring).

    Subclasses implement `_advance` and `_text`, and keep their own per-row state in step with `running` by
    extending `_select` (rows kept) and `_reset_batch` (no rows left)."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        kv_budget_bytes: int,
        bytes_per_token: int,
        max_positions: int | None = None,
        eos_ids: set[int] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.kv_budget_bytes = kv_budget_bytes
        self.bytes_per_token = bytes_per_token  # 0: the cache is not modelled (admission by rows only)
        self.max_positions = max_positions
        self.eos_ids = eos_ids or set()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # -- requests -----------------------------------------------------------------------------
    def add(self, sequence: Sequence) -> None:
        """Queue a request; InvalidInput if it could never run (empty, too long, larger than the cache).
        An over-long prompt is cut to leave room for max_length new tokens, as the tokenizer would cut it."""
        if not sequence.prompt:
            raise InvalidInput("inputs.text produced no tokens")
        if self.max_positions is not None:
            sequence.prompt = sequence.prompt[: max(1, self.max_positions - sequence.max_new)]
            if sequence.horizon > self.max_positions:
                raise InvalidInput(
                    f"the prompt ({len(sequence.prompt)} tokens) and max_length ({sequence.max_new}) "
                    f"exceed the model's {self.max_positions} positions"
                )
        need = sequence.horizon * self.bytes_per_token
        if need > self.kv_budget_bytes:
            raise InvalidInput(
                f"the request needs {need / 2**20:.1f} MiB of KV cache, more than the model's "
                f"kv_cache_memory of {self.kv_budget_bytes / 2**20:.1f} MiB"
            )
        self._prepare(sequence)
        self._enqueue(sequence)

    def _enqueue(self, sequence: Sequence) -> None:
        """Behind the waiting requests of its own and higher lanes, ahead of lower lanes' (FIFO within a lane), but
        never ahead of one that has waited `aging_s` (so admission starves no lane for longer)."""
        waiting = self.waiting
        at = len(waiting)
        now = time.monotonic()
        aged = sequence.aging_s if sequence.aging_s > 0 else float("inf")
        while at > 0 and waiting[at - 1].rank > sequence.rank and now - waiting[at - 1].queued_at < aged:
            at -= 1
        waiting.insert(at, sequence)

    def _prepare(self, sequence: Sequence) -> None:
        """A subclass's set-up of an accepted request (e.g. its seeded generator)."""

    def cancel(self, key: Any) -> Sequence | None:
        """Mark a request cancelled; it leaves at the next step. Returns it if it was still known."""
        for sequence in (*self.running, *self.waiting):
            if sequence.key == key:
                sequence.cancelled = True
                return sequence
        return None

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting), "kv_cache_bytes": self.kv_cache_bytes()}

    def kv_cache_bytes(self) -> int:
        """The cache the running rows hold now: rows x the longest row (padding included)."""
        longest = max((len(s.prompt) + len(s.generated) for s in self.running), default=0)
        return len(self.running) * longest * self.bytes_per_token

    # -- one iteration ------------------------------------------------------------------------
    def step(self) -> list[tuple]:
        """Run one iteration; return its events:
        chunk, queued, result, cancelled or error (kind deadline | error), as workers/wire.py builds them."""
        events: list[tuple] = []
        self._drop_leavers(events)
        joining = self._admit(events)
        try:
            self._advance(joining, events)
        except Exception as exc:  # a failed forward pass fails the rows in it, not the process
            traceback.print_exc(file=sys.stderr)
            for sequence in {id(s): s for s in (*self.running, *joining)}.values():
                events.append(wire.error(sequence.key, wire.FAILURE, f"{type(exc).__name__}: {exc}"))
            self.running = []
            self._reset_batch()
            return events
        self._finish_rows(events)
        return events

    def _advance(self, joining: list[Sequence], events: list[tuple]) -> None:
        """Bring `joining` into the running batch and give every running row its next token(s) (`_emit`)."""
        raise NotImplementedError

    def _text(self, sequence: Sequence) -> str:
        """The whole text `sequence.generated` decodes to (end-of-sequence tokens left out)."""
        raise NotImplementedError

    def _select(self, keep: list[int]) -> None:
        """Keep only rows `keep` of the running batch (a subclass cuts its own per-row state to match)."""
        self.running = [self.running[i] for i in keep]

    def _reset_batch(self) -> None:
        """No rows left: a subclass drops its per-batch state."""

    def _drop_leavers(self, events: list[tuple]) -> None:
        now = time.time()
        waiting: deque[Sequence] = deque()
        for sequence in self.waiting:
            reason = self._leaving(sequence, now)
            if reason:
                events.append(reason)
            else:
                waiting.append(sequence)
        self.waiting = waiting
        keep = []
        for index, sequence in enumerate(self.running):
            reason = self._leaving(sequence, now)
            if reason:
                events.append(reason)
            else:
                keep.append(index)
        if len(keep) != len(self.running):
            self._select(keep)

    @staticmethod
    def _leaving(sequence: Sequence, now: float) -> tuple | None:
        if sequence.cancelled:
            return wire.cancelled(sequence.key)
        if sequence.deadline is not None and now > sequence.deadline:
            return wire.error(
                sequence.key,
                wire.DEADLINE,
                f"the job ran past its timeout after {len(sequence.generated)} generated tokens",
            )
        return None

    def _admit(self, events: list[tuple]) -> list[Sequence]:
        joining: list[Sequence] = []
        if any(s.exclusive for s in self.running):
            return joining
        horizon = max((s.horizon for s in self.running), default=0)
        prefill = 0
        while self.waiting and len(self.running) + len(joining) < self.max_batch_size:
            candidate = self.waiting[0]
            if candidate.exclusive and (self.running or joining):
                break
            rows = len(self.running) + len(joining) + 1
            longest = max(horizon, candidate.horizon)
            if rows * longest * self.bytes_per_token > self.kv_budget_bytes:
                break
            if joining and prefill + len(candidate.prompt) > PREFILL_TOKENS_PER_STEP:
                break
            joining.append(self.waiting.popleft())
            horizon, prefill = longest, prefill + len(candidate.prompt)
            if candidate.exclusive:
                break
        for sequence in self.waiting:
            if not sequence.told_queued and sequence.stream:
                sequence.told_queued = True
                events.append(wire.queued(sequence.key))
        return joining

    # -- tokens, text and ends ----------------------------------------------------------------
    def _emit(self, rows: list[Sequence], tokens: list[int], events: list[tuple]) -> None:
        for sequence, token in zip(rows, tokens):
            sequence.generated.append(token)
            if sequence.stream or sequence.sampling.stop:
                self._advance_text(sequence, events)

    def _advance_text(self, sequence: Sequence, events: list[tuple]) -> None:
        text = self._text(sequence)
        for stop in sequence.sampling.stop:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
                sequence.stopped = True
        sequence.text = text
        if sequence.stream:
            # Hold back what could be the start of a stop string, so a stop never shows half-sent.
            hold = 0 if sequence.stopped else max((len(s) - 1 for s in sequence.sampling.stop), default=0)
            upto = max(sequence.sent, len(text) - hold)
            if upto > sequence.sent:
                events.append(wire.chunk(sequence.key, text[sequence.sent : upto]))
                sequence.sent = upto

    def _ended(self, sequence: Sequence) -> str | None:
        if sequence.stopped or (sequence.generated and sequence.generated[-1] in self.eos_ids):
            return "stop"
        if len(sequence.generated) >= sequence.max_new:
            return "length"
        return None

    def _finish_rows(self, events: list[tuple]) -> None:
        keep = []
        for index, sequence in enumerate(self.running):
            reason = self._ended(sequence)
            if reason is None:
                keep.append(index)
                continue
            if not sequence.stream and not sequence.sampling.stop:
                sequence.text = self._text(sequence)  # not decoded step by step
            if sequence.stream and len(sequence.text) > sequence.sent:
                events.append(wire.chunk(sequence.key, sequence.text[sequence.sent :]))
                sequence.sent = len(sequence.text)
            events.append(
                wire.result(
                    sequence.key,
                    {
                        "text": sequence.text,
                        "tokens": len(sequence.generated),
                        "prompt_tokens": len(sequence.prompt),
                        "finish_reason": reason,
                    },
                )
            )
        if len(keep) != len(self.running):
            self._select(keep)


def run_to_end(
    batcher: RunningBatch, sequences: list[Sequence], on_text: Callable[[Any, str], None] | None = None
) -> list[tuple[Any, dict[str, Any]]]:
    """In-process use (tests, the benchmarks' reference): `sequences` as one batch of `batcher`, stepped until
    every one ended; (key, result) in key order. `on_text(key, piece)` gets each streamed piece of text."""
    for sequence in sequences:
        batcher.add(sequence)
    results: dict[Any, dict[str, Any]] = {}
    while batcher.has_work():
        for event in batcher.step():
            if event[0] == wire.CHUNK and on_text is not None:
                on_text(event[1], event[2])
            elif event[0] == wire.RESULT:
                results[event[1]] = event[2]
            elif event[0] == wire.ERROR:
                raise RuntimeError(event[3])
    return sorted(results.items())
