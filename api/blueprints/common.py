"""Helpers shared by the job-returning endpoints."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app

from tasks.jobs.public import public_job
from tasks.states import TERMINAL


def job_reply(job: dict[str, Any]) -> Response:
    """200 once the job has ended, 202 (with where to poll) while it is queued or running."""
    response = current_app.json.response(public_job(job))
    response.status_code = 200 if job["status"] in TERMINAL else 202
    response.headers["Location"] = f"/jobs/{job['job_id']}"
    return response
