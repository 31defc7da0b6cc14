"""The caller of the request being served, as the HTTP layer knows it: whom per-caller limits count (`caller_id`),
whether they apply (`limited_per_caller`), the rate-limit headers of the response, and the endpoints whose
submissions the submission room counts (submission/ratelimit.py) rather than flask-limiter."""

from __future__ import annotations

from typing import Any

from flask import Flask, g
from flask_limiter.util import get_remote_address

from submission import caller

# The endpoints whose submissions are counted by the submission's rate limit rather than by flask-limiter.
INFERENCE_ENDPOINTS = frozenset({"serve.Serve", "serve.ServeBatch", "serve_stream", "oip.Infer", "oip.InferVersion"})


def caller_id() -> str:
    """Who a rate limit counts: the API key or JWT subject, else the client's address."""
    who = g.get("principal")
    return key_of(who.id if who is not None else None)


def key_of(owner: str | None) -> str:
    """Whom the limits count for a request made by `owner`: the owner, else (anonymous) the client's address."""
    return owner if owner is not None and owner != "anonymous" else get_remote_address()


def limited_per_caller() -> bool:
    """Whether this request's caller counts against the per-caller limits: everyone but an authenticated admin or
    operator."""
    return caller.limited_per_caller(g.get("principal"))


def limit_headers() -> dict[str, str]:
    """The rate-limit headers the response carries (a submission fills them with its use of its caller's limit)."""
    return g.setdefault("rate_limit_headers", {})


def init_rate_limit_headers(app: Flask) -> None:
    @app.after_request
    def _headers(response: Any) -> Any:
        headers = g.get("rate_limit_headers")
        if headers:
            response.headers.update(headers)
        return response
