"""A numeric tensor inside a job: its raw little-endian bytes, base64 in the JSON that carries the job (the job's
record in Redis, its Celery message, the worker's in-flight entry), never a JSON list of numbers.

    {"$nd": "<base64 of the row-major bytes>", "dtype": "<f4", "shape": [rows, 4]}

A 10 MB FP32 tensor is ~13 MB this way, and ~50 MB as `tolist()` JSON digits. The API packs what it already holds
as numpy (OIP tensors, binary or JSON); the model process unpacks it (workers/runtimes/tensors.py), checking the
shape against the one rule (config/signatures.py) and the byte count against the shape. Results use the same
form for float arrays (tasks/results.py).
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np

from config.signatures import ShapeError, checked_shape

TAG = "$nd"

# OIP datatype -> the little-endian numpy dtype of its elements (Triton's binary data extension; BOOL: one byte).
DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPE_OF = {dtype: name for name, dtype in DTYPES.items()}
_BY_CODE = {dtype.str: dtype for dtype in DTYPES.values()}  # "<f4", "|b1", ...


def is_packed(value: Any) -> bool:
    return isinstance(value, dict) and TAG in value


def pack(array: np.ndarray) -> dict[str, Any]:
    """A numeric array as tagged little-endian bytes (BOOL normalised to 0/1)."""
    if array.dtype == np.bool_:
        array = array != 0  # a byte of binary input other than 0 or 1 is still one bool
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype.str not in _BY_CODE:
        raise ValueError(f"no tensor datatype for {array.dtype}")
    data = np.ascontiguousarray(array, dtype=dtype)
    return {TAG: base64.b64encode(data.tobytes()).decode("ascii"), "dtype": dtype.str, "shape": list(data.shape)}


def unpack(value: dict[str, Any], checked: bool = True) -> np.ndarray:
    """The array of a tagged value: a read-only view of its decoded bytes. With `checked` (anything that came with
    a request), the dtype must be a tensor datatype's, the shape within config/signatures.py's bounds and the
    bytes exactly what the shape takes; ValueError saying which is not."""
    code, shape = value.get("dtype", "<f4"), value.get("shape")
    dtype = _BY_CODE.get(code)
    if dtype is None:
        raise ValueError(f"dtype {code!r} is not a tensor datatype's")
    size = None
    if checked:
        try:
            shape = checked_shape(shape)
        except ShapeError as exc:
            raise ShapeError(f"shape {exc}") from None
        size = math.prod(shape) * dtype.itemsize
    try:
        raw = base64.b64decode(value[TAG], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ValueError("its data is not base64") from None
    if size is not None and len(raw) != size:
        raise ValueError(f"{len(raw)} bytes do not hold shape {shape} of {code}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
