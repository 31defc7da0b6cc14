"""A model's signature: the named, typed, shaped tensors it takes and gives, known without loading it.

Where it comes from, first that applies:
1. `inputs:` / `outputs:` in models.yaml (like Triton's config.pbtxt);
2. the artifact: `signature.json` beside it (written by `models bootstrap`), or read from the files (an ONNX
   graph's inputs, a transformers config.json); every worker publishes what it reads at start
   (model_store/signatures.py), so the API knows it without the model store;
3. the task: text models take one BYTES tensor `text` of shape [-1] (a batch of strings).

The same signature documents the model (GET /models/{id}/info, OIP model metadata) and checks a request
before it is queued: a tensor with a wrong name, datatype or shape gets 422 naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# OIP datatypes a tensor model may declare (BYTES is the text datatype): every numeric one of the protocol but
# BF16, which numpy cannot hold.
TENSOR_DATATYPES = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
)
DATATYPES = (*TENSOR_DATATYPES, "BYTES")
# The bounds of any tensor a request gives, in every protocol (/serve, /serve/batch, the WebSocket, OIP JSON and
# binary), checked by `checked_shape` before any arithmetic on the shape, and again by the model process.
MAX_RANK = 8
MAX_ELEMENTS = 10_000_000

DECLARED, ARTIFACT, TASK = "models.yaml", "artifact", "task"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    source: str  # DECLARED | ARTIFACT | TASK

    def public(self) -> dict[str, Any]:
        return {
            "inputs": [t.public() for t in self.inputs],
            "outputs": [t.public() for t in self.outputs],
            "source": self.source,
        }

    @classmethod
    def from_public(cls, data: dict[str, Any], source: str) -> Signature:
        return cls(
            tuple(tensor_spec(t) for t in data.get("inputs", ())),
            tuple(tensor_spec(t) for t in data.get("outputs", ())),
            source,
        )


def tensor_spec(raw: Any) -> TensorSpec:
    """One `{name, datatype, shape}` entry; ValueError saying what is wrong with it."""
    if not isinstance(raw, dict):
        raise ValueError("each tensor must be a mapping with name, datatype and shape")
    name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a tensor's name must be a non-empty string, got {name!r}")
    if datatype not in DATATYPES:
        raise ValueError(f"tensor {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape)
    ):
        raise ValueError(f"tensor {name!r}: shape must be a list of whole numbers >= -1 (-1: any size), got {shape!r}")
    return TensorSpec(name, datatype, tuple(shape))


def declared_tensors(raw: Any) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError("must be a non-empty list of {name, datatype, shape}")
    tensors = tuple(tensor_spec(t) for t in raw)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"names a tensor twice: {names}")
    return tensors


TEXT_INPUT = TensorSpec("text", "BYTES", (-1,))


def task_outputs(task: str, hidden_size: int = -1, labels: int = -1) -> tuple[TensorSpec, ...]:
    """What a text task gives for a batch of N strings (the OIP outputs; /serve returns the same per row)."""
    if task == "feature-extraction":
        return (TensorSpec("embedding", "FP32", (-1, hidden_size)),)
    if task == "text-classification":
        return (
            TensorSpec("label", "BYTES", (-1,)),
            TensorSpec("score", "FP32", (-1,)),
            TensorSpec("scores", "FP32", (-1, labels)),
        )
    if task == "text-generation":
        return (TensorSpec("text", "BYTES", (-1,)), TensorSpec("finish_reason", "BYTES", (-1,)))
    return ()


def task_signature(task: str, hidden_size: int = -1, labels: int = -1, source: str = TASK) -> Signature | None:
    """A text model's signature from its task alone; None for a tensor model (its names come from the artifact)."""
    outputs = task_outputs(task, hidden_size, labels)
    return Signature((TEXT_INPUT,), outputs, source) if outputs else None


class ShapeError(ValueError):
    """A tensor shape a request gave is out of bounds; the message says why without repeating its values."""


class TooManyElements(ShapeError):
    """The shape is well formed but holds more than MAX_ELEMENTS elements (413 where a protocol says so)."""


def checked_shape(raw: Any) -> list[int]:
    """The one rule for a shape given in a request: a list of at most MAX_RANK whole numbers, each from 0 to
    MAX_ELEMENTS, holding at most MAX_ELEMENTS elements. Rank and each value are checked before they are
    multiplied, so a shape of huge integers costs nothing (a product of 300 numbers of 4,000 digits once held an
    API process for seconds). ShapeError otherwise."""
    if not isinstance(raw, (list, tuple)):
        raise ShapeError("must be a list of whole numbers")
    if len(raw) > MAX_RANK:
        raise ShapeError(f"has {len(raw)} dimensions, more than {MAX_RANK}")
    for size in raw:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ShapeError("must be a list of whole numbers >= 0")
        if size > MAX_ELEMENTS:
            raise TooManyElements(f"has a dimension larger than {MAX_ELEMENTS}, the most elements a tensor may hold")
    count = math.prod(raw)  # at most MAX_RANK factors of at most MAX_ELEMENTS each: cheap
    if count > MAX_ELEMENTS:
        raise TooManyElements(f"holds {count} elements, more than {MAX_ELEMENTS}")
    return list(raw)


