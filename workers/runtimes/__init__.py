"""One runtime per (model_type, task): load a model, run it on a batch of inputs, describe it."""

from __future__ import annotations

from config.models import ModelSpec
from config.settings import Settings
from workers.runtimes.base import InvalidInput, Runtime

# The module each model_type's runtimes live in (imported only inside a model process).
RUNTIME_MODULES = {
    "transformer": "workers.runtimes.hf",
    "onnx": "workers.runtimes.onnx",
    "pytorch": "workers.runtimes.torch_tensor",
    "simulated": "workers.runtimes.simulated",
}
# The model_types whose forward passes run torch (their process sets torch's threads) and whose text models
# use a transformers tokenizer; a simulated model imports neither.
TORCH_TYPES = {"transformer", "pytorch"}
TOKENIZER_TYPES = {"transformer", "onnx"}


def create_runtime(spec: ModelSpec, settings: Settings, device: str) -> Runtime:
    if spec.model_type == "transformer":
        from workers.runtimes import hf

        by_task: dict[str, type[Runtime]] = {
            "feature-extraction": hf.FeatureExtraction,
            "text-classification": hf.TextClassification,
            "text-generation": hf.TextGeneration,
        }
        return by_task[spec.task](spec, settings, device)
    if spec.model_type == "onnx":
        from workers.runtimes import onnx

        return {"feature-extraction": onnx.OnnxFeatureExtraction, "tensor": onnx.OnnxTensor}[spec.task](
            spec, settings, device
        )
    if spec.model_type == "pytorch":
        from workers.runtimes.torch_tensor import TorchExportTensor

        return TorchExportTensor(spec, settings, device)
    if spec.model_type == "simulated":
        from workers.runtimes import simulated

        return {
            "feature-extraction": simulated.SimulatedFeatureExtraction,
            "text-generation": simulated.SimulatedTextGeneration,
        }[spec.task](spec, settings, device)
    raise ValueError(f"no runtime for model_type {spec.model_type!r}")


__all__ = ["RUNTIME_MODULES", "TOKENIZER_TYPES", "TORCH_TYPES", "InvalidInput", "Runtime", "create_runtime"]
