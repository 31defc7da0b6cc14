"""GET /jobs/{job_id}: the job as it stands (or once it ends, with ?wait=SECONDS)."""

from __future__ import annotations

import re
from typing import Any

from flask import request
from flask.views import MethodView

from access.principal import JOBS
from api.auth import principal, requires
from api.blueprints.common import job_reply
from api.json_provider import Blueprint
from api.relay import SSE_KEEPALIVE, Frames, Relay, admitted, resume_from, sse_event, sse_response
from api.services import services
from config.roles import ADMIN, USER
from protocols.errors import ApiError
from protocols.schemas import JOB_ID_RE, JobListQuerySchema, JobListSchema, JobSchema, WaitQuerySchema
from tasks.jobs.public import public_job
from tasks.states import FAILED, TERMINAL

blp = Blueprint("jobs", __name__, description="Submitted jobs")
_JOB_ID = re.compile(JOB_ID_RE)


def find_job(job_id: str) -> dict[str, Any]:
    # Validated before it becomes part of a Redis key.
    job = services().jobs.records.get(job_id) if _JOB_ID.match(job_id) else None
    who = principal()
    if job is not None and not who.sees_all_jobs and job.get("owner") != who.id:
        job = None  # someone else's job: exactly as if it did not exist
    if job is None:
        raise ApiError(404, "job_not_found", f"job {job_id!r} does not exist or has expired", {"job_id": job_id[:64]})
    return job


@blp.route("/jobs")
class Jobs(MethodView):
    @blp.arguments(JobListQuerySchema, location="query")
    @blp.response(200, JobListSchema, description="Recent jobs, newest first (a `user` sees only its own)")
    @requires(*JOBS)
    def get(self, query: dict[str, Any]):
        limit = query.pop("limit")
        who = principal()
        if not who.sees_all_jobs:
            query["owner"] = who.id
        return {"jobs": [public_job(j) for j in services().jobs.records.recent(limit, **query)]}


@blp.route("/jobs/<string:job_id>")
class Job(MethodView):
    @blp.arguments(WaitQuerySchema, location="query")
    @blp.response(200, JobSchema, description="The job has ended")
    @blp.alt_response(202, schema=JobSchema, description="The job is queued or running")
    @blp.alt_response(404, description="Unknown or expired job")
    @requires(*JOBS)
    def get(self, query: dict[str, Any], job_id: str):
        job = find_job(job_id)
        return job_reply(services().submitter.wait(job, query["wait"]))

    @blp.response(200, JobSchema, description="Cancelled: a queued job never runs")
    @blp.alt_response(
        202,
        schema=JobSchema,
        description="Running: asked to stop (a stream stops within a few tokens; a forward pass in progress completes)",
    )
    @blp.alt_response(404, description="Unknown or expired job")
    @blp.alt_response(409, description="The job already ended")
    @requires(ADMIN, USER)
    def delete(self, job_id: str):
        job = find_job(job_id)
        jobs = services().jobs
        if job["status"] in TERMINAL or not jobs.lifecycle.request_cancel(job["job_id"], "cancelled with DELETE /jobs"):
            current = jobs.records.get(job["job_id"]) or job
            raise ApiError(
                409,
                "job_ended",
                f"job {job_id} already ended ({current['status']}); nothing to cancel",
                {"status": current["status"]},
            )
        return job_reply(jobs.records.get(job["job_id"]) or job)


class JobEvents(Frames):
    """`/jobs/{id}/stream`'s Server-Sent Events. Only watching: a client that goes away cancels nothing."""

    keepalive_s = 15
    keepalive = SSE_KEEPALIVE

    def chunk(self, data: dict[str, Any], event_id: str) -> str:
        return sse_event("chunk", data, event_id)

    def status(self, data: dict[str, Any], event_id: str) -> str:
        return sse_event("status", data, event_id)

    def done(self, job: dict[str, Any], event_id: str) -> list[str]:
        finished = public_job(job)
        if finished.get("status") == FAILED:
            return [sse_event("error", {"error": finished.get("error"), "job": finished}, event_id)]
        return [sse_event("done", {"job": finished}, event_id)]

    def error(self, error: ApiError) -> str:
        return sse_event("error", {"error": {"code": error.code, "message": error.message, "details": error.details}})


@blp.route("/jobs/<string:job_id>/stream")
class JobStream(MethodView):
    @blp.response(
        200,
        description="Server-Sent Events: `chunk` (id = position in the job's stream), "
        '`status` (e.g. {"status": "queued"} while a generation waits for room in '
        "the model's running batch), then `done` with the job, or `error`. Send "
        "Last-Event-ID to resume.",
        content_type="text/event-stream",
    )
    @blp.alt_response(400, description="Last-Event-ID is not a position of this stream")
    @blp.alt_response(404, description="Unknown or expired job")
    @blp.alt_response(429, description="The caller holds AETHERCORE_MAX_STREAMS_PER_CALLER streams and waits")
    @blp.alt_response(503, description="The API process holds all the streams and waits it admits")
    @requires(*JOBS)
    def get(self, job_id: str):
        job = find_job(job_id)
        last_id = resume_from(request.headers.get("Last-Event-ID"))
        with admitted() as slot:
            return sse_response(Relay(job, JobEvents(), last_id), slot)