def shape_error(name: str, shape: list[int] | tuple[int, ...], expected: tuple[int, ...]) -> str | None:
    if len(shape) != len(expected) or any(e not in (-1, a) for e, a in zip(expected, shape)):
        return f"has shape {list(shape)}, the model takes {list(expected)} (-1: any size)"
    return None


# The values each integer datatype holds: a number outside them is refused here, not overflowed in the worker.
INTEGER_RANGES = {
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
}
INTEGER_DATATYPES = set(INTEGER_RANGES)


def _element_error(value: Any, datatype: str) -> bool:
    if datatype == "BOOL":
        return not isinstance(value, bool)
    if isinstance(value, bool):
        return True
    if datatype in INTEGER_DATATYPES:
        low, high = INTEGER_RANGES[datatype]
        return not isinstance(value, int) or not low <= value <= high
    return not isinstance(value, (int, float))


def array_shape(data: Any, datatype: str) -> tuple[list[int] | None, str | None]:
    """The shape of a nested list whose every element is of `datatype` (checked all through, so nothing the
    worker would refuse is queued), or (None, why not)."""
    if not isinstance(data, list):
        return None, "must be a (nested) list of numbers"
    shape: list[int] = []
    level = data
    while isinstance(level, list):
        if len(shape) == MAX_RANK:
            return None, f"nests deeper than {MAX_RANK} levels (the most dimensions a tensor may have)"
        shape.append(len(level))
        if not level:
            break
        level = level[0]
    if math.prod(shape) > MAX_ELEMENTS:
        return None, f"holds more than {MAX_ELEMENTS} elements"
    kind = (
        "true/false"
        if datatype == "BOOL"
        else "whole numbers from {} to {}".format(*INTEGER_RANGES[datatype])
        if datatype in INTEGER_DATATYPES
        else "numbers"
    )

    def check(node: Any, depth: int) -> str | None:
        if depth == len(shape):
            return f"must hold only {kind} ({datatype})" if _element_error(node, datatype) else None
        if not isinstance(node, list) or len(node) != shape[depth]:
            return f"is not rectangular (shape {shape} from its first elements)"
        for child in node:
            problem = check(child, depth + 1)
            if problem:
                return problem
        return None

    problem = check(data, 0)
    return (None, problem) if problem else (shape, None)


def tensor_input_errors(signature: Signature, inputs: Any, prefix: str = "inputs") -> dict[str, list[str]]:
    """A /serve tensor request (`{name: [[...]] | {shape, datatype, data}}`) against the signature."""
    if not isinstance(inputs, dict):
        return {prefix: ["must be an object of named tensors"]}
    expected = {t.name: t for t in signature.inputs}
    missing, unknown = sorted(set(expected) - set(inputs)), sorted(set(inputs) - set(expected))
    if missing or unknown:
        return {
            prefix: [f"must name exactly the model's inputs {sorted(expected)}; missing {missing}, unknown {unknown}"]
        }
    errors: dict[str, list[str]] = {}
    for name, spec in expected.items():
        value, field = inputs[name], f"{prefix}.{name}"
        given_shape = None
        if isinstance(value, dict):
            datatype = value.get("datatype", spec.datatype)
            if datatype != spec.datatype:
                errors[f"{field}.datatype"] = [f"is {datatype!r}, the model takes {spec.datatype!r}"]
                continue
            given_shape, value = value.get("shape"), value.get("data")
            if given_shape is not None:
                try:
                    given_shape = checked_shape(given_shape)
                except ShapeError as exc:
                    errors[f"{field}.shape"] = [str(exc)]
                    continue
        shape, problem = array_shape(value, spec.datatype)
        if shape is None:  # not an array of the datatype: `problem` says why
            errors[field] = [str(problem)]
            continue
        if given_shape is not None:
            count = math.prod(shape)
            if math.prod(given_shape) != count:
                errors[f"{field}.shape"] = [f"{given_shape} does not hold the {count} elements of data"]
                continue
            shape = given_shape
        problem = shape_error(name, shape, spec.shape) or ("has no elements" if 0 in shape else None)
        if problem:
            errors[field] = [problem]
    return errors
