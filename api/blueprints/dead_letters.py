"""Dead letters (tasks/deadletters.py): list them, replay one (a new submission of its owner: submission/replay.py). For
operators (`manage.py jobs dead|replay`)."""

from __future__ import annotations

import re
from typing import Any

import marshmallow as ma
from flask.views import MethodView
from marshmallow import validate

from access.principal import READ_ALL_JOBS
from api.auth import requires
from api.callers import key_of, limit_headers
from api.json_provider import Blueprint
from api.request_id import current_request_id
from api.services import services
from api.tracing import current_trace
from protocols.errors import ApiError
from protocols.schemas import JOB_ID_RE, JobErrorSchema, JobSchema
from submission.replay import replay_request
from tasks.deadletters import REASONS, WEBHOOK_FAILED
from tasks.jobs.public import public_job

blp = Blueprint("dead_letters", __name__, description="Dead letters: list and replay (admins and operators)")
_JOB_ID = re.compile(JOB_ID_RE)


class DeadLetterQuerySchema(ma.Schema):
    queue = ma.fields.String(validate=validate.Regexp(r"^(cpu|cuda:\d{1,3})$"), metadata={"example": "cpu"})
    code = ma.fields.String(
        validate=validate.Regexp(r"^[a-z_]{1,64}$"),
        metadata={"description": f"A reason ({', '.join(REASONS)}) or the job's error code", "example": "poison_job"},
    )
    limit = ma.fields.Integer(load_default=100, validate=validate.Range(min=1, max=10000))
    before = ma.fields.Float(
        validate=validate.Range(min=0),
        metadata={"description": "Only dead letters older than this (epoch s, exclusive): a page's last `dead_at`"},
    )


class DeadLetterSchema(ma.Schema):
    job_id = ma.fields.String()
    queue = ma.fields.String()
    reason = ma.fields.String(metadata={"description": ", ".join(REASONS)})
    dead_at = ma.fields.Float(allow_none=True, metadata={"description": "When (epoch seconds)"})
    kind = ma.fields.String(allow_none=True)
    model_id = ma.fields.String(allow_none=True)
    owner = ma.fields.String(allow_none=True)
    role = ma.fields.String(allow_none=True, metadata={"description": "The owner's role when it submitted the job"})
    request_id = ma.fields.String(allow_none=True)
    error = ma.fields.Nested(JobErrorSchema, allow_none=True)
    webhook = ma.fields.Dict(allow_none=True)
    delivery_id = ma.fields.String(allow_none=True, metadata={"description": "A failed webhook's delivery"})
    replayed_as = ma.fields.String(allow_none=True, metadata={"description": "The job a replay created"})
    replayable = ma.fields.Boolean()


class DeadLetterListSchema(ma.Schema):
    dead_letters = ma.fields.List(ma.fields.Nested(DeadLetterSchema))
    depth = ma.fields.Dict(metadata={"description": "Dead letters kept per queue"})


class ReplayQuerySchema(ma.Schema):
    force = ma.fields.Boolean(load_default=False, metadata={"description": "Replay one already replayed again"})


class ReplaySchema(ma.Schema):
    replayed = ma.fields.String(metadata={"description": "The dead letter's job id"})
    job = ma.fields.Nested(JobSchema, allow_none=True, metadata={"description": "The new job (replay_of: the old)"})
    delivery_id = ma.fields.String(allow_none=True, metadata={"description": "A failed webhook's delivery, sent again"})


@blp.route("/dead-letters")
class DeadLetterList(MethodView):
    @blp.arguments(DeadLetterQuerySchema, location="query")
    @blp.response(200, DeadLetterListSchema, description="Dead letters, newest first")
    @requires(*READ_ALL_JOBS)
    def get(self, query: dict[str, Any]):
        dead = services().dead_letters
        found = dead.list(query.get("queue"), query.get("code"), query["limit"], before=query.get("before"))
        return {"dead_letters": found, "depth": dead.depth()}


@blp.route("/dead-letters/<string:job_id>/replay")
class Replay(MethodView):
    @blp.arguments(ReplayQuerySchema, location="query")
    @blp.response(
        202,
        ReplaySchema,
        description="Submitted again as its owner (their role, rate limit and the request's lane, checked as for a "
        "new request): a new job linked by `replay_of` (poison_job, expired_in_queue), or the failed webhook delivery "
        "sent again (webhook_failed: same webhook-id; the job is not run again)",
    )
    @blp.alt_response(403, description="The owner's role may no longer do this, or use the request's lane")
    @blp.alt_response(404, description="No such dead letter (or it expired), or its model is no longer configured")
    @blp.alt_response(
        409,
        description="Already replayed (see `force`), nothing was kept to replay (`not_replayable`), or the model is "
        "not loaded and its owner may not load it",
    )
    @blp.alt_response(429, description="The owner's rate limit, or the queue is full (Retry-After)")
    @blp.alt_response(503, description="Redis is full, no device, or the broker is down (Retry-After)")
    @requires(*READ_ALL_JOBS)
    def post(self, query: dict[str, Any], job_id: str):
        svc = services()
        entry = svc.dead_letters.get(job_id) if _JOB_ID.match(job_id) else None
        if entry is None:
            raise ApiError(404, "dead_letter_not_found", f"no dead letter {job_id[:64]!r} (or it expired)")
        if entry.get("replayed_as") and not query["force"]:
            raise ApiError(
                409,
                "already_replayed",
                f"{job_id} was already replayed as {entry['replayed_as']}; add ?force=true to replay it again",
                {"replayed_as": entry["replayed_as"]},
            )
        if entry["reason"] == WEBHOOK_FAILED:
            return {"replayed": job_id, "job": None, "delivery_id": resend_delivery(entry)}, 202
        traceparent, tracestate = current_trace()  # the replay joins the replaying request's trace
        request = replay_request(
            entry,
            caller_key=key_of(entry.get("owner")),
            request_id=current_request_id(),
            traceparent=traceparent,
            tracestate=tracestate,
            limit_headers=limit_headers(),
        )
        job = svc.submitter.submit(request)
        svc.dead_letters.mark_replayed(job_id, job["job_id"])
        return {"replayed": job_id, "job": public_job(job), "delivery_id": None}, 202


def resend_delivery(entry: dict[str, Any]) -> str:
    """A dead letter of a failed webhook: its delivery sent again (the endpoint enabled again if a 410 disabled it)."""
    svc = services()
    delivery_id = entry.get("delivery_id") or ""
    delivery = svc.deliveries.get(delivery_id) if delivery_id else None
    if delivery is None or not svc.deliveries.retry(delivery_id):
        raise ApiError(
            409, "not_replayable", f"the webhook delivery {delivery_id or '?'} is no longer kept; nothing to send again"
        )
    hook = delivery["webhook"]
    svc.webhook_owners.enable(hook.get("owner", ""), hook.get("url", ""))
    svc.dead_letters.mark_replayed(entry["job_id"], delivery_id)
    return delivery_id
