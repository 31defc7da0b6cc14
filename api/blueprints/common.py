"""Helpers shared by the job-returning endpoints."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app

from api.schemas import JobErrorSchema, JobSchema
from tasks.states import TERMINAL

# A job as JobSchema documents it: its declared fields (and an error's), in order. A job answered here is
# written straight from this projection, without a marshmallow dump per response (a tenth of an API process's
# CPU per /serve at GPU speed); tests/unit/test_fast_args.py checks it equals JobSchema().dump(job).
_JOB_FIELDS = tuple(JobSchema._declared_fields)
_ERROR_FIELDS = tuple(JobErrorSchema._declared_fields)


def public_job(job: dict[str, Any]) -> dict[str, Any]:
    public = {name: job[name] for name in _JOB_FIELDS if name in job}
    error = public.get("error")
    if isinstance(error, dict):
        public["error"] = {name: error[name] for name in _ERROR_FIELDS if name in error}
    return public


def job_reply(job: dict[str, Any]) -> Response:
    """200 once the job has ended, 202 (with where to poll) while it is queued or running."""
    response = current_app.json.response(public_job(job))
    response.status_code = 200 if job["status"] in TERMINAL else 202
    response.headers["Location"] = f"/jobs/{job['job_id']}"
    return response
