"""Tensor requests and responses in the Open Inference Protocol's shape: {shape, datatype, data}."""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.runtimes.base import InvalidInput

DATATYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DATATYPES.items()}
MAX_ELEMENTS = 10_000_000


def decode_tensor(name: str, value: Any, default_dtype: str) -> np.ndarray:
    """Accept {"shape", "datatype", "data"} (data flat or nested) or a plain nested list."""
    if isinstance(value, dict):
        datatype = value.get("datatype", default_dtype)
        if datatype not in DATATYPES:
            raise InvalidInput(f"inputs.{name}.datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
        data, shape = value.get("data"), value.get("shape")
    else:
        datatype, data, shape = default_dtype, value, None
    if not isinstance(data, list):
        raise InvalidInput(f"inputs.{name} must be a list of numbers or {{'shape', 'datatype', 'data'}}")
    try:
        array = np.asarray(data, dtype=DATATYPES[datatype])
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"inputs.{name}.data is not a rectangular array of numbers: {exc}") from None
    if array.size > MAX_ELEMENTS:
        raise InvalidInput(f"inputs.{name} has {array.size} elements, more than {MAX_ELEMENTS}")
    if shape is not None:
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidInput(f"inputs.{name}.shape must be a list of non-negative whole numbers")
        if int(np.prod(shape)) != array.size:
            raise InvalidInput(f"inputs.{name}.shape {shape} does not hold {array.size} elements")
        array = array.reshape(shape)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"inputs.{name} contains NaN or infinity")
    return array


def check_shape(name: str, array: np.ndarray, expected: list[int]) -> None:
    """`expected` uses -1 for a dynamic dimension."""
    if len(array.shape) != len(expected) or any(e not in (-1, a) for e, a in zip(expected, array.shape)):
        raise InvalidInput(f"inputs.{name} has shape {list(array.shape)}, expected {expected} (-1: any size)")


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    return {
        "shape": list(array.shape),
        "datatype": NAMES.get(array.dtype, str(array.dtype)),
        "data": array.reshape(-1).tolist(),
    }
