"""Credentials and who they belong to: the API key store, JWTs, and one resolver over both.

* Static keys from AETHERCORE_API_KEYS (`key:role`), compared by SHA-256 digest.
* Keys created with `manage.py auth create-key`: `ack_<id>.<secret>`, stored in Redis as
  {sha256(secret), role, lanes} under their id (never in plain text), revocable by id. A revoked key stops
  working within KEY_CACHE_S seconds (each process caches lookups that long).
* JWTs signed HS256 with AETHERCORE_JWT_SECRET; `sub`, `role` and `exp` are required and checked; an optional
  `lanes` claim (a list of lane names) is the token's lane grant, and a token whose claim is not one is invalid.

Reading a credential off a request, and answering 401/429, is the HTTP layer's (api/auth.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from typing import Any

import jwt
import redis

from access.principal import ANONYMOUS_ADMIN, Principal, lane_grant
from config.lanes import LANES
from config.roles import ROLES
from tasks.names import AUTH_KEYS

KEYS_HASH = AUTH_KEYS
KEY_PREFIX = "ack_"
KEY_CACHE_S = 5.0


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str]:
    body = key[len(KEY_PREFIX) :]
    key_id, _, secret = body.partition(".")
    return key_id, secret


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
        entry: dict[str, Any] = {"digest": digest(secret), "role": role, "name": name, "created_at": time.time()}
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
        key_id, secret = split_key(key)
        if not key_id or not secret:
            return None
        raw = self.redis.hget(KEYS_HASH, key_id)
        if not raw:
            return None
        entry = json.loads(raw)
        if not hmac.compare_digest(entry["digest"], digest(secret)):
            return None
        lanes = entry.get("lanes")
        return Principal(f"key:{key_id}", entry["role"], frozenset(lanes) if lanes is not None else None)


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


def verify_token(secret: str, token: str) -> Principal | None:
    """The principal of a valid JWT signed with `secret`; None for any invalid one (or no secret)."""
    if not secret:
        return None
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
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


class Credentials:
    """Who a credential (static key, stored key, JWT) is, and who a stored owner is now: the static keys, the JWT
    secret and the key store, with each process's short cache of stored-key lookups."""

    def __init__(self, enabled: bool, static_keys: dict[str, str], jwt_secret: str, store: KeyStore) -> None:
        self.enabled = enabled
        self._static = {digest(k): (role, digest(k)[:12]) for k, role in static_keys.items()}
        self.jwt_secret = jwt_secret
        self.store = store
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def resolve(self, credential: str) -> Principal | None:
        """The principal `credential` authenticates, or None when it is unknown, expired or revoked."""
        if credential.count(".") == 2 and not credential.startswith(KEY_PREFIX):
            return verify_token(self.jwt_secret, credential)
        static = self._static.get(digest(credential))
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
