"""HTTP authentication: the credential read off a request (`Authorization: Bearer <key-or-JWT>` or
`X-API-Key: <key>`), the caller put in flask's `g`, the view decorators that check its role, and the 401/403/429
answers. Who a credential belongs to, and what a role may do, is access/ (`access/keys.py`,
`access/principal.py`).

Failed authentication (a credential that is presented but unknown, expired or revoked) is counted per client
address and per presented API key id (`FailedAuthLimit`); beyond AETHERCORE_AUTH_FAILURE_LIMIT in a window,
credentialed requests from that address, or for that key id, are answered 429 before their credential is
looked at. Successful requests never wait for the count (docs/SECURITY.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

import redis
from flask import g, request
from loguru import logger

from access.keys import KEY_PREFIX, Credentials, KeyStore, split_key
from access.principal import ANONYMOUS_ADMIN, Principal
from protocols.errors import ApiError
from tasks.names import auth_failures_key

# The longest a presented key id is counted under (a guess's id part is the attacker's to choose).
_KEY_ID_CHARS = 32


class FailedAuthLimit:
    """Failed authentications counted in Redis per client address and per presented API key id, in fixed
    windows; a process that sees a count beyond the limit refuses that address or key id itself (in memory) until
    the window ends. Only failures pay a Redis round trip: a successful request checks a dict."""

    def __init__(self, client: redis.Redis, limit: int, window_s: int) -> None:
        self.redis = client
        self.limit = limit
        self.window_s = window_s
        self._blocked: dict[tuple[str, str], float] = {}  # (kind, who) -> monotonic time the block ends
        self._lock = threading.Lock()

    @staticmethod
    def _subjects(address: str | None, key_id: str | None) -> list[tuple[str, str]]:
        subjects = [("addr", address or "unknown")]
        if key_id:
            subjects.append(("key", key_id[:_KEY_ID_CHARS]))
        return subjects

    def check(self, address: str | None, key_id: str | None) -> None:
        """429 if the address or the key id is blocked in this process; no I/O."""
        if not self.limit or not self._blocked:
            return
        now = time.monotonic()
        for subject in self._subjects(address, key_id):
            until = self._blocked.get(subject)
            if until is not None:
                if until > now:
                    raise self._refusal(subject, until - now)
                with self._lock:
                    self._blocked.pop(subject, None)

    def failed(self, address: str | None, key_id: str | None) -> None:
        """Count one failure; 429 when it goes beyond the limit."""
        if not self.limit:
            return
        subjects = self._subjects(address, key_id)
        try:
            pipe = self.redis.pipeline()
            for kind, who in subjects:
                key = auth_failures_key(kind, who)
                pipe.incr(key)
                pipe.expire(key, self.window_s, nx=True)
                pipe.ttl(key)
            replies = pipe.execute()
        except redis.RedisError as exc:  # the 401 stands; counting is best effort
            logger.warning("cannot count a failed authentication: {}", exc)
            return
        worst: tuple[tuple[str, str], float] | None = None
        now = time.monotonic()
        for index, subject in enumerate(subjects):
            count, ttl = int(replies[3 * index]), int(replies[3 * index + 2])
            if count > self.limit:
                left = float(ttl if ttl > 0 else self.window_s)
                with self._lock:
                    if len(self._blocked) > 10_000:
                        self._blocked = {s: t for s, t in self._blocked.items() if t > now}
                    self._blocked[subject] = now + left
                if worst is None or left > worst[1]:
                    worst = (subject, left)
        if worst is not None:
            logger.warning("failed authentications beyond the limit from {} {}", *worst[0])
            raise self._refusal(*worst)

    def _refusal(self, subject: tuple[str, str], left_s: float) -> ApiError:
        what = "this address" if subject[0] == "addr" else "this API key id"
        retry = max(1, int(left_s + 0.999))
        return ApiError(
            429,
            "too_many_failed_authentications",
            f"too many failed authentications from {what} (AETHERCORE_AUTH_FAILURE_LIMIT={self.limit} per "
            f"{self.window_s} s); retry after the Retry-After header's seconds with valid credentials",
            headers={"Retry-After": str(retry)},
        )


class Authenticator(Credentials):
    """The API process's authentication: a request's credential resolved (access/keys.py `Credentials`), failures
    counted (`failures`), 401 when there is none or it is invalid."""

    def __init__(
        self,
        enabled: bool,
        static_keys: dict[str, str],
        jwt_secret: str,
        store: KeyStore,
        failures: FailedAuthLimit | None = None,
    ) -> None:
        super().__init__(enabled, static_keys, jwt_secret, store)
        self.failures = failures

    def authenticate(self) -> Principal:
        if not self.enabled:
            return ANONYMOUS_ADMIN
        credential = request.headers.get("X-API-Key", "").strip()
        if not credential:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer":
                credential = value.strip()
        if not credential:
            raise ApiError(
                401,
                "unauthorized",
                "credentials required: send `Authorization: Bearer <API key or JWT>` or `X-API-Key: <API key>`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        address = request.remote_addr
        key_id = split_key(credential)[0] if credential.startswith(KEY_PREFIX) else None
        if self.failures is not None:
            self.failures.check(address, key_id)
        principal = self.resolve(credential)
        if principal is None:
            if self.failures is not None:
                self.failures.failed(address, key_id)
            raise ApiError(
                401,
                "unauthorized",
                "the API key or token is invalid, expired or revoked",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return principal


def principal() -> Principal:
    return g.principal


# The OpenAPI security schemes the API accepts (api/app.py declares them; every operation that needs a role names
# them, the open ones say `security: []`): Swagger UI's Authorize button and generated clients use these.
SECURITY_SCHEMES = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (AETHERCORE_API_KEYS, or `manage.py auth create-key`) or a JWT",
    },
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "An API key"},
}
CREDENTIALS = [{name: []} for name in SECURITY_SCHEMES]  # either scheme will do


def requires(*roles: str) -> Callable:
    """View decorator: 403 unless the caller's role is one of `roles` (authentication happened before). The
    operation's OpenAPI entry says so: the credentials it takes, the roles (`x-required-roles`), 401 and 403."""

    def decorator(view: Callable) -> Callable:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            check_role(roles)
            return view(*args, **kwargs)

        wrapper._apidoc = {  # flask-smorest merges the blueprint's own decorators' documentation into this
            "manual_doc": {
                "security": CREDENTIALS,
                "x-required-roles": list(roles),
                "responses": {
                    "401": {"description": "No or unknown credentials (when AETHERCORE_AUTH is on)"},
                    "403": {"description": f"The caller's role is not one of: {', '.join(roles)}"},
                },
            }
        }
        return wrapper

    return decorator


def check_role(roles: tuple[str, ...]) -> None:
    who = g.principal
    if who.role not in roles:
        raise ApiError(403, "forbidden", f"role {who.role!r} may not do this (allowed: {', '.join(roles)})")
