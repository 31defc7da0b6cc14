"""Continuous batching for causal language models (iteration-level scheduling, as in vLLM and TGI).

One running batch per model process. Which requests are in it (admission under `max_batch_size` and the KV
budget, cancels, deadlines, `queued`, stop strings, the ends) is `workers/runtimes/scheduling.py`
`RunningBatch`, shared with the simulated device; this module runs the forward passes of every `step()`:
the joiners' prompts prefilled together in one forward pass (at most PREFILL_TOKENS_PER_STEP tokens, so the
running streams are held up by one short prefill, never by a queue of them) and their caches merged into
the running one, then one decoding forward pass over every running row, each choosing its next token under
its own settings (greedy or sampled, temperature, top-k, top-p, seed, stop strings).

The KV cache is transformers' DynamicCache, one tensor pair per layer shaped [rows, heads, length, dim].
Rows are left-padded so that every row's newest token sits in the same (last) column: a decoding step
appends one column for all rows at once, a joining row is padded on the left to the batch's length (or
the batch to its), a leaving row is one index_select, and once long rows leave the columns no remaining
row uses are cut off the left. Positions are passed per row, so padding never shifts a row's positions.

Why not transformers' own ContinuousBatchingManager: measured on this project's CPU path (2 cores,
tiny-gpt2, 64 requests of 32 tokens) it produced 284 tokens/s where padded `generate` at batch 64 gave
2,435 — its paged-attention kernels are built for GPUs — and it owns its thread and request queue, while
the model process must interleave the step with its pipe (cancel, new requests) on one thread. The
scheduler here is small, runs the same on CPU and GPU, and is driven by the host's loop.

Memory is bounded by admission (scheduling.py): rows x the longest (prompt + max new tokens) must fit the
model's `kv_cache_memory`, at `kv_bytes_per_token` (every layer's keys and values) per token.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from workers.runtimes.scheduling import PREFILL_TOKENS_PER_STEP, RunningBatch, Sampling, Sequence

__all__ = ["PREFILL_TOKENS_PER_STEP", "ContinuousBatcher", "Sampling", "Sequence", "ThreadTuner"]


class ThreadTuner:
    """Intra-op threads for each decoding step, chosen by measurement per batch-size class (CPU only).

    Measured on tiny-gpt2 with 2 cores: one thread decodes faster than two at small batches (272 vs 237
    tokens/s at 1 row, 1,508 vs 1,039 at 8 rows: a small step's work is too fine to split) and two are
    faster at 64 rows (4,000 vs 3,278). Which count wins depends on the model and the machine, so the
    scheduler times its first decoding steps in each class of batch sizes (powers of two) under each
    candidate (1 and all threads) and keeps the faster one for that class. One thread left idle is also
    a core the worker, the API and Redis get without preempting the model.
    """

    TRIALS = 3

    def __init__(self, most: int) -> None:
        self.candidates = sorted({1, max(1, most)}, reverse=True)
        self.samples: dict[int, dict[int, list[float]]] = {}
        self.choice: dict[int, int] = {}
        self._last = 0

    def pick(self, rows: int) -> int:
        bucket = rows.bit_length()
        if len(self.candidates) == 1 or bucket in self.choice:
            return self.choice.get(bucket, self.candidates[0])
        samples = self.samples.setdefault(bucket, {c: [] for c in self.candidates})
        # One candidate at a time, for consecutive steps: a switch's first step is not representative.
        return next(c for c in self.candidates if len(samples[c]) < self.TRIALS)

    def record(self, rows: int, threads: int, seconds: float) -> None:
        bucket = rows.bit_length()
        switched, self._last = threads != self._last, threads
        if switched or bucket in self.choice or bucket not in self.samples:
            return  # the first step on a new thread count pays for waking the thread pool
        samples = self.samples[bucket]
        samples[threads].append(seconds / rows)
        if all(len(times) >= self.TRIALS for times in samples.values()):
            self.choice[bucket] = min(self.candidates, key=lambda c: sorted(samples[c])[len(samples[c]) // 2])


class ContinuousBatcher(RunningBatch):
    """The running batch of one causal LM; driven by the model process's loop (see module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int, kv_budget_bytes: int, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        config = model.config
        generation = getattr(model, "generation_config", None)
        eos = _first(getattr(generation, "eos_token_id", None), config.eos_token_id)
        pad = _first(getattr(generation, "pad_token_id", None), config.pad_token_id, eos, 0)
        self.pad_id = int(pad[0] if isinstance(pad, (list, tuple)) else pad)
        self.suppress = torch.tensor(
            list(getattr(generation, "suppress_tokens", None) or []), dtype=torch.long, device=device
        )
        self.no_repeat_ngram = int(getattr(generation, "no_repeat_ngram_size", 0) or 0)
        super().__init__(
            max_batch_size=max_batch_size,
            kv_budget_bytes=kv_budget_bytes,
            bytes_per_token=kv_bytes_per_token(config, next(model.parameters()).element_size()),
            max_positions=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048),
            eos_ids=set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]),
        )
        # transformers 5 names the cache argument `cache` for some models and `past_key_values` for others.
        import inspect

        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.tuner = ThreadTuner(torch.get_num_threads()) if device == "cpu" else None
        self._reset_batch()

    def _prepare(self, sequence: Sequence) -> None:
        if sequence.sampling.seed is not None:
            sequence.generator = torch.Generator(device=self.device).manual_seed(sequence.sampling.seed)

    def kv_cache_bytes(self) -> int:
        return len(self.running) * self._columns() * self.bytes_per_token

    # -- one iteration ------------------------------------------------------------------------
    def _advance(self, joining: list[Sequence], events: list[tuple]) -> None:
        with torch.inference_mode():
            if joining:
                self._prefill(joining, events)
                self._finish_rows(events)  # a request for one token is done with its prefill
            if self.running:
                self._decode(events)

    # -- forward passes -----------------------------------------------------------------------
    def _reset_batch(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # [rows, cache columns]
        self.history = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # tokens, newest last
        self.lengths = torch.zeros((0,), dtype=torch.long, device=self.device)  # real tokens in the cache

    def _columns(self) -> int:
        return int(self.mask.shape[1])

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> Any:
        return self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )

    def _prefill(self, joining: list[Sequence], events: list[tuple]) -> None:
        from transformers import DynamicCache

        width = max(len(s.prompt) for s in joining)
        ids = torch.full((len(joining), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(joining), width), dtype=torch.long)
        for row, sequence in enumerate(joining):
            ids[row, width - len(sequence.prompt) :] = torch.tensor(sequence.prompt)
            mask[row, width - len(sequence.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache).logits[:, -1, :]
        chosen = self._choose(logits, ids, joining)
        self._merge(cache, mask, torch.cat([ids, chosen[:, None]], dim=1), joining)
        self._emit(joining, chosen.tolist(), events)

    def _decode(self, events: list[tuple]) -> None:
        rows = len(self.running)
        threads = self.tuner.pick(rows) if self.tuner is not None else 0
        if threads and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        begin = time.perf_counter()
        pending = self.history[:, -1:]
        self.mask = torch.cat([self.mask, torch.ones_like(pending)], dim=1)
        logits = self._forward(pending, self.mask, self.lengths[:, None], self.cache).logits[:, -1, :]
        self.lengths += 1
        chosen = self._choose(logits, self.history, self.running)
        if self.tuner is not None:
            self.tuner.record(rows, threads, time.perf_counter() - begin)
        self.history = torch.cat([self.history, chosen[:, None]], dim=1)
        self._emit(self.running, chosen.tolist(), events)

    def _merge(self, cache: Any, mask: torch.Tensor, history: torch.Tensor, joining: list[Sequence]) -> None:
        """Append the prefilled rows to the running batch, left-padding whichever side is shorter."""
        if not self.running:
            self.cache, self.mask, self.history = cache, mask, history
            self.lengths = mask.sum(-1)
            self.running = list(joining)
            return
        columns = max(self._columns(), mask.shape[1])
        for old, new in zip(_kv_layers(self.cache), _kv_layers(cache)):
            old.keys = torch.cat([_pad_left(old.keys, columns, -2), _pad_left(new.keys, columns, -2)])
            old.values = torch.cat([_pad_left(old.values, columns, -2), _pad_left(new.values, columns, -2)])
        self.mask = torch.cat([_pad_left(self.mask, columns, -1), _pad_left(mask, columns, -1)])
        width = max(self.history.shape[1], history.shape[1])
        self.history = torch.cat(
            [_pad_left(self.history, width, -1, self.pad_id), _pad_left(history, width, -1, self.pad_id)]
        )
        self.lengths = torch.cat([self.lengths, mask.sum(-1)])
        self.running.extend(joining)

    def _select(self, keep: list[int]) -> None:
        """Keep only rows `keep`, then cut the cache columns no remaining row uses."""
        super()._select(keep)
        if not self.running:
            self._reset_batch()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.lengths = self.lengths[index]
        columns = int(self.lengths.max())
        cut = self._columns() - columns
        for layer in _kv_layers(self.cache):
            layer.keys = layer.keys[index, :, cut:, :]
            layer.values = layer.values[index, :, cut:, :]
        self.mask = self.mask[index, cut:]
        self.history = self.history[index, max(0, self.history.shape[1] - columns - 1) :]

    # -- choosing tokens ----------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor, history: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
        scores = logits.float()
        if self.suppress.numel():
            scores[:, self.suppress] = -math.inf
        penalties = [sequence.sampling.repetition_penalty for sequence in rows]  # each row its own
        if any(p != 1.0 for p in penalties):
            penalty = torch.tensor(penalties, dtype=scores.dtype, device=scores.device)[:, None]
            seen = scores.gather(1, history)
            seen = torch.where(seen < 0, seen * penalty, seen / penalty)
            scores.scatter_(1, history, seen)
        if self.no_repeat_ngram == 1:
            scores.scatter_(1, history, -math.inf)  # every token already present is banned
        elif self.no_repeat_ngram > 1:
            from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

            scores = NoRepeatNGramLogitsProcessor(self.no_repeat_ngram)(history, scores)
        chosen = scores.argmax(dim=-1)
        for row, sequence in enumerate(rows):
            if sequence.sampling.do_sample:
                chosen[row] = _sample(scores[row], sequence.sampling, sequence.generator)
        return chosen

    def _text(self, sequence: Sequence) -> str:
        return self.tokenizer.decode([t for t in sequence.generated if t not in self.eos_ids], skip_special_tokens=True)


def kv_bytes_per_token(config: Any, element_size: int) -> int:
    """Key and value, every layer, every KV head: the cache one token takes in one row."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return 2 * layers * kv_heads * head_dim * element_size


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


class _KVLayer(Protocol):
    """One layer of the KV cache of the attention models served here (transformers' DynamicLayer, once prefilled)."""

    keys: torch.Tensor  # [rows, heads, length, dim]
    values: torch.Tensor


def _kv_layers(cache: Any) -> list[_KVLayer]:
    """The cache's layers as this scheduler uses them: transformers types them as a union that also covers
    linear-attention layers, which hold no keys or values (models this scheduler does not serve)."""
    return cache.layers


def _pad_left(tensor: torch.Tensor, size: int, dim: int, value: int = 0) -> torch.Tensor:
    missing = size - tensor.shape[dim]
    if missing <= 0:
        return tensor
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(tensor, pad, value=value)


def _sample(scores: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    scores = scores / max(sampling.temperature, 1e-5)
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) > sampling.top_p  # keep the smallest set reaching top_p
        scores = scores.scatter(0, order[drop], -math.inf)
    probabilities = scores.softmax(-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))
