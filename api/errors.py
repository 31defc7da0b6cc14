"""One JSON error shape for every failure: {"error": {"code", "message", "details"}}.

The status code carries the meaning; the message tells the user what to do. No HTML page,
no traceback ever reaches a client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import marshmallow as ma
import redis
from flask import Flask, has_request_context, jsonify, request
from kombu.exceptions import OperationalError
from loguru import logger
from werkzeug.exceptions import HTTPException, NotFound

from protocols.errors import ApiError, refused_error
from submission.errors import Refused
from tasks.errors import BROKER_UNAVAILABLE
from tasks.holdings import OWNER_BYTES, OWNER_COUNT, QuotaExceeded
from tasks.redis_client import NotReplicated

DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
}


def quota_error(exc: QuotaExceeded) -> ApiError:
    """What a caller's account cannot take (tasks/holdings.py), in HTTP: more bytes than its quota 413, more objects
    429, every caller's stored objects at their share of Redis 503 `storage_full`: one answer for every kind."""
    details = {"kind": exc.kind, "used_bytes": exc.used.bytes, "used_objects": exc.used.count}
    if exc.reason == OWNER_BYTES:
        return ApiError(413, "quota_exceeded", exc.message(), details)
    if exc.reason == OWNER_COUNT:
        return ApiError(429, "quota_exceeded", exc.message(), details, headers={"Retry-After": "60"})
    return ApiError(503, "storage_full", exc.message(), details, headers={"Retry-After": "60"})


class ErrorBodySchema(ma.Schema):
    code = ma.fields.String(required=True, metadata={"description": "Machine-readable error code"})
    message = ma.fields.String(required=True, metadata={"description": "What went wrong and what to do"})
    details = ma.fields.Dict(metadata={"description": "Field errors or context"})


class ErrorSchema(ma.Schema):
    error = ma.fields.Nested(ErrorBodySchema, required=True)


# Protocols with an error shape of their own (OIP: {"error": "..."}; OpenAI: {"error": {message, type, param,
# code}}), by path prefix: every error on their routes, routing and auth errors included, takes their shape.
ErrorBody = Callable[[int, str, str, dict[str, Any]], dict[str, Any]]
_DIALECTS: list[tuple[str, ErrorBody]] = []


def register_error_dialect(prefix: str, body: ErrorBody) -> None:
    _DIALECTS.append((prefix, body))


def error_body(status: int, code: str, message: str, details: dict | None = None) -> dict[str, Any]:
    path = request.path if has_request_context() else ""
    for prefix, body in _DIALECTS:
        if path == prefix or path.startswith(prefix + "/"):
            return body(status, code, message, details or {})
    return {"error": {"code": code, "message": message, "details": details or {}}}


def error_response(
    status: int, code: str, message: str, details: dict | None = None, headers: dict[str, str] | None = None
):
    response = jsonify(error_body(status, code, message, details))
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def http_exception_response(exc: HTTPException):
    """Werkzeug/webargs exceptions (404 routes, 405, 413, webargs 422) in our shape."""
    status = exc.code or 500
    data = getattr(exc, "data", None) or {}
    details: dict[str, Any] = {}
    message = exc.description or exc.name
    if status == 422 and "messages" in data:
        # webargs: {"json": {"field": ["msg"]}, "query": {...}}
        details = data["messages"]
        if isinstance(details, dict) and len(details) == 1:
            details = next(iter(details.values()))
        message = "the request is invalid; see details for each field"
    elif data.get("message"):
        message = data["message"]
    if status == 400 and request.is_json:
        message = "the request body is not valid JSON"
    if status == 404 and exc.description == NotFound.description:
        message = f"no such endpoint: {request.method} {request.path}; see /docs for the API"
    if status == 405:
        message = f"{request.method} is not allowed on {request.path}"
    if status == 429:
        message = f"rate limit exceeded ({exc.description}); retry after the Retry-After header's seconds"
    if status == 413:
        message = "the request body is larger than AETHERCORE_MAX_REQUEST_BYTES allows"
    if status >= 500:
        message = "internal error; the incident was logged"
    return error_response(status, DEFAULT_CODES.get(status, "error"), message, details, headers=data.get("headers"))


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.errorhandler(Refused)
    def _refused(exc: Refused):
        error = refused_error(exc)
        return error_response(error.status, error.code, error.message, error.details, error.headers)

    @app.errorhandler(NotReplicated)
    def _not_replicated(exc: NotReplicated):
        logger.warning("a write was not replicated in time: {}", exc)
        return error_response(
            503,
            "not_replicated",
            "Redis did not confirm the write on enough replicas in time (AETHERCORE_REDIS_MIN_REPLICAS_ACK; a "
            "failover may be under way): it may have been accepted or not, retry shortly with the same "
            "Idempotency-Key",
            headers={"Retry-After": "2"},
        )

    @app.errorhandler(redis.RedisError)
    def _redis_down(exc: redis.RedisError):
        logger.warning("Redis unavailable: {}", exc)
        return error_response(
            503,
            "redis_unavailable",
            "Redis is not reachable; the request was not accepted, retry shortly",
            headers={"Retry-After": "2"},
        )

    @app.errorhandler(OperationalError)
    def _broker_down(exc: OperationalError):
        logger.warning("broker unavailable: {}", exc)
        return error_response(
            503,
            BROKER_UNAVAILABLE,
            "the job queue is not reachable; the request was not accepted, retry shortly",
            headers={"Retry-After": "2"},
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        if isinstance(exc, HTTPException):
            return http_exception_response(exc)
        logger.opt(exception=exc).error("unhandled error")
        return error_response(500, "internal_error", "internal error; the incident was logged")
