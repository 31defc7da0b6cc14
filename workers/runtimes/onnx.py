"""onnxruntime runtimes: sentence embeddings with a tokenizer, and raw tensor models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from model_store.paths import artifact_bytes, resolve_model_path, resolve_tokenizer_path
from workers.runtimes.base import InvalidInput, Runtime, TextRuntime, intra_op_threads
from workers.runtimes.pooling import mean_pool_normalize
from workers.runtimes.tensors import check_shape, decode_tensor, encode_tensor

_ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int16)": "INT16",
    "tensor(int8)": "INT8",
    "tensor(uint64)": "UINT64",
    "tensor(uint32)": "UINT32",
    "tensor(uint16)": "UINT16",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}


class _OnnxSession:
    """Shared session set-up: providers filtered to what this build and device offer."""

    spec: Any
    settings: Any
    device: str

    def open_session(self) -> None:
        self.path: Path = resolve_model_path(self.spec, self.settings)
        available = ort.get_available_providers()
        wanted = list(self.spec.providers) or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if not self.device.startswith("cuda"):
            wanted = [p for p in wanted if p != "CUDAExecutionProvider"]
        providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads(self.settings, self.spec.instances)
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise RuntimeError(f"model {self.spec.id!r}: {self.path} is not a loadable ONNX model: {exc}") from None
        self.providers = self.session.get_providers()

    def io_description(self) -> dict[str, Any]:
        def describe(items: Any) -> list[dict[str, Any]]:
            return [
                {
                    "name": i.name,
                    "datatype": _ORT_TYPES.get(i.type, i.type),
                    "shape": [d if isinstance(d, int) else -1 for d in i.shape],
                }
                for i in items
            ]

        return {
            "inputs": describe(self.session.get_inputs()),
            "outputs": describe(self.session.get_outputs()),
            "providers": self.providers,
        }

    def parameter_count(self) -> int | None:
        import onnx

        model = onnx.load(str(self.path), load_external_data=False)
        return int(sum(np.prod(t.dims) for t in model.graph.initializer))


class OnnxFeatureExtraction(_OnnxSession, TextRuntime):
    def load(self) -> None:
        from transformers import AutoTokenizer

        self.open_session()
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer_path(self.spec, self.settings))
        self.input_names = {i.name for i in self.session.get_inputs()}

    def run_batch(self, inputs: list[dict[str, Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        with self._tokenizer_lock:
            batch = self.tokenizer(
                self.texts(inputs),
                padding=True,
                truncation=True,
                max_length=self.max_length(parameters),
                return_tensors="np",
            )
        feed = {k: v.astype(np.int64) for k, v in batch.items() if k in self.input_names}
        hidden = self.session.run(None, feed)[0]
        vectors = mean_pool_normalize(hidden.astype(np.float32), batch["attention_mask"])
        # float32 rows, encoded once by the worker; `tokens`: the input's length after truncation (usage)
        return [{"embedding": v, "tokens": int(n)} for v, n in zip(vectors, batch["attention_mask"].sum(axis=1))]

    def memory_bytes(self) -> int:
        return artifact_bytes(self.path)

    def describe(self) -> dict[str, Any]:
        return {
            "parameter_count": self.parameter_count(),
            **self.io_description(),
            "outputs_served": [{"name": "embedding", "datatype": "FP32"}],
        }

    def close(self) -> None:
        self.session = None


class OnnxTensor(_OnnxSession, Runtime):
    def load(self) -> None:
        self.open_session()
        self.signature = self.io_description()

    def run_batch(self, inputs: list[dict[str, Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        arrays = [self._decode(item) for item in inputs]
        sizes = [next(iter(a.values())).shape[0] for a in arrays]
        feed = {name: np.concatenate([a[name] for a in arrays]) for name in arrays[0]}
        outputs = self.session.run(None, feed)
        names = [o["name"] for o in self.signature["outputs"]]
        results, start = [], 0
        for size in sizes:
            results.append({n: encode_tensor(o[start : start + size]) for n, o in zip(names, outputs)})
            start += size
        return results

    def _decode(self, item: dict[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(item, dict):
            raise InvalidInput("inputs must be an object of named tensors")
        expected = {i["name"]: i for i in self.signature["inputs"]}
        missing, unknown = set(expected) - set(item), set(item) - set(expected)
        if missing or unknown:
            raise InvalidInput(
                f"inputs must name exactly {sorted(expected)}; missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        arrays = {}
        for name, meta in expected.items():
            array = decode_tensor(name, item[name], meta["datatype"])
            check_shape(name, array, meta["shape"])
            arrays[name] = array
        return arrays

    def memory_bytes(self) -> int:
        return artifact_bytes(self.path)

    def describe(self) -> dict[str, Any]:
        return {"parameter_count": self.parameter_count(), **self.signature}

    def close(self) -> None:
        self.session = None
