"""Completion webhooks' owners in Redis: each owner's signing secret (rotated with an overlap), its default endpoint,
and the endpoints a 410 disabled. Used by the API (a request's webhook), the dispatcher and the CLI (`manage.py auth
webhook-secret`, `webhooks`). May import tasks/ and webhooks/signing.py only.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis

from tasks.names import WEBHOOK_DISABLED, WEBHOOK_ENDPOINTS, WEBHOOK_SECRETS
from tasks.redis_client import text
from webhooks.signing import new_secret


class WebhookOwners:
    """Per owner (an API key id `key:<id>`, `env:<digest>`, `jwt:<subject>` or `anonymous`): its signing secret
    (and, after a rotation, the previous one until its overlap ends), its default endpoint, and the endpoints a 410
    disabled."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def secret(self, owner: str, *, create: bool = False, rotate: bool = False, overlap_s: int = 0) -> dict[str, Any]:
        """The owner's secret record {current, previous, previous_until, created_at}; created when asked (or
        rotated: the current one becomes `previous`, signing beside the new one for `overlap_s`)."""
        raw = self.redis.hget(WEBHOOK_SECRETS, owner)
        record = orjson.loads(raw) if raw else None
        if record is None and not (create or rotate):
            return {}
        if record is None or rotate:
            now = time.time()
            new = {"current": new_secret(), "created_at": now}
            if record is not None and overlap_s > 0:
                new.update(previous=record["current"], previous_until=now + overlap_s)
            self.redis.hset(WEBHOOK_SECRETS, owner, orjson.dumps(new))
            record = new
        return record

    def signing_secrets(self, owner: str, now: float | None = None) -> list[str]:
        record = self.secret(owner)
        if not record:
            return []
        keys = [record["current"]]
        if record.get("previous") and float(record.get("previous_until") or 0) > (now or time.time()):
            keys.append(record["previous"])
        return keys

    def has_secret(self, owner: str) -> bool:
        return bool(self.redis.hexists(WEBHOOK_SECRETS, owner))

    def owners(self) -> list[str]:
        return sorted(text(o) for o in self.redis.hkeys(WEBHOOK_SECRETS))

    def set_endpoint(self, owner: str, url: str | None) -> None:
        if url is None:
            self.redis.hdel(WEBHOOK_ENDPOINTS, owner)
        else:
            self.redis.hset(WEBHOOK_ENDPOINTS, owner, orjson.dumps({"url": url, "set_at": time.time()}))

    def endpoint(self, owner: str) -> str | None:
        raw = self.redis.hget(WEBHOOK_ENDPOINTS, owner)
        return orjson.loads(raw)["url"] if raw else None

    def endpoints(self) -> dict[str, str]:
        return {text(k): orjson.loads(v)["url"] for k, v in self.redis.hgetall(WEBHOOK_ENDPOINTS).items()}

    def disable(self, owner: str, url: str, reason: str) -> None:
        self.redis.hset(WEBHOOK_DISABLED, f"{owner} {url}", orjson.dumps({"at": time.time(), "reason": reason}))

    def enable(self, owner: str, url: str) -> bool:
        return bool(self.redis.hdel(WEBHOOK_DISABLED, f"{owner} {url}"))

    def disabled(self, owner: str, url: str) -> bool:
        return bool(self.redis.hexists(WEBHOOK_DISABLED, f"{owner} {url}"))

    def disabled_endpoints(self) -> list[dict[str, Any]]:
        out = []
        for key, raw in self.redis.hgetall(WEBHOOK_DISABLED).items():
            owner, _, url = text(key).partition(" ")
            out.append({"owner": owner, "url": url, **orjson.loads(raw)})
        return sorted(out, key=lambda e: e["at"])
