"""X-Request-ID: taken from the client (when well-formed) or generated, echoed in the response,
bound to every log line of the request, stored on the jobs it creates and logged by the worker."""

from __future__ import annotations

import re
import secrets

from flask import Flask, Response, g, request
from loguru import logger

from api.tracing import TRACE_KEY

HEADER = "X-Request-ID"
_ENVIRON_KEY = "aethercore.request_id"
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def current_request_id() -> str | None:
    return g.get("request_id")


def init_request_id(app: Flask) -> None:
    wsgi_app = app.wsgi_app

    def with_request_id(environ, start_response):
        supplied = environ.get("HTTP_X_REQUEST_ID", "")
        request_id = supplied if _VALID.match(supplied) else secrets.token_hex(16)
        environ[_ENVIRON_KEY] = request_id
        # with tracing on (api/tracing.py, the outer wrapper), the request's trace id too: one context for both
        trace = environ.get(TRACE_KEY)
        if trace is None:
            with logger.contextualize(request_id=request_id):
                return wsgi_app(environ, start_response)
        with logger.contextualize(request_id=request_id, trace_id=trace[3:35]):
            return wsgi_app(environ, start_response)

    app.wsgi_app = with_request_id

    @app.before_request
    def _assign() -> None:
        g.request_id = request.environ.get(_ENVIRON_KEY) or secrets.token_hex(16)

    @app.after_request
    def _echo(response: Response) -> Response:
        response.headers[HEADER] = g.get("request_id", "")
        return response
