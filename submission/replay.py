"""A dead letter replayed is a new submission of its owner: what the dead letter kept (tasks/deadletters.py
`Submission`) becomes a `SubmitRequest` of that owner and takes the path every new request of theirs takes
(`Submitter.submit`): the owner's role (may it serve, or manage models; may it autoload the model), the original lane
(which the owner must still be allowed; whoever replays cannot move it), the webhook checked again, Redis's memory,
the queue's depth and the owner's rate limit. A refusal answers as it would to the owner (403, 409, 429, 503) and
creates nothing; the new job names the dead letter in `replay_of`.

May import: config/, tasks/, submission/."""

from __future__ import annotations

from typing import Any

from access.principal import Principal
from submission.errors import NOT_REPLAYABLE, Refused
from submission.request import SubmitRequest
from tasks.deadletters import NotReplayable, Submission
from tasks.states import INFERENCE


def replay_request(entry: dict[str, Any], **context: Any) -> SubmitRequest:
    """The new submission of a dead letter (`DeadLetters.get`) by its owner; 409 `not_replayable` when it kept too
    little. `context`: what the replaying request adds (its request id, where the rate limit's headers go)."""
    try:
        kept = Submission.from_entry(entry)
    except NotReplayable as exc:
        raise Refused(NOT_REPLAYABLE, str(exc)) from None
    return as_request(kept, replay_of=entry["job_id"], **context)


def as_request(kept: Submission, **fields: Any) -> SubmitRequest:
    """A kept request submitted by its owner as a new one."""
    owner = Principal(kept.owner, kept.role)
    common: dict[str, Any] = {"caller": owner, "caller_key": kept.owner, "webhook": kept.webhook_url, **fields}
    if kept.kind != INFERENCE:
        return SubmitRequest(kept.model_id, kind=kept.kind, force=kept.force, **common)
    return SubmitRequest(
        kept.model_id,
        inputs=kept.inputs,
        parameters=kept.parameters,
        batch=kept.batch,
        lane=kept.lane,
        timeout_s=kept.timeout_s,
        encoding_format=kept.encoding_format,
        result_ttl=kept.result_ttl,
        **common,
    )
