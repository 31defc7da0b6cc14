"""Results stored compactly: float arrays as their float32 bytes, not as JSON digits.

A 384-float embedding is ~4.7 KB as JSON text and 2 KB as base64 of its float32 bytes; in Redis (a hash
field that size) that is 14 KB against 7 KB per job. The worker stores every float array of a result as
`{"$nd": base64, "dtype": "<f4", "shape": [...]}` (still JSON, so the Lua step that ends a job can splice it
into the note that wakes the waiting API process), and whoever reads a result back expands those into numpy
arrays, which the API writes out as JSON numbers exactly as before (orjson's numpy support). The tagged form is
the one numeric tensors of a job's inputs take too (tasks/tensors.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.tensors import TAG, pack, unpack


def compact(value: Any) -> Any:
    """Float arrays anywhere in `value` as tagged float32 bytes."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return pack(np.asarray(value, dtype="<f4"))
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compact(v) for v in value]
    return value


def expand(value: Any) -> Any:
    """The inverse of `compact`: tagged arrays back as numpy arrays (read-only views of the decoded bytes)."""
    if isinstance(value, dict):
        if TAG in value:
            return unpack(value, checked=False)
        return {k: expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v) for v in value]
    return value
