"""Read a model's signature from its files without loading it (config/signatures.py says what it is for).

`signature.json` beside the artifact wins (`models bootstrap` writes one for every demo model; write your own
the same way); otherwise it is read from what is there: a transformers `config.json` (hidden size, labels),
an ONNX graph's inputs and outputs (the graph only, not its weights). No torch, no session, no weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from config.models import TEXT_TASKS, ModelSpec
from config.settings import Settings
from config.signatures import ARTIFACT, Signature, TensorSpec, task_signature
from model_store.paths import ModelPathForbidden, ModelUnavailable, resolve_model_path

SIGNATURE_FILE = "signature.json"

# onnx.TensorProto element types -> OIP datatypes
_ONNX_TYPES = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
}


def artifact_signature(spec: ModelSpec, settings: Settings) -> Signature | None:
    """The signature its files give, or None when they are not on this machine or say nothing usable."""
    try:
        path = resolve_model_path(spec, settings)
    except (ModelUnavailable, ModelPathForbidden):
        return None
    return read_signature(path, spec.task, spec.model_type)


def read_signature(path: Path, task: str, model_type: str) -> Signature | None:
    directory = path if path.is_dir() else path.parent
    stored = directory / SIGNATURE_FILE
    try:
        if stored.is_file():
            return Signature.from_public(json.loads(stored.read_text()), ARTIFACT)
        if task in TEXT_TASKS:
            config = _json(directory / "config.json")
            hidden = int(config.get("hidden_size", -1))
            labels = len(config.get("id2label") or {}) or -1
            if hidden < 0 and model_type == "onnx":
                outputs = _onnx_io(path)[1]
                hidden = outputs[0].shape[-1] if outputs and outputs[0].shape else -1
            return task_signature(task, hidden, labels, ARTIFACT)
        if model_type == "onnx":
            inputs, outputs = _onnx_io(path)
            return Signature(inputs, outputs, ARTIFACT)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: cannot read the model's signature: {exc}") from None
    return None


def write_signature(directory: Path, task: str, model_type: str) -> None:
    """Store the signature beside the artifact (bootstrap), unless one is there already."""
    if (directory / SIGNATURE_FILE).exists():
        return
    target = directory / "model.onnx" if model_type == "onnx" else directory
    signature = read_signature(target, task, model_type)
    if signature is not None:
        data = signature.public()
        data.pop("source")
        (directory / SIGNATURE_FILE).write_text(json.dumps(data, indent=2) + "\n")


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _onnx_io(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def tensors(items: Any) -> tuple[TensorSpec, ...]:
        out = []
        for item in items:
            if item.name in initializers:
                continue
            kind = item.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim)
            out.append(TensorSpec(item.name, _ONNX_TYPES.get(kind.elem_type, "BYTES"), shape))
        return tuple(out)

    return tensors(graph.input), tensors(graph.output)
