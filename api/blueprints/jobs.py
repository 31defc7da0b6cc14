"""GET /jobs/{job_id}: the job as it stands (or once it ends, with ?wait=SECONDS)."""

from __future__ import annotations

import re
from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from api.blueprints.common import job_reply
from api.errors import ApiError
from api.schemas import JOB_ID_RE, JobSchema, WaitQuerySchema
from api.services import services

blp = Blueprint("jobs", __name__, description="Submitted jobs")
_JOB_ID = re.compile(JOB_ID_RE)


def find_job(job_id: str) -> dict[str, Any]:
    # Validated before it becomes part of a Redis key.
    job = services().jobs.get(job_id) if _JOB_ID.match(job_id) else None
    if job is None:
        raise ApiError(404, "job_not_found", f"job {job_id!r} does not exist or has expired",
                       {"job_id": job_id[:64]})
    return job


@blp.route("/jobs/<string:job_id>")
class Job(MethodView):
    @blp.arguments(WaitQuerySchema, location="query")
    @blp.response(200, JobSchema, description="The job has ended")
    @blp.alt_response(202, schema=JobSchema, description="The job is queued or running")
    @blp.alt_response(404, description="Unknown or expired job")
    def get(self, query: dict[str, Any], job_id: str):
        job = find_job(job_id)
        return job_reply(services().wait(job, query["wait"]))
