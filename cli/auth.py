"""`auth`: API keys (stored hashed in Redis) and JWTs; talks to Redis directly."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from cli.common import console, err, fail, print_json, settings

group = typer.Typer(
    help="API keys and tokens (talks to Redis directly: run it where Redis is reachable).", no_args_is_help=True
)


def _key_store():
    from api.auth import KeyStore
    from tasks.redis_client import make_redis

    cfg = settings()
    try:
        client_ = make_redis(cfg.redis_url, cfg.redis_sentinel_master, **cfg.redis_ssl())
        client_.ping()
    except Exception:
        fail(f"Redis is not reachable at {cfg.redis_url} (AETHERCORE_REDIS_URL)")
    return KeyStore(client_)


@group.command("create-key")
def auth_create_key(
    role: str = typer.Option(..., help="admin, operator, user or viewer"),
    name: str = typer.Option("", help="A note on who or what uses it"),
) -> None:
    """Create an API key; it is printed once and stored only hashed."""
    try:
        key_id, key = _key_store().create(role, name)
    except ValueError as exc:
        fail(str(exc), 2)
    err.print(f"created key {key_id} with role {role}; it is shown once, keep it safe:")
    print(key)


@group.command("revoke")
def auth_revoke(key_id: str) -> None:
    """Revoke a key by its id (API processes stop accepting it within 5 s)."""
    if not _key_store().revoke(key_id):
        fail(f"no key with id {key_id!r}")
    console.print(f"revoked {key_id}")


@group.command("list")
def auth_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Keys stored in Redis (ids and roles, never the keys)."""
    keys = _key_store().list()
    if as_json:
        return print_json(keys)
    table = Table("key id", "role", "name", "created")
    for k in keys:
        table.add_row(
            k["key_id"], k["role"], k["name"], time.strftime("%Y-%m-%d %H:%M", time.localtime(k["created_at"]))
        )
    console.print(table)


@group.command("token")
def auth_token(
    role: str = typer.Option(..., help="admin, operator, user or viewer"),
    ttl: int = typer.Option(3600, help="Seconds until it expires"),
    sub: str = typer.Option("cli", help="The subject (who the token is for)"),
) -> None:
    """Issue a JWT signed with AETHERCORE_JWT_SECRET."""
    from api.auth import issue_token

    try:
        print(issue_token(settings().jwt_secret, sub, role, ttl))
    except ValueError as exc:
        fail(str(exc), 2)
