"""A job as callers see it (GET /jobs/{id}, /serve's answers, a completion webhook's `data`): its public fields,
in the order the API documents them (protocols/schemas.py JobSchema; tests/unit/test_fast_args.py checks both agree).
Written straight from this projection, without a marshmallow dump per response (a tenth of an API process's CPU per
/serve at GPU speed).
"""

from __future__ import annotations

from typing import Any

# JobSchema's declared fields, and its error's (JobErrorSchema), in order.
JOB_FIELDS = (
    "job_id",
    "kind",
    "model_id",
    "status",
    "device",
    "worker",
    "attempts",
    "request_id",
    "trace_id",
    "owner",
    "chunks",
    "created_at",
    "started_at",
    "finished_at",
    "result",
    "error",
    "replay_of",
)
ERROR_FIELDS = ("code", "message")


def public_job(job: dict[str, Any]) -> dict[str, Any]:
    public = {name: job[name] for name in JOB_FIELDS if name in job}
    error = public.get("error")
    if isinstance(error, dict):
        public["error"] = {name: error[name] for name in ERROR_FIELDS if name in error}
    return public
