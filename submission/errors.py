"""Why a submission is refused: `Refused`, the one domain error of this room, and the status each refusal code
answers. A job's own codes (model_not_found, model_not_loaded, broker_unavailable...) are tasks/errors.py's and keep
its status table; the codes below are refusals of a request that never became a job (the job error contract,
tests/unit/test_errors.py, keeps to codes a job can end with). The HTTP layer maps `Refused` to its shapes in one
place (api/errors.py `refused_error`).

May import: tasks/."""

from __future__ import annotations

from typing import Any

from tasks.errors import http_status

VALIDATION_ERROR = "validation_error"  # the body breaks the model's declarations
TOO_MANY_INPUTS = "too_many_inputs"  # more inputs than AETHERCORE_MAX_BATCH_INPUTS
FORBIDDEN = "forbidden"  # the caller's role, or a lane not granted to it
NO_DEVICE = "no_device"  # no live worker can take the model
QUEUE_FULL = "queue_full"  # the lanes it would wait behind are at their bound
REDIS_FULL = "redis_full"  # Redis near its maxmemory: new jobs wait for results to expire
TOO_MANY_REQUESTS = "too_many_requests"  # the caller's rate limit
WEBHOOK_FORBIDDEN = "webhook_forbidden"  # a URL webhooks may not reach
WEBHOOK_DISABLED = "webhook_disabled"  # the endpoint answered 410
WEBHOOK_SECRET_MISSING = "webhook_secret_missing"  # the owner has no signing secret
TOO_MANY_WEBHOOKS = "too_many_webhooks"  # the owner keeps its most pending deliveries
IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"  # the key created something else
IDEMPOTENCY_KEY_EXPIRED = "idempotency_key_expired"  # its job expired between the Lua step and the read
NOT_REPLAYABLE = "not_replayable"  # a dead letter that kept too little

REFUSAL_STATUS: dict[str, int] = {
    VALIDATION_ERROR: 422,
    TOO_MANY_INPUTS: 413,
    FORBIDDEN: 403,
    NO_DEVICE: 503,
    QUEUE_FULL: 429,
    REDIS_FULL: 503,
    TOO_MANY_REQUESTS: 429,
    WEBHOOK_FORBIDDEN: 403,
    WEBHOOK_DISABLED: 409,
    WEBHOOK_SECRET_MISSING: 409,
    TOO_MANY_WEBHOOKS: 429,
    IDEMPOTENCY_KEY_REUSED: 422,
    IDEMPOTENCY_KEY_EXPIRED: 409,
    NOT_REPLAYABLE: 409,
}


def status_of(code: str) -> int:
    """The HTTP status a refusal code answers: this room's table, else the job contract's (tasks/errors.py)."""
    return REFUSAL_STATUS.get(code) or http_status(code)


class Refused(Exception):
    """A submission refused before its job existed (or, for broker_unavailable, ended before it was queued): a code
    (above, or tasks/errors.py), a message telling the caller what to do, details (field errors or context), and
    `retry_after_s` when waiting helps."""

    def __init__(
        self, code: str, message: str, details: dict[str, Any] | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.details = details or {}
        self.retry_after_s = retry_after_s

    @property
    def status(self) -> int:
        return status_of(self.code)


def invalid(errors: dict[str, list[str]]) -> Refused:
    return Refused(VALIDATION_ERROR, "the request is invalid; see details for each field", errors)


def refuse_if(errors: dict[str, list[str]]) -> None:
    """422 `validation_error` naming each field, when there are errors."""
    if errors:
        raise invalid(errors)


IDEMPOTENCY_HEADER = "Idempotency-Key"


def key_reused(job_id: str | None) -> Refused:
    """422: an Idempotency-Key already used with another request (it created `job_id`)."""
    return Refused(
        IDEMPOTENCY_KEY_REUSED,
        f"this {IDEMPOTENCY_HEADER} was already used for a different request (it created "
        f"{job_id or 'something else'}); use a new key for a new request",
        {IDEMPOTENCY_HEADER: ["already used with another request"]},
    )
