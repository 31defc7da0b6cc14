"""Helpers shared by the job-returning endpoints."""

from __future__ import annotations

from typing import Any

from tasks.states import TERMINAL


def public_job(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if not k.startswith("_")}


def job_reply(job: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, str]]:
    """200 once the job has ended, 202 (with where to poll) while it is queued or running."""
    status = 200 if job["status"] in TERMINAL else 202
    return public_job(job), status, {"Location": f"/jobs/{job['job_id']}"}
