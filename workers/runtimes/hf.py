"""Hugging Face transformers runtimes: embeddings, classification, generation."""

from __future__ import annotations

import gc
from typing import Any, Callable

import numpy as np
import torch
from transformers import (
    AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
)

from model_store.paths import resolve_model_path
from workers.runtimes.base import (
    InvalidInput, TextRuntime, ensure_torch_threads, torch_module_bytes, torch_parameter_count,
)
from workers.runtimes.pooling import mean_pool_normalize


class _HFRuntime(TextRuntime):
    auto_class: Any = AutoModel

    def load(self) -> None:
        path = resolve_model_path(self.spec, self.settings)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = self.auto_class.from_pretrained(path, dtype=self.torch_dtype()).to(self.torch_device).eval()

    def memory_bytes(self) -> int:
        return torch_module_bytes(self.model)

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
        gc.collect()

    def encode(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        with self._tokenizer_lock:
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                                   return_tensors="pt")
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
        vectors = mean_pool_normalize(hidden.float().cpu().numpy(), batch["attention_mask"].cpu().numpy())
        return [{"embedding": vector} for vector in vectors]  # float32 rows, encoded once by the worker

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
            results.append({
                "label": labels[best],
                "score": float(row[best]),
                "scores": {labels[i]: float(p) for i, p in enumerate(row)},
            })
        return results

    def outputs(self) -> list[dict[str, Any]]:
        return [{"name": "label", "datatype": "BYTES", "labels": list(self.model.config.id2label.values())}]


class _CallbackStreamer:
    """transformers streamer protocol (put/end) that hands each new piece of text to a callback."""

    def __init__(self, tokenizer: Any, prompt_length: int, on_text: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.prompt_length = prompt_length
        self.ids: list[int] = []
        self.sent = ""
        self.skipped_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.skipped_prompt:  # generate() first puts the prompt itself
            self.skipped_prompt = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        pass


class TextGeneration(_HFRuntime):
    auto_class = AutoModelForCausalLM

    def generate(self, text: str, max_new_tokens: int,
                 on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
        ensure_torch_threads(self.settings)
        with self._tokenizer_lock:
            encoded = self.tokenizer(text, add_special_tokens=False, return_tensors="pt",
                                     truncation=True, max_length=self.model.config.n_positions - max_new_tokens)
        input_ids = encoded["input_ids"]
        if input_ids.shape[1] == 0:
            raise InvalidInput("inputs.text produced no tokens")
        input_ids = input_ids.to(self.torch_device)
        streamer = _CallbackStreamer(self.tokenizer, input_ids.shape[1], on_text) if on_text else None
        with torch.inference_mode():
            output = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                min_new_tokens=0, streamer=streamer,
            )
        new_ids = output[0, input_ids.shape[1]:].tolist()
        finish = "length" if len(new_ids) >= max_new_tokens else "stop"
        with self._tokenizer_lock:
            generated = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        return {"text": generated, "tokens": len(new_ids), "finish_reason": finish}

    def run_batch(self, inputs: list[dict[str, Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        limit = self.max_length(parameters)
        return [self.generate(text, limit) for text in self.texts(inputs)]

    def stream(self, inputs: dict[str, Any], parameters: dict[str, Any],
               on_text: Callable[[str], None]) -> dict[str, Any]:
        """Generate for one job, handing each new piece of text to `on_text` as it is produced."""
        return self.generate(self.texts([inputs])[0], self.max_length(parameters), on_text=on_text)

    def outputs(self) -> list[dict[str, Any]]:
        return [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
