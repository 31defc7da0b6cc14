"""The HTTP side of tracing: each request's server span, and the context a submission carries on.

With tracing on (tracing/setup.py), a WSGI wrapper starts the request's span (not for the probes and /metrics),
child of the caller's `traceparent` (and `tracestate`) when it sends a valid one, else the root of a new trace;
names it by its route once Flask has matched it (`POST /serve`); notes the status and the caller's role (never a key
or a token); answers the trace in a `traceresponse` header (W3C Trace Context Level 2: `00-<trace>-<span>-<flags>`);
and has api/request_id.py bind `trace_id` to every log line of the request, with the request id (one loguru context
per request). The span ends when the response starts: a stream's life is in its job's spans.

With tracing off nothing is installed; a caller's valid `traceparent` still travels with the jobs it submits (and
out on their webhooks), unchanged, as the specification asks of a service that does not trace."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, g, request

from tracing import spans, w3c
from tracing.setup import configure

RESPONSE_HEADER = "traceresponse"
_SPAN = "aethercore.span"
_STATE = "aethercore.tracestate"
TRACE_KEY = "aethercore.traceparent"  # the request span's context, formatted once (api/request_id.py logs its id)
# Probes and scrapes: a trace each every few seconds would bury the requests (and cost for nothing).
UNTRACED_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/heartbeat", "/metrics"})


def current_trace() -> tuple[str | None, str | None]:
    """(traceparent, tracestate) a job submitted by this request carries: the request span's context (on), else the
    caller's valid headers as they came (off)."""
    environ = request.environ
    traced = environ.get(TRACE_KEY)
    if traced is not None:
        return traced, environ.get(_STATE)
    parent = w3c.parse(environ.get("HTTP_TRACEPARENT"))
    if parent is None:
        return None, None
    return parent, w3c.parse_state(environ.get("HTTP_TRACESTATE"))


def init_tracing(app: Flask, trust_caller_sampling: bool = True) -> None:
    """`trust_caller_sampling`: AETHERCORE_TRACE_CALLER_SAMPLING (tracing/setup.py `configure`)."""
    if not configure("api", trust_caller_sampling=trust_caller_sampling):
        return
    wsgi_app = app.wsgi_app

    def traced(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") in UNTRACED_PATHS:
            return wsgi_app(environ, start_response)
        parent = w3c.parse(environ.get("HTTP_TRACEPARENT"))
        state = w3c.parse_state(environ.get("HTTP_TRACESTATE")) if parent is not None else None
        method = environ.get("REQUEST_METHOD", "")
        span = spans.start(
            method,
            parent,
            kind="server",
            root=True,
            tracestate=state,
            attributes={"http.request.method": method},
        )
        environ[_SPAN] = span
        environ[TRACE_KEY] = spans.child_traceparent(span, parent)  # None never: a root span is always made
        if state:
            environ[_STATE] = state
        error = None
        try:
            return wsgi_app(environ, start_response)
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            spans.end(span, error)

    app.wsgi_app = traced

    @app.after_request
    def _note(response: Response) -> Response:
        environ = request.environ
        span = environ.get(_SPAN)
        if span is None:
            return response
        response.headers[RESPONSE_HEADER] = environ[TRACE_KEY]
        if not span.is_recording():  # not sampled: nothing to note
            return response
        rule = request.url_rule.rule if request.url_rule else None
        if rule:
            span.update_name(f"{request.method} {rule}")
            span.set_attribute("http.route", rule)
        status = response.status_code
        span.set_attribute("http.response.status_code", status)
        principal = g.get("principal")
        if principal is not None:
            span.set_attribute("aethercore.caller.role", principal.role)
        if status >= 500:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", str(status))
        return response
