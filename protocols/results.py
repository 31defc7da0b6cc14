"""What an ended job means to a protocol that answers at its end, without HTTP: its error (`ended_error`), its output
rows (`output_rows`), and the small shapes every protocol shares (a batch of strings as one job's fields, a
body's webhook URL, a protocol's own field errors as 422). Used by the /v1 and OIP views (api/) and by a batch
line's translation (protocols/openai.py, run by the batch driver).

May import: config/, tasks/, protocols/."""

from __future__ import annotations

from typing import Any

from protocols.errors import ApiError
from tasks import errors as job_errors
from tasks.errors import http_status
from tasks.states import CANCELLED, EXPIRED, FAILED

__all__ = ["ended_error", "output_rows", "raise_if", "requested_url", "text_fields"]


def ended_error(job: dict[str, Any]) -> ApiError:
    error = job.get("error") or {}
    code = error.get("code") or {
        EXPIRED: job_errors.EXPIRED,
        CANCELLED: job_errors.CANCELLED,
        FAILED: job_errors.INTERNAL_ERROR,
    }.get(job["status"], job_errors.INTERNAL_ERROR)
    message = error.get("message") or f"the job ended {job['status']}"
    return ApiError(http_status(code), code, message, {"job_id": job["job_id"]})


def raise_if(errors: dict[str, list[str]]) -> None:
    """A protocol's own field errors (its body's shape), as 422 `validation_error`."""
    if errors:
        raise ApiError(422, "validation_error", "the request is invalid; see details for each field", errors)


def requested_url(value: Any) -> str | None:
    """The URL of a body's `webhook` object ({"url": ...}), or None."""
    return value.get("url") if isinstance(value, dict) else None


def text_fields(texts: list[str]) -> dict[str, Any]:
    """N strings as one job's fields: a plain job for one (coalesced with /serve traffic), a batch job for several
    (its items go through the worker's batcher with everyone else's)."""
    if len(texts) == 1:
        return {"inputs": {"text": texts[0]}}
    return {"inputs": [{"text": t} for t in texts], "batch": True}


def output_rows(job: dict[str, Any]) -> list[dict[str, Any]]:
    """A succeeded job's output per input row (one, or a batch job's in order); the first failed row's error
    is raised (a protocol answers for the whole request)."""
    result = job.get("result") or {}
    if "outputs" not in result:
        return [result.get("output") or {}]
    rows = []
    for item in result["outputs"]:
        if "error" in item:
            error = item["error"] or {}
            code = error.get("code", job_errors.INTERNAL_ERROR)
            raise ApiError(http_status(code), code, error.get("message", "failed"), {"job_id": job["job_id"]})
        rows.append(item["output"])
    return rows
