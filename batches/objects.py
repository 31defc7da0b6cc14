"""A batch as callers see it: the OpenAI Batch object rendered from its record in Redis (GET /v1/batches, the
listing, the answer to create and cancel), and its webhook delivery's body (Standard Webhooks' envelope around the
Batch object as it ended), which the webhook dispatcher builds at the first attempt (cli/processes.py hands it
`webhook_body` for deliveries of kind batches/store.py DELIVERY_KIND).
May import config/, tasks/ and webhooks/; never api or flask.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis

from tasks.names import batch_key
from webhooks.signing import envelope


def _int(fields: dict[str, Any], name: str) -> int | None:
    value = fields.get(name)
    return int(float(value)) if value not in (None, "") else None


def batch_object(fields: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI Batch object."""
    errors = orjson.loads(fields["errors"]) if fields.get("errors") else None
    input_tokens, output_tokens = _int(fields, "input_tokens") or 0, _int(fields, "output_tokens") or 0
    return {
        "id": fields["id"],
        "object": "batch",
        "endpoint": fields["endpoint"],
        "model": fields.get("model") or None,
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": fields["input_file_id"],
        "completion_window": fields["completion_window"],
        "status": fields["status"],
        "output_file_id": fields.get("output_file_id") or None,
        "error_file_id": fields.get("error_file_id") or None,
        "created_at": _int(fields, "created_at"),
        "in_progress_at": _int(fields, "in_progress_at"),
        "expires_at": _int(fields, "expires_at"),
        "finalizing_at": _int(fields, "finalizing_at"),
        "completed_at": _int(fields, "completed_at"),
        "failed_at": _int(fields, "failed_at"),
        "expired_at": _int(fields, "expired_at"),
        "cancelling_at": _int(fields, "cancelling_at"),
        "cancelled_at": _int(fields, "cancelled_at"),
        "request_counts": {
            "total": _int(fields, "total") or 0,
            "completed": _int(fields, "completed") or 0,
            "failed": _int(fields, "failed") or 0,
        },
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
        "metadata": orjson.loads(fields["metadata"]) if fields.get("metadata") else None,
    }


def webhook_body(client: redis.Redis, batch_id: str, now: float) -> bytes | None:
    """A batch's webhook delivery body (webhooks/dispatcher.py, at its first attempt): Standard Webhooks'
    {type, timestamp, data}, `batch.<status>` with the Batch object as it ended; None when its record is gone."""
    raw = client.hgetall(batch_key(batch_id))
    fields = {_text(name): _text(value) for name, value in raw.items()}
    if "id" not in fields:
        return None
    public = batch_object(fields)
    return orjson.dumps(envelope(f"batch.{public['status']}", public, now))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value
