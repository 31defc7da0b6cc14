"""How a job's failure is told to the client, and the timings every result carries."""

from __future__ import annotations

from typing import Any

from workers.runtimes.base import InvalidInput


def error_body(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def classify(exc: BaseException) -> dict[str, str]:
    """The job's `error`: the caller's fault (invalid_input), a known condition (its own code), or a bug."""
    if isinstance(exc, InvalidInput):
        return error_body("invalid_input", str(exc))
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code != "internal_error":
        return error_body(code, str(exc))
    return error_body("internal_error", f"the worker failed to run the job ({type(exc).__name__}: {exc})")


def logged(log: Any, exc: BaseException) -> dict[str, str]:
    """Classify a job's failure and log it: a bug with its traceback, anything else in one line."""
    error = classify(exc)
    if error["code"] == "internal_error":
        log.opt(exception=exc).error("inference failed")
    else:
        log.info("inference failed: {}", error["message"])
    return error


def queue_ms(job: dict[str, Any], started: float) -> float | None:
    submitted = job.get("submitted_at")
    return round((started - submitted) * 1000, 3) if submitted else None
