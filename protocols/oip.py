"""Open Inference Protocol v2 (KServe / Triton) over REST: tensors in and out, JSON or binary.

The binary data extension (Triton's `extension_binary_data.md`): the body is a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw bytes of every input whose JSON entry carries
`parameters.binary_data_size`, in input order. A response is built the same way for every output asked for in
binary (`outputs[].parameters.binary_data`, or all of them with the request parameter `binary_data_output`,
which `tritonclient` sets when it asks for no output by name). BYTES elements are each a 4-byte little-endian
length followed by the bytes; BOOL is one byte per element; numbers are little-endian, row-major.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from config.signatures import MAX_RANK, ShapeError, TooManyElements, checked_shape
from protocols.errors import ApiError
from protocols.json import JsonBodyError, loads_bounded
from tasks.tensors import DTYPES as NUMERIC

DATATYPES = (*NUMERIC, "BYTES")


def bad(message: str, status: int = 400) -> ApiError:
    return ApiError(status, "bad_request" if status == 400 else "validation_error", message)


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray  # BYTES: an object array of `bytes`


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: every output
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output: bool = False  # the default for outputs not named (binary_data_output)


def _shape(raw: Any, name: str) -> list[int]:
    """The one shape rule (config/signatures.py), before anything multiplies it: 400, or 413 for too many elements."""
    try:
        return checked_shape(raw)
    except TooManyElements as exc:
        raise bad(f"input {name!r}: shape {exc}", 413) from None
    except ShapeError as exc:
        raise bad(f"input {name!r}: shape {exc}") from None


def _flatten(data: Any, name: str) -> list[Any]:
    """Row-major elements of flat or nested data, a level at a time (no recursion), at most MAX_RANK levels."""
    if not isinstance(data, list):
        return [data]
    flat, depth = data, 1
    while flat and isinstance(flat[0], list):
        depth += 1
        if depth > MAX_RANK:
            raise bad(f"input {name!r}: data nests deeper than {MAX_RANK} levels")
        flat = [x for row in flat for x in (row if isinstance(row, list) else (row,))]
    return flat


def deserialize_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    out, at = [], 0
    for _ in range(count):
        if at + 4 > len(raw):
            raise bad(f"input {name!r}: its binary data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise bad(f"input {name!r}: an element of {size} bytes runs past the end of its binary data")
        out.append(raw[at : at + size])
        at += size
    if at != len(raw):
        raise bad(f"input {name!r}: binary_data_size is {len(raw)} bytes but its {count} elements take {at}")
    return np.array(out, dtype=object)


def serialize_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _tensor(entry: Any, binary: bytes | None, max_strings: int | None = None) -> Tensor:
    if not isinstance(entry, dict):
        raise bad("each input must be an object with name, shape, datatype and data")
    name, datatype = entry.get("name"), entry.get("datatype")
    if not isinstance(name, str) or not name:
        raise bad("every input needs a name")
    if datatype not in DATATYPES:
        raise bad(f"input {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    shape = _shape(entry.get("shape"), name)
    count = math.prod(shape)  # Python integers, bounded by _shape: no overflow, no cost
    if datatype == "BYTES" and max_strings is not None and count > max_strings:
        # strings are a text model's batch: refused before millions of them are cut out of the body
        raise ApiError(
            413,
            "too_many_inputs",
            f"input {name!r}: a batch may carry at most {max_strings} strings, got {count}; split it into several "
            "requests",
        )
    if binary is not None:
        if datatype == "BYTES":
            array = deserialize_bytes(binary, count, name)
        else:
            dtype = NUMERIC[datatype]
            if len(binary) != count * dtype.itemsize:
                raise bad(
                    f"input {name!r}: {len(binary)} bytes of binary data, but shape {shape} of {datatype} "
                    f"takes {count * dtype.itemsize}"
                )
            array = np.frombuffer(binary, dtype=dtype)
    else:
        if "data" not in entry:
            raise bad(f"input {name!r} has neither data nor parameters.binary_data_size")
        flat = _flatten(entry["data"], name)
        if len(flat) != count:
            raise bad(f"input {name!r}: shape {shape} holds {count} elements, data has {len(flat)}")
        if datatype == "BYTES":
            if not all(isinstance(x, str) for x in flat):
                raise bad(f"input {name!r}: BYTES data must be strings")
            array = np.array([x.encode() for x in flat], dtype=object)
        else:
            try:
                if datatype == "BOOL" and not all(isinstance(x, bool) for x in flat):
                    raise TypeError("BOOL data must be true or false")
                if datatype != "BOOL" and any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in flat):
                    raise TypeError("data must be numbers")
                array = np.asarray(flat, dtype=NUMERIC[datatype])
            except (TypeError, ValueError, OverflowError) as exc:
                raise bad(f"input {name!r}: {exc}") from None
    return Tensor(name, datatype, shape, array.reshape(shape))


def _parameters(entry: Any, where: str) -> dict[str, Any]:
    parameters = entry.get("parameters") if isinstance(entry, dict) else None
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise bad(f"{where}[].parameters must be an object")
    return parameters


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The body's JSON header and the binary data after it (Inference-Header-Content-Length; all JSON without)."""
    if header_length is None:
        return body, b""
    if not header_length.isascii() or not header_length.strip().isdigit() or len(header_length) > 20:
        raise bad("Inference-Header-Content-Length must be a whole number of bytes")
    size = int(header_length)
    if not 0 < size <= len(body):
        raise bad(f"Inference-Header-Content-Length is {size}, the body has {len(body)} bytes")
    return body[:size], body[size:]


