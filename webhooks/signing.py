"""Completion webhooks' wire format: a delivery's body (Standard Webhooks' envelope), its id, its signature
(`webhook-signature`: v1, HMAC-SHA256 with the owner's `whsec_` secret) and the backoff between attempts. Pure
functions, no Redis: used by the dispatcher (webhooks/dispatcher.py), the batch store (a batch's webhook body) and the
CLI. May import the standard library and tasks/ only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import secrets as random_secrets
from datetime import UTC, datetime
from typing import Any

from tasks.names import DELIVERY_ID_PREFIX

SECRET_PREFIX = "whsec_"


def envelope(event: str, data: dict[str, Any], now: float) -> dict[str, Any]:
    """A delivery's body: Standard Webhooks' recommended {type, timestamp, data}."""
    stamp = datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"type": event, "timestamp": stamp, "data": data}


def delivery_id_for(ref: str) -> str:
    """A delivery's id, also its `webhook-id`: `msg_<job id>` (one delivery per job) or `msg_<batch id>`."""
    return f"{DELIVERY_ID_PREFIX}{ref}"


# -- signing --------------------------------------------------------------------------------------------------
def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(random_secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One Standard Webhooks signature: `v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets)


def retry_delay(retry: int, base_s: float, max_s: float, rng: Any = random.random) -> float:
    """Seconds before retry number `retry` (1: the first): base x 2^(retry-1), capped, times a jitter from 0.5 to 1
    (so a receiver that comes back is not met by every delivery at once, and the first retry is within base)."""
    delay = min(max_s, base_s * 2 ** min(retry - 1, 40))
    return delay * (0.5 + 0.5 * rng())
