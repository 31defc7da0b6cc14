"""A refusal as every protocol's codec speaks it: `ApiError` (an HTTP status, a code, a message that tells the
caller what to do, field details, headers such as Retry-After) and the field errors of its details. Raised below the
HTTP layer too (a batch line's /v1 translation in the batch driver); api/errors.py turns it into a response, each
protocol's codec into its own error body (protocols/openai.py `openai_error`, OIP's one line).
"""

from __future__ import annotations

from typing import Any

from submission.errors import Refused


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or {}
        self.headers = headers or {}


def field_errors(details: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, problem) pairs of a validation error's details ({"field": ["problem", ...]}), in order."""
    pairs: list[tuple[str, str]] = []
    for field, problems in details.items():
        if isinstance(problems, list) and all(isinstance(p, str) for p in problems):
            pairs.extend((str(field), p) for p in problems)
        elif isinstance(problems, dict):  # a nested schema's or a list item's errors: {"messages": {0: {...}}}
            pairs.extend((f"{field}.{inner}", p) for inner, p in field_errors(problems))
    return pairs


def one_line(message: str, details: dict[str, Any]) -> str:
    """The message with its field errors spelled out, for protocols whose errors are a single string."""
    fields = field_errors(details)
    if not fields:
        return message
    return "; ".join(f"{field}: {problem}" for field, problem in fields)


def refused_error(exc: Refused) -> ApiError:
    """A refused submission (submission/errors.py) in HTTP: its code's status, its message and details, and
    Retry-After when waiting helps. Every protocol's error shape starts from this one (`error_body`'s dialects)."""
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return ApiError(exc.status, exc.code, exc.message, exc.details, headers=headers)
