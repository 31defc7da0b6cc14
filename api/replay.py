"""A dead letter replayed is a new submission of its owner: what the dead letter kept (tasks/deadletters.py
`Submission`) becomes the request again and takes the path every new request of that owner takes — the owner's
role (may it serve, or manage models; may it autoload the model: `route`), the original lane (which the owner must
still be allowed: `check_lane`; whoever replays cannot move it), the webhook checked again, and the shared
submission (`Services.submit`: Redis's memory, the queue's depth, the owner's rate limit). A refusal answers as it
would to the owner (403, 409, 429, 503) and creates nothing; the new job names the dead letter in `replay_of`.

`as_owner` is the one place a request is made to act for another principal (the batch driver does the same for a
batch's lines, batches/driver.py `_as_owner`: the next step folds both into one submission use case).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import g

from access.principal import MANAGE_MODELS, SERVE, Principal
from api.auth import check_role
from api.inference import queue_inference
from api.services import services
from api.webhooks import job_webhook
from protocols.errors import ApiError
from tasks.deadletters import NotReplayable, Submission
from tasks.states import INFERENCE


@contextmanager
def as_owner(who: Principal) -> Iterator[None]:
    """The enclosed submission runs as `who`'s own request would (its role, lanes, autoload, rate limit, webhook
    owner); the request's own principal is back afterwards. The request id stays the request's (it names the replay
    in the logs of both)."""
    saved = g.get("principal")
    g.principal = who
    try:
        yield
    finally:
        g.principal = saved


def replay(entry: dict[str, Any]) -> dict[str, Any]:
    """The new job of a dead letter (`DeadLetters.get`), submitted as its owner; 409 `not_replayable` when it kept
    too little."""
    try:
        request = Submission.from_entry(entry)
    except NotReplayable as exc:
        raise ApiError(409, "not_replayable", str(exc)) from None
    with as_owner(Principal(request.owner, request.role)):
        return submit(request, replay_of=entry["job_id"])


def submit(request: Submission, **extra: Any) -> dict[str, Any]:
    """A kept request submitted by its owner (the current principal) as a new one; `extra` goes into the job."""
    svc = services()
    spec = svc.spec(request.model_id)
    if request.kind == INFERENCE:
        check_role(SERVE)
        if request.batch:
            extra["batch"] = True
        return queue_inference(spec, _body(request), **extra)
    check_role(MANAGE_MODELS)
    device = svc.device_for(spec)
    payload: dict[str, Any] = {"device": device, **extra}
    if request.force:
        payload["force"] = True
    payload["webhook"] = job_webhook(request.webhook_url)  # as POST /models/{id}/load: else the owner's default
    return svc.submit(request.kind, spec, device, payload)


def _body(request: Submission) -> dict[str, Any]:
    """The inference body a client would have sent (api/inference.py `job_payload` reads it)."""
    body: dict[str, Any] = {
        "model_id": request.model_id,
        "inputs": request.inputs,
        "parameters": request.parameters,
        "priority": request.lane,
    }
    if request.timeout_s:
        body["timeout"] = request.timeout_s
    if request.encoding_format:
        body["encoding_format"] = request.encoding_format
    if request.result_ttl:
        body["result_ttl"] = request.result_ttl
    if request.webhook_url:
        body["webhook"] = {"url": request.webhook_url}
    return body
