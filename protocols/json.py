"""A client's JSON, parsed with bounds (`loads_bounded`): every JSON body a client sends, whatever the route or
process (the API's bodies through api/json_provider.py, OIP's JSON header, a batch's input lines in the batch driver),
is parsed here. It refuses, as JsonBodyError:
* nesting deeper than AETHERCORE_MAX_JSON_DEPTH (orjson itself stops at 1024 without recursing; everything
  after the parser, our checks and orjson's encoder (254 levels) included, then sees a bounded depth);
* number literals a double cannot hold (orjson: "number is infinity", e.g. 10^400); integers are 64-bit at
  most (a larger integer literal is read as a float), so no request carries a huge Python int;
* invalid UTF-8, NaN/Infinity literals, and anything else that is not JSON.
"""

from __future__ import annotations

from typing import Any

import orjson


class JsonBodyError(ValueError):
    """A body is not JSON we take; the message completes "the body is ..." (Flask's get_json turns a ValueError
    into 400, and so does every other caller)."""


def _nesting_exceeds(value: Any, max_depth: int) -> bool:
    """Whether containers nest deeper than `max_depth` (a top-level list or object is depth 1); iterative."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (list, dict)):
                stack.append((child, depth + 1))
    return False


def loads_bounded(data: bytes | bytearray | memoryview | str, max_depth: int | None) -> Any:
    """A client's JSON, parsed by orjson and at most `max_depth` containers deep (None: orjson's own 1024);
    JsonBodyError saying why not."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise JsonBodyError(f"nested deeper than {max_depth or 1024} levels (AETHERCORE_MAX_JSON_DEPTH)") from None
        raise JsonBodyError(f"not valid JSON ({exc})") from None
    if max_depth is not None and isinstance(value, (list, dict)):
        # A body cannot nest deeper than it has brackets: counted in C, most bodies need no walk at all.
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if raw.count(b"[") + raw.count(b"{") > max_depth and _nesting_exceeds(value, max_depth):
            raise JsonBodyError(f"nested deeper than {max_depth} levels (AETHERCORE_MAX_JSON_DEPTH)")
    return value
