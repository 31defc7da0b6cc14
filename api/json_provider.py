"""Flask's JSON through orjson: request bodies parsed and responses (embeddings: hundreds of floats)
written several times faster than with the standard library.

Every JSON a client sends is parsed here, by `loads_bounded` (protocols/json.py), whatever the route: Flask's
`request.get_json`, flask-smorest's body arguments (webargs would otherwise use the standard library's `json.loads`,
which recurses until RecursionError on deep nesting and parses a 4,000-digit integer, or raises ValueError past
4,300 digits), the WebSocket's request message and OIP's JSON header. What it refuses (protocols/json.py, the
parsing itself) is one 400 `bad_request`.
"""

from __future__ import annotations

import dataclasses
import decimal
import uuid
from typing import Any

import flask_smorest
import orjson
from flask import current_app
from flask.json.provider import JSONProvider
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request

from api.fast_args import loader_for
from protocols.errors import ApiError
from protocols.json import JsonBodyError, loads_bounded


def parse_body(data: bytes | str, what: str = "the body") -> Any:
    """A client's JSON under the app's AETHERCORE_MAX_JSON_DEPTH; ApiError 400 (the route's error shape)."""
    try:
        return current_app.json.loads(data)
    except JsonBodyError as exc:
        raise ApiError(400, "bad_request", f"{what} is {exc}") from None


class BodyParser(FlaskParser):
    """webargs' Flask parser with JSON bodies parsed by `parse_body` (once, cached on the request)."""

    def _raw_load_json(self, req: Any) -> Any:
        if not is_json_request(req):
            return core.missing
        data = req.get_data(cache=True)
        if not data:
            return core.missing  # no body: the schema's required fields say what is missing (422)
        cached = req.environ.get("aethercore.json_body", core.missing)
        if cached is core.missing:
            cached = req.environ["aethercore.json_body"] = parse_body(data)
        return cached

    def parse(self, argmap: Any, req: Any = None, *, location: str | None = None, **kwargs: Any) -> Any:
        """The hot routes' arguments in their common valid shape without the schema (api/fast_args.py); anything
        else through webargs and the schema."""
        fast = loader_for(argmap, location)
        if fast is not None:
            request = req if req is not None else self.get_default_request()
            source = request.args if location == "query" else self._raw_load_json(request)
            loaded = fast(source) if source is not core.missing else None
            if loaded is not None:
                return loaded
        return super().parse(argmap, req, location=location, **kwargs)


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint whose body arguments are parsed by `BodyParser`: every blueprint with a JSON body
    uses this one (tests/unit/test_input_limits.py checks that every registered blueprint does)."""

    ARGUMENTS_PARSER = BodyParser()

    def alt_response(self, *args: Any, **kwargs: Any) -> Any:
        """flask-smorest's `alt_response` documents the response and leaves the view as it was.

        Its own wraps the view in a function that only calls it through `current_app.ensure_sync` (the API's
        views are all synchronous): /serve's five alternative responses were five such calls per request, ~5 %
        of an API process's CPU at GPU speed (py-spy, docs/CAPACITY.md). The OpenAPI document is the same
        (tests/unit/test_blueprint_docs.py)."""
        document = super().alt_response(*args, **kwargs)

        def decorator(func: Any) -> Any:
            func._apidoc = document(func)._apidoc
            return func

        return decorator


_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _default(value: Any) -> Any:
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "__html__"):
        return str(value.__html__())
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_text(value: Any) -> str:
    """JSON text for SSE and WebSocket frames, as the responses write it (numpy arrays of results included)."""
    return orjson.dumps(value, default=_default, option=_OPTIONS).decode()


class OrjsonProvider(JSONProvider):
    def __init__(self, app: Any, max_depth: int | None = None) -> None:
        super().__init__(app)
        self.max_depth = max_depth  # AETHERCORE_MAX_JSON_DEPTH

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj, default=_default, option=_OPTIONS).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads_bounded(s, self.max_depth)

    def response(self, *args: Any, **kwargs: Any):
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(
            orjson.dumps(obj, default=_default, option=_OPTIONS), mimetype="application/json"
        )
