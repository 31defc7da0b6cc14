"""Authentication (API keys, JWTs) and roles.

Credentials: `Authorization: Bearer <key-or-JWT>` or `X-API-Key: <key>`.
* Static keys from AETHERCORE_API_KEYS (`key:role`), compared by SHA-256 digest.
* Keys created with `manage.py auth create-key`: `ack_<id>.<secret>`, stored in Redis as
  {sha256(secret), role, lanes} under their id (never in plain text), revocable by id. A revoked key stops
  working within KEY_CACHE_S seconds (each API process caches lookups that long).
* JWTs signed HS256 with AETHERCORE_JWT_SECRET; `sub`, `role` and `exp` are required and checked; an optional
  `lanes` claim (a list of lane names) is the token's lane grant, and a token whose claim is not one is invalid.

Roles: admin (everything), operator (load/unload, read everything), user (serve, batch, stream, its
own jobs, read models), viewer (read models and health). Priority lanes (submission/caller.py `allowed_lanes`): a
key's or token's own grant when it has one, else its role's (AETHERCORE_PRIORITY_LANES; by default `high` only for
admins and operators). Serving a model that is not loaded loads it only for a caller who may manage models, or when
the model is declared `autoload: true` (submission/caller.py `may_autoload`).

Failed authentication (a credential that is presented but unknown, expired or revoked) is counted per client
address and per presented API key id (`FailedAuthLimit`); beyond AETHERCORE_AUTH_FAILURE_LIMIT in a window,
credentialed requests from that address, or for that key id, are answered 429 before their credential is
looked at. Successful requests never wait for the count (docs/SECURITY.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

import jwt
import redis
from flask import g, request
from loguru import logger

from api.errors import ApiError
from config.roles import ADMIN, OPERATOR, ROLES, USER
from tasks.names import AUTH_KEYS, LANES, auth_failures_key

KEYS_HASH = AUTH_KEYS
KEY_PREFIX = "ack_"
KEY_CACHE_S = 5.0

SERVE = (ADMIN, USER)
MANAGE_MODELS = (ADMIN, OPERATOR)
READ_MODELS = ROLES
READ_ALL_JOBS = (ADMIN, OPERATOR)
JOBS = (ADMIN, OPERATOR, USER)


@dataclass(frozen=True)
class Principal:
    id: str
    role: str
    lanes: frozenset[str] | None = None  # its own lane grant (a key's, a token's); None: its role's

    @property
    def sees_all_jobs(self) -> bool:
        return self.role in READ_ALL_JOBS


ANONYMOUS_ADMIN = Principal("anonymous", ADMIN)  # when AETHERCORE_AUTH=false


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def lane_grant(lanes: Any) -> frozenset[str]:
    """A grant of priority lanes (names, or one comma-separated string) checked: ValueError unless it names one or
    more of LANES and nothing else."""
    names = lanes.split(",") if isinstance(lanes, str) else lanes
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"lanes must be a list of lane names from {', '.join(LANES)}")
    grant = frozenset(n.strip() for n in names if n.strip())
    if not grant or not grant <= set(LANES):
        raise ValueError(f"lanes must name one or more of {', '.join(LANES)}, got {sorted(grant)}")
    return grant


class KeyStore:
    """API keys kept in Redis, hashed."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def create(self, role: str, name: str = "", lanes: Any = None) -> tuple[str, str]:
        """A new key of `role`; `lanes`: its own grant of priority lanes (None: its role's)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        grant = lane_grant(lanes) if lanes is not None else None
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        self.register(key_id, secret, role, name, grant)
        return key_id, f"{KEY_PREFIX}{key_id}.{secret}"

    def register(
        self, key_id: str, secret: str, role: str, name: str = "", lanes: frozenset[str] | None = None
    ) -> None:
        entry: dict[str, Any] = {"digest": _digest(secret), "role": role, "name": name, "created_at": time.time()}
        if lanes is not None:
            entry["lanes"] = sorted(lanes, key=LANES.index)
        self.redis.hset(KEYS_HASH, key_id, json.dumps(entry))

    def revoke(self, key_id: str) -> bool:
        return bool(self.redis.hdel(KEYS_HASH, key_id))

    def list(self) -> list[dict[str, Any]]:
        out = []
        for key_id, raw in sorted(self.redis.hgetall(KEYS_HASH).items()):
            entry = json.loads(raw)
            out.append(
                {
                    "key_id": key_id,
                    "role": entry["role"],
                    "name": entry.get("name", ""),
                    "created_at": entry.get("created_at"),
                    "lanes": entry.get("lanes"),
                }
            )
        return out

    def lookup(self, key: str) -> Principal | None:
        body = key[len(KEY_PREFIX) :]
        key_id, _, secret = body.partition(".")
        if not key_id or not secret:
            return None
        raw = self.redis.hget(KEYS_HASH, key_id)
        if not raw:
            return None
        entry = json.loads(raw)
        if not hmac.compare_digest(entry["digest"], _digest(secret)):
            return None
        lanes = entry.get("lanes")
        return Principal(f"key:{key_id}", entry["role"], frozenset(lanes) if lanes is not None else None)


def split_key(key: str) -> tuple[str, str]:
    body = key[len(KEY_PREFIX) :]
    key_id, _, secret = body.partition(".")
    return key_id, secret


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


class Authenticator:
    def __init__(
        self,
        enabled: bool,
        static_keys: dict[str, str],
        jwt_secret: str,
        store: KeyStore,
        failures: FailedAuthLimit | None = None,
    ) -> None:
        self.enabled = enabled
        self._static = {_digest(k): (role, _digest(k)[:12]) for k, role in static_keys.items()}
        self.jwt_secret = jwt_secret
        self.store = store
        self.failures = failures
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

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
        principal = self._resolve(credential)
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

    def _resolve(self, credential: str) -> Principal | None:
        if credential.count(".") == 2 and not credential.startswith(KEY_PREFIX):
            return self._jwt(credential)
        static = self._static.get(_digest(credential))
        if static:
            return Principal(f"env:{static[1]}", static[0])
        if not credential.startswith(KEY_PREFIX):
            return None
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(credential)
        if cached and now - cached[0] < KEY_CACHE_S:
            return cached[1]
        principal = self.store.lookup(credential)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[credential] = (now, principal)
        return principal

    def current(self, owner: str, role: str) -> Principal | None:
        """The principal `owner` (as stored by work that outlives its request: a batch) is now, or None when its
        credentials were revoked: a key made by `manage.py auth create-key` no longer in Redis (read there, not
        from the cache), a static key no longer in AETHERCORE_API_KEYS, anyone while authentication is on for
        `anonymous`. A JWT subject stays valid while AETHERCORE_JWT_SECRET is set with `role` (its token's): a JWT
        cannot be revoked one by one, only all together by changing the secret."""
        kind, _, ident = owner.partition(":")
        if not self.enabled:
            return ANONYMOUS_ADMIN if owner == ANONYMOUS_ADMIN.id else Principal(owner, role)
        if kind == "key":
            raw = self.store.redis.hget(KEYS_HASH, ident)
            return Principal(owner, json.loads(raw)["role"]) if raw else None
        if kind == "env":
            roles = [static_role for static_role, short in self._static.values() if short == ident]
            return Principal(owner, roles[0]) if roles else None
        if kind == "jwt" and self.jwt_secret:
            return Principal(owner, role)
        return None

    def _jwt(self, token: str) -> Principal | None:
        if not self.jwt_secret:
            return None
        try:
            claims = jwt.decode(token, self.jwt_secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.PyJWTError:
            return None
        role, subject = claims.get("role"), claims.get("sub")
        if role not in ROLES or not isinstance(subject, str) or not subject:
            return None
        try:  # the issuer (who holds the secret) grants lanes; a claim that is not a grant fails the token, closed
            lanes = lane_grant(claims["lanes"]) if "lanes" in claims else None
        except ValueError:
            return None
        return Principal(f"jwt:{subject}", role, lanes)


def issue_token(secret: str, subject: str, role: str, ttl_s: int, lanes: Any = None) -> str:
    """A JWT for `subject` with `role`; `lanes`: its own grant of priority lanes (None: its role's)."""
    if not secret:
        raise ValueError("AETHERCORE_JWT_SECRET is not set")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "role": role, "iat": now, "exp": now + ttl_s}
    if lanes is not None:
        claims["lanes"] = sorted(lane_grant(lanes), key=LANES.index)
    return jwt.encode(claims, secret, algorithm="HS256")


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
