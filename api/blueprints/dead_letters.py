"""Dead letters (tasks/deadletters.py): list them, replay one. For operators (`manage.py jobs dead|replay`)."""

from __future__ import annotations

import re
import time
from typing import Any

import marshmallow as ma
import orjson
from flask.views import MethodView
from marshmallow import validate

from api.auth import READ_ALL_JOBS, requires
from api.blueprints.common import public_job
from api.errors import ApiError
from api.json_provider import Blueprint
from api.request_id import current_request_id
from api.schemas import JOB_ID_RE, JobErrorSchema, JobSchema
from api.services import services
from tasks.deadletters import REASONS, WEBHOOK_FAILED
from tasks.jobs import new_job_id, requeue_payload
from tasks.names import INFER, KIND_OF_TASK
from tasks.states import FAILED

blp = Blueprint("dead_letters", __name__, description="Dead letters: list and replay (admins and operators)")
_JOB_ID = re.compile(JOB_ID_RE)


class DeadLetterQuerySchema(ma.Schema):
    queue = ma.fields.String(validate=validate.Regexp(r"^(cpu|cuda:\d{1,3})$"), metadata={"example": "cpu"})
    code = ma.fields.String(
        validate=validate.Regexp(r"^[a-z_]{1,64}$"),
        metadata={"description": f"A reason ({', '.join(REASONS)}) or the job's error code", "example": "poison_job"},
    )
    limit = ma.fields.Integer(load_default=100, validate=validate.Range(min=1, max=10000))


class DeadLetterSchema(ma.Schema):
    job_id = ma.fields.String()
    queue = ma.fields.String()
    reason = ma.fields.String(metadata={"description": ", ".join(REASONS)})
    dead_at = ma.fields.Float(allow_none=True, metadata={"description": "When (epoch seconds)"})
    kind = ma.fields.String(allow_none=True)
    model_id = ma.fields.String(allow_none=True)
    owner = ma.fields.String(allow_none=True)
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
        found = dead.list(query.get("queue"), query.get("code"), query["limit"])
        return {"dead_letters": found, "depth": dead.depth()}


@blp.route("/dead-letters/<string:job_id>/replay")
class Replay(MethodView):
    @blp.arguments(ReplayQuerySchema, location="query")
    @blp.response(
        202,
        ReplaySchema,
        description="Queued again: a new job linked by `replay_of` (poison_job, expired_in_queue), or the failed "
        "webhook delivery sent again (webhook_failed: same webhook-id; the job is not run again)",
    )
    @blp.alt_response(404, description="No such dead letter (or it expired)")
    @blp.alt_response(409, description="Already replayed (see `force`), or nothing was kept to replay")
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
        job = replay_job(entry)
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


def replay_job(entry: dict[str, Any]) -> dict[str, Any]:
    """A new job with the dead letter's request (its owner, model, inputs, parameters, webhook; a fresh deadline of
    the same length), `replay_of` naming the old one, queued on the old one's queue."""
    svc = services()
    kept = entry.get("_payload")
    if not kept:
        raise ApiError(409, "not_replayable", f"{entry['job_id']}: its request was not kept; nothing to replay")
    task, queue, kwargs = kept["task"], kept["queue"], dict(kept["kwargs"])
    new_id, now, request_id = new_job_id(), time.time(), current_request_id()
    if task == INFER:
        old = kwargs["jobs"][0]
        work = {**old, "job_id": new_id, "submitted_at": now, "request_id": request_id}
        work.pop("isolate", None)
        if old.get("deadline") and old.get("submitted_at"):
            work["deadline"] = now + (float(old["deadline"]) - float(old["submitted_at"]))
        kwargs = {"model_id": kwargs["model_id"], "jobs": [work]}
    else:
        kwargs.update(job_id=new_id, request_id=request_id)
    hook = entry.get("webhook")
    job = svc.jobs.create(
        kind=KIND_OF_TASK.get(task, "inference"),
        model_id=kwargs["model_id"],
        device=queue,
        request_id=request_id,
        owner=entry.get("owner"),
        job_id=new_id,
        now=now,
        payload=requeue_payload(task, queue, kwargs),
        extra={"replay_of": entry["job_id"], "webhook": orjson.dumps(hook).decode() if hook else None},
    )
    try:
        svc.celery.send_task(
            task,
            kwargs=kwargs,
            queue=queue,
            task_id=new_id,
            kwargsrepr=repr({"job_id": new_id, "model_id": kwargs["model_id"], "replay_of": entry["job_id"]}),
        )
    except Exception:
        svc.jobs.finish(new_id, FAILED, error={"code": "broker_unavailable", "message": "the job could not be queued"})
        raise
    svc.dead_letters.mark_replayed(entry["job_id"], new_id)
    return job
