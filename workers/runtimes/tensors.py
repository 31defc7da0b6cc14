"""Tensor requests and responses in the Open Inference Protocol's shape: {shape, datatype, data}.

An input comes as JSON numbers (/serve: a nested list, or {shape, datatype, data}) or packed as its bytes (OIP:
tasks/tensors.py), and is decoded to numpy here, in the model process, under the same bounds the API checked
(config/signatures.py). A float32/float16 output leaves as an array, which the worker stores as its bytes
(tasks/results.py) rather than as JSON digits; the API writes it out as the same flat list of numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from config.signatures import MAX_ELEMENTS, ShapeError, checked_shape
from tasks.tensors import DATATYPE_OF, DTYPES, is_packed, unpack
from workers.runtimes.base import InvalidInput

# One table of numeric datatypes (tasks/tensors.py): what the API packs, the model process accepts.
DATATYPES = DTYPES
NAMES = DATATYPE_OF


def decode_tensor(name: str, value: Any, default_dtype: str) -> np.ndarray:
    """Accept {"shape", "datatype", "data"} (data flat or nested), a plain nested list, or a packed tensor."""
    if is_packed(value):
        try:
            array = unpack(value)
        except ValueError as exc:  # ShapeError included
            raise InvalidInput(f"inputs.{name}: {exc}") from None
        if DATATYPE_OF.get(array.dtype) not in DATATYPES:
            raise InvalidInput(f"inputs.{name}.datatype {array.dtype.str!r} is not one of {', '.join(DATATYPES)}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidInput(f"inputs.{name} contains NaN or infinity")
        return array
    if isinstance(value, dict):
        datatype = value.get("datatype", default_dtype)
        if datatype not in DATATYPES:
            raise InvalidInput(f"inputs.{name}.datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
        data, shape = value.get("data"), value.get("shape")
    else:
        datatype, data, shape = default_dtype, value, None
    if not isinstance(data, list):
        raise InvalidInput(f"inputs.{name} must be a list of numbers or {{'shape', 'datatype', 'data'}}")
    if shape is not None:
        try:
            shape = checked_shape(shape)  # before anything multiplies it
        except ShapeError as exc:
            raise InvalidInput(f"inputs.{name}.shape {exc}") from None
    try:
        array = np.asarray(data, dtype=DATATYPES[datatype])
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"inputs.{name}.data is not a rectangular array of numbers: {exc}") from None
    if array.size > MAX_ELEMENTS:
        raise InvalidInput(f"inputs.{name} has {array.size} elements, more than {MAX_ELEMENTS}")
    if shape is not None:
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
    flat = array.reshape(-1)
    return {
        "shape": list(array.shape),
        "datatype": NAMES.get(array.dtype, str(array.dtype)),
        # float32/16 (and integers) as an array: stored as bytes, written as numbers; float64 as Python floats,
        # which the result's float32 packing would round
        "data": flat.tolist() if flat.dtype == np.float64 else flat,
    }