def _inputs(raw_inputs: Any, rest: bytes, max_strings: int | None) -> list[Tensor]:
    """The request's input tensors, each binary one cut from `rest` in input order, every byte of it used."""
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise bad("inputs must be a non-empty list of tensors")
    inputs, at = [], 0
    for entry in raw_inputs:
        size = _parameters(entry, "inputs").get("binary_data_size")
        binary = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or at + size > len(rest):
                raise bad(f"binary_data_size {size!r} does not fit the {len(rest)} bytes after the header")
            binary, at = rest[at : at + size], at + size
        inputs.append(_tensor(entry, binary, max_strings))
    if at != len(rest):
        raise bad(f"{len(rest) - at} bytes after the header belong to no input (check binary_data_size)")
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise bad(f"an input is named twice: {names}")
    return inputs


def _requested_outputs(raw: Any) -> list[RequestedOutput] | None:
    """The outputs asked for by name (None: every output)."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise bad("outputs must be a list of {name, parameters}")
    outputs = []
    for entry in raw:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise bad("each requested output must be an object with a name")
        flag = _parameters(entry, "outputs").get("binary_data", False)
        outputs.append(RequestedOutput(entry["name"], bool(flag)))
    return outputs


def parse_request(
    body: bytes, header_length: str | None, max_depth: int | None = None, max_strings: int | None = None
) -> InferRequest:
    """The request's JSON header and its tensors; ApiError 400 saying what is malformed. `max_depth`: the JSON's
    deepest nesting allowed (AETHERCORE_MAX_JSON_DEPTH; None: the parser's own limit); `max_strings`: the most
    elements a BYTES tensor may have (AETHERCORE_MAX_BATCH_INPUTS; 413 beyond)."""
    header, rest = _split(body, header_length)
    try:
        document = loads_bounded(header, max_depth)
    except JsonBodyError as exc:
        raise bad(f"the inference request header is {exc}") from None
    if not isinstance(document, dict):
        raise bad("the inference request must be a JSON object")
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad("parameters must be an object")
    inputs = _inputs(document.get("inputs"), rest, max_strings)
    outputs = _requested_outputs(document.get("outputs"))
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad("id must be a string")
    binary_output = parameters.pop("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise bad("parameters.binary_data_output must be true or false")
    return InferRequest(request_id, inputs, outputs, parameters, binary_output)


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == object:
        return "BYTES"
    for name, dtype in NUMERIC.items():
        if array.dtype == dtype:
            return name
    raise ValueError(f"no OIP datatype for {array.dtype}")


def encode_response(
    model: str, version: str, request_id: str | None, outputs: list[tuple[str, np.ndarray]], binary: dict[str, bool]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (Inference-Header-Content-Length when any output is binary)."""
    entries, blobs = [], []
    for name, array in outputs:
        datatype = datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary.get(name):
            blob = serialize_bytes(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    document: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request_id is not None:
        document["id"] = request_id
    header = orjson.dumps(document)
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def outputs_of(task: str, rows: list[dict[str, Any]]) -> list[tuple[str, np.ndarray]]:
    """A finished job's output rows (one per input row) as OIP's named output tensors: the task's fixed outputs
    for the text tasks, a tensor model's own outputs as it gave them."""
    if task == "feature-extraction":
        return [("embedding", np.stack([np.asarray(r["embedding"], dtype="<f4") for r in rows]))]
    if task == "text-classification":
        return [
            ("label", np.array([str(r["label"]).encode() for r in rows], dtype=object)),
            ("score", np.array([r["score"] for r in rows], dtype="<f4")),
            ("scores", np.array([list(r["scores"].values()) for r in rows], dtype="<f4")),
        ]
    if task == "text-generation":
        return [
            ("text", np.array([r["text"].encode() for r in rows], dtype=object)),
            ("finish_reason", np.array([r["finish_reason"].encode() for r in rows], dtype=object)),
        ]
    out = []
    for name, tensor in rows[0].items():
        dtype = NUMERIC.get(tensor.get("datatype"), np.dtype("<f4"))
        out.append((name, np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])))
    return out
