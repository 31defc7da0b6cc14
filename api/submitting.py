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
from api.tracing import current_trace
from protocols.results import ended_error
from submission import validation
from submission.errors import Refused
from submission.request import SubmitRequest
from submission.submitter import Submitter
from tasks.states import SUCCEEDED, TERMINAL


def submitter() -> Submitter:
    return services().submitter


def request_for(model_id: str, **fields: Any) -> SubmitRequest:
    """A submission of the request being served, by its caller."""
    traceparent, tracestate = current_trace()
    return SubmitRequest(
        model_id,
        caller=g.get("principal"),
        caller_key=caller_id(),
        request_id=current_request_id(),
        traceparent=traceparent,
        tracestate=tracestate,
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


def check_texts(texts: list[str], field: str) -> None:
    """A protocol's batch of strings: at most AETHERCORE_MAX_BATCH_INPUTS, each by the text rules (422 naming
    `field[i]`)."""
    settings = services().settings
    try:
        validation.check_texts(texts, field, settings.max_batch_inputs, settings.max_input_chars)
    except Refused as exc:
        raise refused_error(exc) from None
