"""The HTTP side of submitting a job: the request being served as a `SubmitRequest` (its caller, request id,
Idempotency-Key and where the rate limit's headers go), the one call into the submission room
(submission/submitter.py), and what an ended job means in HTTP terms for the protocols that answer only at its end
(OIP infer, OpenAI /v1). A protocol module turns its body into the request's fields; refusals come back as
`Refused`, which api/errors.py answers in the protocol's shape."""

from __future__ import annotations

from typing import Any

from flask import g

from api.callers import caller_id, limit_headers
from api.errors import ApiError, refused_error
from api.idempotency import current_claim, keyed
from api.request_id import current_request_id
from api.services import services
from submission import validation
from submission.errors import Refused
from submission.request import SubmitRequest
from submission.submitter import Submitter
from tasks import errors as job_errors
from tasks.errors import http_status
from tasks.states import CANCELLED, EXPIRED, FAILED, SUCCEEDED, TERMINAL


def submitter() -> Submitter:
    return services().submitter


def request_for(model_id: str, **fields: Any) -> SubmitRequest:
    """A submission of the request being served, by its caller."""
    return SubmitRequest(
        model_id,
        caller=g.get("principal"),
        caller_key=caller_id(),
        request_id=current_request_id(),
        idempotency=current_claim(),
        limit_headers=limit_headers(),
        **fields,
    )


def submit(model_id: str, **fields: Any) -> dict[str, Any]:
    """Submit a job for the request being served (`SubmitRequest`'s fields): the job, or `Refused`."""
    return submitter().submit(request_for(model_id, **fields))


def run_to_end(model_id: str, **fields: Any) -> dict[str, Any]:
    """Submit an inference job and wait for its end, at most AETHERCORE_MAX_WAIT: the job's result, or ApiError
    with the status its failure means. A job still unfinished then gets 504 naming it; it is cancelled only when
    nobody else can read it: a request with an Idempotency-Key leaves it to its deadline, since a duplicate or the
    client's retry with the key may be waiting for it (and must get its real end, never a cancellation one waiter
    caused)."""
    svc = services()
    bound = svc.settings.max_wait
    fields["timeout_s"] = fields.get("timeout_s") or bound  # not started within the wait: it expires, not runs
    shared = keyed()
    job = svc.submitter.submit(request_for(model_id, wait_s=bound, **fields))
    if job["status"] not in TERMINAL:
        if shared:
            raise ApiError(
                504,
                "timeout",
                f"the inference did not finish within {bound:g} s (AETHERCORE_MAX_WAIT); job {job['job_id']} goes on "
                "until its deadline: retry with the same Idempotency-Key to get its result",
                {"job_id": job["job_id"]},
            )
        svc.jobs.lifecycle.request_cancel(job["job_id"], "the protocol client's wait ended (AETHERCORE_MAX_WAIT)")
        raise ApiError(
            504,
            "timeout",
            f"the inference did not finish within {bound:g} s (AETHERCORE_MAX_WAIT); job {job['job_id']} was cancelled",
            {"job_id": job["job_id"]},
        )
    if job["status"] == SUCCEEDED:
        return job
    raise ended_error(job)


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


def check_texts(texts: list[str], field: str) -> None:
    """A protocol's batch of strings: at most AETHERCORE_MAX_BATCH_INPUTS, each by the text rules (422 naming
    `field[i]`)."""
    settings = services().settings
    try:
        validation.check_texts(texts, field, settings.max_batch_inputs, settings.max_input_chars)
    except Refused as exc:
        raise refused_error(exc) from None


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
