"""Who a batch's owner is now (api/auth.py `Authenticator.current`, asked once per step by the batch driver): a
revoked API key, a static key no longer configured, anonymous once authentication is on are no one; a JWT subject
stays valid while the JWT secret is set (a JWT cannot be revoked one by one)."""

from __future__ import annotations

import hashlib

from access.keys import KeyStore
from access.principal import Principal
from api.auth import Authenticator

STATIC = "a-static-key-0123456789"
STATIC_OWNER = f"env:{hashlib.sha256(STATIC.encode()).hexdigest()[:12]}"


def test_a_revoked_or_removed_owner_is_no_one(scratch_redis):
    keys = KeyStore(scratch_redis)
    key_id, _secret = keys.create("user", "batches")
    auth = Authenticator(True, {STATIC: "user"}, "jwt-secret", keys)
    assert auth.current(f"key:{key_id}", "user") == Principal(f"key:{key_id}", "user")
    assert auth.current(STATIC_OWNER, "admin") == Principal(STATIC_OWNER, "user")  # its role as configured now
    assert auth.current("jwt:someone", "user") == Principal("jwt:someone", "user")
    keys.revoke(key_id)
    assert auth.current(f"key:{key_id}", "user") is None
    assert Authenticator(True, {}, "jwt-secret", keys).current(STATIC_OWNER, "user") is None
    assert Authenticator(True, {}, "", keys).current("jwt:someone", "user") is None
    assert auth.current("anonymous", "admin") is None and auth.current("other:x", "user") is None
    assert Authenticator(False, {}, "", keys).current("anonymous", "admin") == Principal("anonymous", "admin")
