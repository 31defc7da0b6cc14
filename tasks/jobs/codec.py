"""How a job's fields are written to and read from its Redis hash: JSON encoded once, timestamps as ISO text, the
record decoded into the job callers see. Shared by every part of the job store (records, lifecycle, inflight,
events) and by the workers, which encode a result once (workers/completion.py)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from tasks.results import expand


def encode(value: Any) -> bytes:
    """JSON as bytes, once: numpy arrays (embeddings, tensors) serialise without a Python list in between."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def decode(fields: Mapping[Any, Any]) -> dict[str, Any]:
    """A job as callers see it, from its hash's fields (text values)."""

    def ts(name: str) -> float | None:
        return float(fields[name]) if fields.get(name) else None

    def js(name: str) -> Any:
        return orjson.loads(fields[name]) if fields.get(name) else None

    created, started, finished = ts("created_at"), ts("started_at"), ts("finished_at")
    job = {
        "job_id": fields["job_id"],
        "kind": fields.get("kind"),
        "model_id": fields.get("model_id"),
        "status": fields.get("status"),
        "device": fields.get("device"),
        "worker": fields.get("worker"),
        "attempts": int(fields.get("attempts") or 0),
        "request_id": fields.get("request_id"),
        "owner": fields.get("owner"),
        "chunks": int(fields.get("chunks") or 0),
        "created_at": iso(created),
        "started_at": iso(started),
        "finished_at": iso(finished),
        "result": expand(js("result")),
        "error": js("error"),
        "_created_ts": created,
    }
    if "replay_of" in fields:  # a dead letter's replay (submission/replay.py)
        job["replay_of"] = fields["replay_of"]
    traceparent = fields.get("traceparent")
    if traceparent:  # the W3C trace it belongs to (tracing/): its id is public, the parent span id is not needed
        job["trace_id"] = traceparent[3:35]
    return job
