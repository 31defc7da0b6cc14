"""A batch's answers and errors as they are written: each line's entry in the output or error file (OpenAI's batch
output format: a response, or an error for a line that never ran), the short entry that replaces one beyond the
batch's output limits, the files published when the batch ends, and the batch's own `errors` list (each entry
bounded, whatever it quotes). Pure functions over a batch's record, beside the batch driver (batches/driver.py).
May import config/, tasks/, protocols/ and batches/; never api or flask.
"""

from __future__ import annotations

from typing import Any

import orjson

from batches.files import FileStore
from batches.store import ERROR, STOP_CANCEL, STOP_EXPIRE, STOP_REVOKED, Answer
from protocols.errors import ApiError
from protocols.openai import openai_error
from tasks.results import compact

MAX_ERRORS = 100  # validation errors reported per batch (then one saying how many more)
MESSAGE_MAX = 512  # characters of one error's message
VALUE_MAX = 64  # characters of a caller's value echoed in a message (its repr, cut), or of an error's param
OUTPUT_LIMIT_REACHED = "output_limit_reached"
# A line that never ran (the `error` of its entry in the error file, OpenAI's codes).
STOPPED = {
    STOP_CANCEL: ("batch_cancelled", "This request was not executed: the batch was cancelled."),
    STOP_EXPIRE: ("batch_expired", "This request could not be executed before the completion window expired."),
    STOP_REVOKED: (
        "batch_cancelled",
        "This request was not executed: the batch was cancelled because its owner's API key was revoked.",
    ),
}
# Why a stopping batch asks its running jobs to stop (their cancel reason).
STOP_WHY = {
    STOP_CANCEL: "its batch was cancelled",
    STOP_EXPIRE: "its batch's window ended",
    STOP_REVOKED: "its batch's owner was revoked",
}


# -- a line's entry ----------------------------------------------------------------------------------------------
def line_entry(line: int, file: str, entry: dict[str, Any], input_tokens: int = 0, output_tokens: int = 0) -> Answer:
    """A line's entry as stored (float arrays as their bytes, batches/files.py) and its size as read, with the short
    entry that replaces it when it does not fit the batch's output limits."""
    size = len(orjson.dumps(entry, option=orjson.OPT_SERIALIZE_NUMPY)) + 1
    stored = orjson.dumps(compact(entry)).decode() + "\n"
    short = orjson.dumps(
        {
            "id": entry["id"],
            "custom_id": entry["custom_id"],
            "response": None,
            "error": {"code": OUTPUT_LIMIT_REACHED, "message": _LIMITED},
        }
    )
    return Answer(line, file, stored, size, short.decode() + "\n", len(short) + 1, input_tokens, output_tokens)


_LIMITED = (
    "This request's answer was not kept: the batch's output and error files reached AETHERCORE_BATCH_OUTPUT_MAX_BYTES, "
    "or its owner's reached AETHERCORE_OUTPUTS_QUOTA."
)


def refused(batch: dict[str, Any], line: int, custom_id: Any, job_id: str | None, exc: ApiError) -> Answer:
    """A line answered as its /v1 request would be refused: the status and OpenAI's error body."""
    ident = job_id or line_id(batch, line)
    body = openai_error(exc.status, exc.code, exc.message, exc.details)
    entry = {
        "id": f"batch_req_{ident}",
        "custom_id": custom_id,
        "response": {"status_code": exc.status, "request_id": ident, "body": body},
        "error": None,
    }
    return line_entry(line, ERROR, entry)


def stopped(
    batch: dict[str, Any], line: int, custom_id: Any, job_id: str | None = None, why: str | None = None
) -> Answer:
    """A line that did not run because its batch stopped (OpenAI's non-HTTP `error`)."""
    code, message = STOPPED[why or batch.get("stopping") or STOP_CANCEL]
    entry = {
        "id": f"batch_req_{job_id or line_id(batch, line)}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    return line_entry(line, ERROR, entry)


def publish(files: FileStore, batch: dict[str, Any]) -> dict[str, str]:
    """The batch's output and error files that hold answers, published: their ids, as the batch's fields."""
    fields = {}
    for name, count, size, file_id in (
        ("output", "completed", "output_bytes", batch["output_file"]),
        ("error", "failed", "error_bytes", batch["error_file"]),
    ):
        if int(batch.get(count) or 0) > 0:
            filename = f"{batch['id']}_{name}.jsonl"
            lines = int(batch.get("total") or 0)
            files.publish(file_id, batch["owner"], filename, int(batch.get(size) or 0), lines)
            fields[f"{name}_file_id"] = file_id
    return fields


def line_id(batch: dict[str, Any], line: int) -> str:
    return f"{batch['id'].removeprefix('batch_')}-{line}"


def custom_id_of(text: bytes | None) -> Any:
    """A stored line's custom_id, None if the line is not what validation let through."""
    try:
        request = orjson.loads(text) if text else {}
    except orjson.JSONDecodeError:
        return None
    return request.get("custom_id") if isinstance(request, dict) else None


def all_answered(batch: dict[str, Any]) -> bool:
    answered = int(batch.get("completed") or 0) + int(batch.get("failed") or 0)
    return answered >= int(batch.get("total") or 0)


# -- the batch's errors (errors.data[]) ------------------------------------------------------------------------
def batch_errors(batch: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        errors = orjson.loads(batch["errors"]) if batch.get("errors") else []
    except orjson.JSONDecodeError:
        return []
    return errors if isinstance(errors, list) else []


def clip(value: Any) -> str:
    """A caller's value as a message shows it: its repr, cut to VALUE_MAX characters."""
    shown = repr(value)
    return shown if len(shown) <= VALUE_MAX else shown[:VALUE_MAX] + "…"


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_entry(code: str, message: str, param: str | None, line: int | None = None) -> dict[str, Any]:
    """An errors.data[] entry, its message and param bounded whatever they quote."""
    return {
        "code": cut(code, VALUE_MAX),
        "message": cut(message, MESSAGE_MAX),
        "param": None if param is None else cut(str(param), VALUE_MAX),
        "line": line,
    }


def add_error(errors: list[dict[str, Any]], problem: dict[str, Any]) -> int:
    """Add a validation error unless MAX_ERRORS are listed; 1 if it was left out."""
    if len(errors) < MAX_ERRORS:
        errors.append(problem)
        return 0
    return 1
