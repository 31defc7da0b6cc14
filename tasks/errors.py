"""Every error code a job can end with, and the HTTP status each one answers: defined once.

The anchors are celery/states.py (every name a module-level constant, imported everywhere, never spelt as a
literal twice) and Triton's `TRITONSERVER_Error_Code` (one enum mapped to HTTP in one place). A worker writes
`{"code": CODE, "message": ...}` into a failed job (`error_body`); the API answers an ended job with
`http_status(code)` (api/submitting.py). Exceptions that end a job carry their code as a `code` attribute set
from these constants (model_store/paths.py, model_store/verify.py, workers/*); tests/unit/test_errors.py checks
that no code is spelt anywhere else and that each has a status.
"""

from __future__ import annotations

# -- the caller's request -------------------------------------------------------------------------------------
INVALID_INPUT = "invalid_input"  # the input broke the model's rules (found by the model process)
MODEL_NOT_FOUND = "model_not_found"  # not in models.yaml
MODEL_NOT_LOADED = "model_not_loaded"  # not resident, not meant to be, and the job may not load it (autoload)

# -- the model's files and its load ---------------------------------------------------------------------------
MODEL_UNAVAILABLE = "model_unavailable"  # its files are not on this machine
MODEL_PATH_FORBIDDEN = "model_path_forbidden"  # a local path outside the model store and AETHERCORE_MODEL_ROOTS
MODEL_ARTIFACT_REJECTED = "model_artifact_rejected"  # digest/manifest mismatch, or pickle weights refused
MODEL_TOO_LARGE = "model_too_large"  # beyond its max_memory or the whole AETHERCORE_MODEL_CACHE_SIZE
MODEL_LOAD_FAILED = "model_load_failed"
MODEL_LOAD_TIMEOUT = "model_load_timeout"  # not ready within AETHERCORE_LOAD_TIMEOUT

# -- the model went away while the job held it (docs/OPERATIONS.md: every job ends) ---------------------------
MODEL_UNLOADED = "model_unloaded"  # POST /models/{id}/unload (forced, or past AETHERCORE_UNLOAD_DRAIN)
MODEL_EVICTED = "model_evicted"  # least recently used, evicted to make room for another model
MODEL_PROCESS_DIED = "model_process_died"  # its process died and could not be started again
MODEL_TIMEOUT = "model_timeout"  # its process made no progress within the model's timeout_s

# -- the service ----------------------------------------------------------------------------------------------
BROKER_UNAVAILABLE = "broker_unavailable"  # the job's message could not be queued (the broker was unreachable)

# -- the job itself -------------------------------------------------------------------------------------------
DEADLINE_EXCEEDED = "deadline_exceeded"  # its `timeout` passed (job status `expired`)
EXPIRED = "expired"  # an expired job without an error of its own
CANCELLED = "cancelled"  # DELETE /jobs/{id}, a closed WebSocket, a protocol's wait that ended
POISON_JOB = "poison_job"  # it took its model process or worker down AETHERCORE_MAX_ATTEMPTS times
INTERNAL_ERROR = "internal_error"  # a bug: the log has the traceback

# What each code answers in HTTP (one place; the API never spells a status for a job's code elsewhere).
HTTP_STATUS: dict[str, int] = {
    INVALID_INPUT: 400,
    MODEL_NOT_FOUND: 404,
    MODEL_NOT_LOADED: 409,
    MODEL_UNAVAILABLE: 503,
    MODEL_PATH_FORBIDDEN: 503,
    MODEL_ARTIFACT_REJECTED: 503,
    MODEL_TOO_LARGE: 503,
    MODEL_LOAD_FAILED: 503,
    MODEL_LOAD_TIMEOUT: 503,
    MODEL_UNLOADED: 503,
    MODEL_EVICTED: 503,
    MODEL_PROCESS_DIED: 503,
    MODEL_TIMEOUT: 504,
    BROKER_UNAVAILABLE: 503,
    DEADLINE_EXCEEDED: 504,
    EXPIRED: 504,
    CANCELLED: 504,
    POISON_JOB: 500,
    INTERNAL_ERROR: 500,
}
CODES = frozenset(HTTP_STATUS)

# A model could not be made resident (a load job's failure, and the jobs that waited for the load).
LOAD_ERRORS = frozenset(
    {
        MODEL_UNAVAILABLE,
        MODEL_PATH_FORBIDDEN,
        MODEL_ARTIFACT_REJECTED,
        MODEL_TOO_LARGE,
        MODEL_LOAD_FAILED,
        MODEL_LOAD_TIMEOUT,
    }
)
# The model went away under a job that held it: the job ended, it did not fail by itself.
MODEL_GONE = frozenset({MODEL_UNLOADED, MODEL_EVICTED, MODEL_PROCESS_DIED})


def http_status(code: str | None) -> int:
    """The HTTP status of a job's error code; an unknown one (never written by this code base) is a 500."""
    return HTTP_STATUS.get(code or INTERNAL_ERROR, 500)


def error_body(code: str, message: str) -> dict[str, str]:
    """A job's `error` field: one of the codes above and a message that tells the caller what to do."""
    if code not in CODES:
        raise ValueError(f"{code!r} is not an error code of tasks/errors.py")
    return {"code": code, "message": message}
