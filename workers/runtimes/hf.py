"""Hugging Face transformers runtimes: embeddings, classification, generation."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from config.parameters import DEFAULT_CHAT_TEMPLATE
from model_store.paths import resolve_model_path
from workers.runtimes.base import (
    TextRuntime,
    ensure_torch_threads,
    torch_module_bytes,
    torch_parameter_count,
)
from workers.runtimes.pooling import mean_pool_normalize
from workers.runtimes.scheduling import Sampling, Sequence, run_to_end

if TYPE_CHECKING:
    from workers.runtimes.decoding import ContinuousBatcher


class _HFRuntime(TextRuntime):
    auto_class: Any = AutoModel
    # Set by load(), dropped by close(): their classes are what the Auto* factories pick for the model's files.
    model: Any = None
    tokenizer: Any = None

    def load(self) -> None:
        path = resolve_model_path(self.spec, self.settings)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # Safetensors only, unless the model is trusted with pickle (model_store/verify.py).
        self.model = (
            self.auto_class.from_pretrained(
                path,
                dtype=self.torch_dtype(),
                use_safetensors=None if self.spec.allow_pickle else True,
            )
            .to(self.torch_device)
            .eval()
        )

    def memory_bytes(self) -> int:
        return torch_module_bytes(self.model)

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
        gc.collect()

    def encode(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        with self._tokenizer_lock:
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v.to(self.torch_device) for k, v in batch.items()}

    def describe(self) -> dict[str, Any]:
        return {
            "parameter_count": torch_parameter_count(self.model),
            "architecture": type(self.model).__name__,
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": self.outputs(),
        }

    def outputs(self) -> list[dict[str, Any]]:
        return []


class FeatureExtraction(_HFRuntime):
    def run_batch(self, inputs: list[dict[str, Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        ensure_torch_threads(self.settings)
        batch = self.encode(self.texts(inputs), self.max_length(parameters))
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].cpu().numpy()
        vectors = mean_pool_normalize(hidden.float().cpu().numpy(), mask)
        # float32 rows, encoded once by the worker; `tokens`: the input's length after truncation (usage)
        return [{"embedding": vector, "tokens": int(n)} for vector, n in zip(vectors, mask.sum(axis=1))]

    def outputs(self) -> list[dict[str, Any]]:
        return [{"name": "embedding", "datatype": "FP32", "shape": [self.model.config.hidden_size]}]


class TextClassification(_HFRuntime):
    auto_class = AutoModelForSequenceClassification

    def run_batch(self, inputs: list[dict[str, Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        ensure_torch_threads(self.settings)
        batch = self.encode(self.texts(inputs), self.max_length(parameters))
        with torch.inference_mode():
            probabilities = torch.softmax(self.model(**batch).logits.float(), dim=-1).cpu().numpy()
        labels = self.model.config.id2label
        results = []
        for row in probabilities:
            best = int(np.argmax(row))
            results.append(
                {
                    "label": labels[best],
                    "score": float(row[best]),
                    "scores": {labels[i]: float(p) for i, p in enumerate(row)},
                }
            )
        return results

    def outputs(self) -> list[dict[str, Any]]:
        return [{"name": "label", "datatype": "BYTES", "labels": list(self.model.config.id2label.values())}]


class TextGeneration(_HFRuntime):
    """Served by continuous batching in the model process (workers/runtimes/decoding.py)."""

    auto_class = AutoModelForCausalLM

    def run_batch(self, inputs: list[dict[str, Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        return [result for _key, result in self.generate_all(inputs, parameters)]

    def generate_all(
        self,
        inputs: list[dict[str, Any]],
        parameters: dict[str, Any],
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[tuple[int, dict[str, Any]]]:
        """In-process use (tests, the benchmark's reference): the inputs as one batch of the same scheduler;
        `on_text(index, piece)` gets each input's text as it is produced."""
        ensure_torch_threads(self.settings)
        stream = on_text is not None
        sequences = [self.sequence(index, item, parameters, stream=stream) for index, item in enumerate(inputs)]
        return run_to_end(self.continuous_batcher(), sequences, on_text)

    def outputs(self) -> list[dict[str, Any]]:
        return [{"name": "text", "datatype": "BYTES", "shape": [-1]}]

    def prompt_text(self, inputs: dict[str, Any]) -> str:
        """`inputs.text`, or `inputs.messages` rendered by the tokenizer's chat template (a plain default when it
        has none: config/parameters.py DEFAULT_CHAT_TEMPLATE), ending where the assistant's answer begins."""
        messages = self.chat_messages(inputs)
        if messages is None:
            return self.texts([inputs])[0]
        template = getattr(self.tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        with self._tokenizer_lock:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True
            )

    def continuous_batcher(self) -> ContinuousBatcher:
        """The scheduler a model process serves this model with (workers/runtimes/decoding.py)."""
        from workers.runtimes.decoding import ContinuousBatcher

        return ContinuousBatcher(
            self.model,
            self.tokenizer,
            max_batch_size=self.spec.max_batch_size,
            kv_budget_bytes=self.spec.kv_cache_memory or 0,
            device=self.torch_device,
        )

    def sequence(self, key: Any, inputs: dict[str, Any], parameters: dict[str, Any], **options: Any) -> Sequence:
        """One request for the continuous batcher; InvalidInput for a bad text or parameter."""
        text = self.prompt_text(inputs)
        max_new = self.max_length(parameters)
        sampling = Sampling.from_parameters(parameters, self.model.generation_config)
        with self._tokenizer_lock:
            prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Sequence(key=key, prompt=prompt, max_new=max_new, sampling=sampling, **options)
