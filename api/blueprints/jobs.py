"""GET /jobs/{job_id}: the job as it stands (or once it ends, with ?wait=SECONDS)."""

from __future__ import annotations

import re
from typing import Any

from flask import Response, current_app, request, stream_with_context
from flask.views import MethodView
from flask_smorest import Blueprint

from api.auth import JOBS, principal, requires
from api.blueprints.common import job_reply, public_job
from api.errors import ApiError
from api.json_provider import json_text
from api.schemas import JOB_ID_RE, JobListQuerySchema, JobListSchema, JobSchema, WaitQuerySchema
from api.services import services
from api.streaming import follow_job
from config.roles import ADMIN, USER
from tasks.states import FAILED, TERMINAL

blp = Blueprint("jobs", __name__, description="Submitted jobs")
_JOB_ID = re.compile(JOB_ID_RE)


def find_job(job_id: str) -> dict[str, Any]:
    # Validated before it becomes part of a Redis key.
    job = services().jobs.get(job_id) if _JOB_ID.match(job_id) else None
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
        return {"jobs": [public_job(j) for j in services().jobs.recent(limit, **query)]}


@blp.route("/jobs/<string:job_id>")
class Job(MethodView):
    @blp.arguments(WaitQuerySchema, location="query")
    @blp.response(200, JobSchema, description="The job has ended")
    @blp.alt_response(202, schema=JobSchema, description="The job is queued or running")
    @blp.alt_response(404, description="Unknown or expired job")
    @requires(*JOBS)
    def get(self, query: dict[str, Any], job_id: str):
        job = find_job(job_id)
        return job_reply(services().wait(job, query["wait"]))

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
        if job["status"] in TERMINAL or not jobs.request_cancel(job["job_id"], "cancelled with DELETE /jobs"):
            current = jobs.get(job["job_id"]) or job
            raise ApiError(
                409,
                "job_ended",
                f"job {job_id} already ended ({current['status']}); nothing to cancel",
                {"status": current["status"]},
            )
        return job_reply(jobs.get(job["job_id"]) or job)


def _sse(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json_text(data)}\n\n"


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
    @blp.alt_response(404, description="Unknown or expired job")
    @requires(*JOBS)
    def get(self, job_id: str):
        job = find_job(job_id)
        jobs = services().jobs
        hub = services().streams
        last_id = request.headers.get("Last-Event-ID", "0-0")
        if not re.fullmatch(r"\d+-\d+", last_id):
            raise ApiError(400, "bad_request", "Last-Event-ID must be an id this stream sent (like 1712-0)")

        gauge = current_app.extensions["aethercore_metrics"].streams.labels("sse")

        def events():
            gauge.inc()
            try:
                yield from _events()
            finally:
                gauge.dec()

        def _events():
            for event in follow_job(jobs, job["job_id"], last_id, keepalive_s=15, hub=hub):
                if event.kind == "keepalive":
                    yield ": keepalive\n\n"
                elif event.kind in ("chunk", "status"):
                    yield _sse(event.kind, event.data, event.id)
                else:
                    finished = public_job(event.data)
                    if finished.get("status") == FAILED:
                        yield _sse("error", {"error": finished.get("error"), "job": finished}, event.id)
                    else:
                        yield _sse("done", {"job": finished}, event.id)

        return Response(
            stream_with_context(events()),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
