"""The hot routes' arguments in their common shape, accepted by a few dict lookups instead of webargs and
marshmallow.

At GPU speed, parsing and loading `/serve`'s body and query through webargs and marshmallow cost a fifth of an
API process's CPU per request (py-spy, bench/RESULTS.md). Marshmallow stays the reference: a loader here
returns the loaded arguments only for a shape it positively recognises as valid (the right keys, the right
JSON types, values in range), and None for anything else — an unknown key, a string where a number goes, a
bool, a value out of range, no body — which then goes through the schema and answers exactly as before,
errors and coercions included. tests/unit/test_fast_args.py checks, over generated bodies, that whatever a
loader accepts the schema loads to the same value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import marshmallow as ma

from config.lanes import LANES
from config.models import MODEL_ID_RE
from protocols.schemas import (
    ENCODINGS,
    RESULT_TTL_MAX,
    TIMEOUT_MAX,
    TIMEOUT_MIN,
    WAIT_MAX,
    BatchRequestSchema,
    ServeRequestSchema,
    WaitQuerySchema,
)
from tasks.names import DEFAULT_LANE

# (a parsed JSON body, or the query's MultiDict) -> the loaded arguments, or None: ask the schema.
Loader = Callable[[Any], "dict[str, Any] | None"]

_INFERENCE_KEYS = frozenset(
    {"model_id", "inputs", "parameters", "result_ttl", "timeout", "encoding_format", "priority"}
)
_PLAIN_DECIMAL = re.compile(r"[0-9]{1,4}(\.[0-9]{1,6})?")


def _common(body: Any) -> dict[str, Any] | None:
    """What every inference body carries besides its inputs (protocols/schemas.py `_InferenceRequest`)."""
    if type(body) is not dict or not body.keys() <= _INFERENCE_KEYS:
        return None
    model_id = body.get("model_id")
    if type(model_id) is not str or not MODEL_ID_RE.match(model_id):
        return None
    loaded: dict[str, Any] = {"model_id": model_id}
    parameters = body.get("parameters", {})
    if type(parameters) is not dict:
        return None
    loaded["parameters"] = dict(parameters)
    encoding = body.get("encoding_format", "float")
    if type(encoding) is not str or encoding not in ENCODINGS:
        return None
    loaded["encoding_format"] = encoding
    lane = body.get("priority", DEFAULT_LANE)
    if type(lane) is not str or lane not in LANES:
        return None
    loaded["priority"] = lane
    if "result_ttl" in body:
        ttl = body["result_ttl"]
        if type(ttl) is not int or not 1 <= ttl <= RESULT_TTL_MAX:
            return None
        loaded["result_ttl"] = ttl
    if "timeout" in body:
        timeout = body["timeout"]
        if type(timeout) not in (int, float) or not TIMEOUT_MIN <= timeout <= TIMEOUT_MAX:
            return None
        loaded["timeout"] = float(timeout)
    return loaded


def load_serve(body: Any) -> dict[str, Any] | None:
    loaded = _common(body)
    if loaded is None or type(body.get("inputs")) is not dict:
        return None
    loaded["inputs"] = dict(body["inputs"])
    return loaded


def load_batch(body: Any) -> dict[str, Any] | None:
    loaded = _common(body)
    items = body.get("inputs") if loaded is not None else None
    if type(items) is not list or not items or any(type(item) is not dict for item in items):
        return None
    loaded["inputs"] = [dict(item) for item in items]
    return loaded


def load_wait(args: Any) -> dict[str, Any] | None:
    """`?wait=S` (other query parameters are ignored, as the schema excludes them)."""
    values = args.getlist("wait")
    if not values:
        return {"wait": 0.0}
    if len(values) != 1 or not _PLAIN_DECIMAL.fullmatch(values[0]):
        return None
    wait = float(values[0])
    return {"wait": wait} if wait <= WAIT_MAX else None


# (schema class, webargs location) -> its loader. Exact classes: a subclass adds fields a loader does not know.
LOADERS: dict[tuple[type[ma.Schema], str], Loader] = {
    (ServeRequestSchema, "json"): load_serve,
    (BatchRequestSchema, "json"): load_batch,
    (WaitQuerySchema, "query"): load_wait,
}


def loader_for(argmap: Any, location: str | None) -> Loader | None:
    schema = argmap if isinstance(argmap, type) else type(argmap)
    return LOADERS.get((schema, location or "json"))
