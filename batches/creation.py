"""Creating a batch, below HTTP: the checks on its input file, its first record and its creation in Redis
(store.py's create), then keeping its input file through the completion window. The HTTP view that calls it is
api/blueprints/batches.py; a refusal is a protocols.errors.ApiError, a quota one tasks.holdings.QuotaExceeded.

May import config/, tasks/, protocols/ and the rest of batches/; never api, flask or werkzeug.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from batches.files import PURPOSE_BATCH, FileStore, new_file_id
from batches.store import COMPLETION_WINDOWS, NO_FILE, TOO_MANY_ACTIVE, VALIDATING, BatchStore, new_batch_id
from protocols.errors import ApiError


@dataclass(frozen=True)
class Creator:
    """Who creates the batch: its owner's id and role, the address the request came from, and the webhook its
    ending is delivered to ("" for none)."""

    owner: str
    role: str
    address: str
    webhook: str
    traceparent: str = ""  # the creating request's trace: each line's job is a child of it (batches/services.py)
    tracestate: str = ""


def check_input_file(source: dict[str, Any]) -> None:
    """400 `invalid_input_file` unless `source` was uploaded with purpose=batch."""
    if source.get("purpose") != PURPOSE_BATCH:
        purpose = source.get("purpose")
        problem = f"file {source['id']} has purpose {purpose!r}: a batch reads one uploaded with purpose=batch"
        raise ApiError(400, "invalid_input_file", problem, {"input_file_id": [problem]})


def batch_fields(body: dict[str, Any], source: dict[str, Any], creator: Creator, now: int) -> dict[str, Any]:
    """The new batch's record, `validating`, from the create request's `body` and its input file `source`."""
    fields: dict[str, Any] = {
        "id": new_batch_id(),
        "endpoint": body["endpoint"],
        "input_file_id": source["id"],
        "completion_window": body["completion_window"],
        "status": VALIDATING,
        "created_at": now,
        "expires_at": now + COMPLETION_WINDOWS[body["completion_window"]],
        "owner": creator.owner,
        "role": creator.role,
        "address": creator.address,
        "output_file": new_file_id(),  # reserved: the answers are written there as lines end
        "error_file": new_file_id(),
        "total": 0,
        "completed": 0,
        "failed": 0,
        "next_line": 0,
    }
    if body.get("metadata"):
        fields["metadata"] = orjson.dumps(body["metadata"]).decode()
    if creator.webhook:
        fields["webhook"] = creator.webhook
    if creator.traceparent:
        fields["traceparent"] = creator.traceparent
        if creator.tracestate:
            fields["tracestate"] = creator.tracestate
    return fields


def create_batch(
    files: FileStore,
    batches: BatchStore,
    body: dict[str, Any],
    source: dict[str, Any],
    creator: Creator,
    max_active: int,
) -> dict[str, Any]:
    """Create the batch (its input file checked already: check_input_file) and wake a driver; its record as stored.
    Raises ApiError (404 the input went meanwhile, 429
    too many unfinished batches) or QuotaExceeded (its owner's holdings are full)."""
    fields = batch_fields(body, source, creator, int(time.time()))
    outcome = batches.create(fields, source["id"], max_active)
    if outcome == NO_FILE:
        raise ApiError(404, "file_not_found", f"file {source['id']} expired or was deleted meanwhile")
    if outcome == TOO_MANY_ACTIVE:
        raise ApiError(
            429,
            "too_many_batches",
            f"you have {max_active} unfinished batches (AETHERCORE_BATCH_MAX_ACTIVE); wait for "
            "one to end or cancel one",
            headers={"Retry-After": "30"},
        )
    # the input is kept through the window (its keys extended by the step above), and so is its owner's charge
    files.keep_until(source["id"], source["owner"], int(fields["expires_at"]) + 3600)
    batches.wake()  # an idle batch driver starts it now (batches/driver.py)
    return batches.get(fields["id"]) or {k: str(v) for k, v in fields.items()}
