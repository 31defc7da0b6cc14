"""`auth`: API keys (stored hashed in Redis) and JWTs; talks to Redis directly."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from cli.common import console, err, fail, print_json, reachable_redis, settings

group = typer.Typer(
    help="API keys and tokens (talks to Redis directly: run it where Redis is reachable).", no_args_is_help=True
)


def _key_store():
    from access.keys import KeyStore

    return KeyStore(reachable_redis())


@group.command("create-key")
def auth_create_key(
    role: str = typer.Option(..., help="admin, operator, user or viewer"),
    name: str = typer.Option("", help="A note on who or what uses it"),
    lanes: str | None = typer.Option(
        None,
        help="Its own grant of priority lanes, e.g. high,normal,low (default: its role's, AETHERCORE_PRIORITY_LANES)",
    ),
) -> None:
    """Create an API key; it is printed once and stored only hashed."""
    try:
        key_id, key = _key_store().create(role, name, lanes)
    except ValueError as exc:
        fail(str(exc), 2)
    granted = f" and lanes {lanes}" if lanes is not None else ""
    err.print(f"created key {key_id} with role {role}{granted}; it is shown once, keep it safe:")
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
    table = Table("key id", "role", "lanes", "name", "created")
    for k in keys:
        table.add_row(
            k["key_id"],
            k["role"],
            ",".join(k["lanes"]) if k.get("lanes") else "(its role's)",
            k["name"],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(k["created_at"])),
        )
    console.print(table)


@group.command("token")
def auth_token(
    role: str = typer.Option(..., help="admin, operator, user or viewer"),
    ttl: int = typer.Option(3600, help="Seconds until it expires"),
    sub: str = typer.Option("cli", help="The subject (who the token is for)"),
    lanes: str | None = typer.Option(None, help="Its own grant of lanes (its `lanes` claim), e.g. high,normal"),
) -> None:
    """Issue a JWT signed with AETHERCORE_JWT_SECRET."""
    from access.keys import issue_token

    try:
        print(issue_token(settings().jwt_secret, sub, role, ttl, lanes))
    except ValueError as exc:
        fail(str(exc), 2)


def _webhook_owners():
    from webhooks.owners import WebhookOwners

    return WebhookOwners(_key_store().redis)


def owner_of(who: str) -> str:
    """A webhook owner as jobs name it (their `owner`): `key:<id>` for a key made with create-key (its bare id is
    taken too), `env:<digest>` for an AETHERCORE_API_KEYS key, `jwt:<subject>`, or `anonymous` (auth off)."""
    who = who.strip()
    if not who:
        fail("name the owner: a key id, key:<id>, env:<digest>, jwt:<subject> or anonymous", 2)
    return who if ":" in who or who == "anonymous" else f"key:{who}"


@group.command("webhook-secret")
def auth_webhook_secret(
    owner: str = typer.Argument(..., help="Key id (or key:<id>, env:<digest>, jwt:<subject>, anonymous)"),
    rotate: bool = typer.Option(False, "--rotate", help="Make a new secret; the old one keeps signing for the overlap"),
) -> None:
    """Print the owner's webhook signing secret (whsec_..., created on first use); receivers verify with it."""
    cfg = settings()
    who = owner_of(owner)
    record = _webhook_owners().secret(who, create=True, rotate=rotate, overlap_s=cfg.webhook_secret_overlap)
    if rotate and record.get("previous_until"):
        until = time.strftime("%Y-%m-%d %H:%M", time.localtime(record["previous_until"]))
        err.print(f"rotated {who}'s secret; the previous one signs beside it until {until} (the overlap)")
    else:
        err.print(f"{who}'s webhook signing secret (Standard Webhooks; give it to the receiver):")
    print(record["current"])


@group.command("webhook")
def auth_webhook(
    owner: str = typer.Argument(..., help="Key id (or key:<id>, env:<digest>, jwt:<subject>, anonymous)"),
    url: str | None = typer.Argument(None, help="Default endpoint: for every job of this owner without its own"),
    clear: bool = typer.Option(False, "--clear", help="Remove the default endpoint"),
) -> None:
    """Show or set the owner's default webhook endpoint (API processes see a change within 5 s)."""
    from webhooks.outbound import ForbiddenDestination, OutboundPolicy

    who = owner_of(owner)
    owners = _webhook_owners()
    if clear:
        owners.set_endpoint(who, None)
        console.print(f"{who} has no default webhook endpoint now")
        return
    if url is None:
        console.print(owners.endpoint(who) or f"{who} has no default webhook endpoint")
        return
    try:
        OutboundPolicy.from_entries(settings().webhook_allow).check_url(url)
    except ForbiddenDestination as exc:
        fail(f"{url} {exc}", 2)
    owners.secret(who, create=True)  # a default endpoint needs a secret to sign with
    owners.set_endpoint(who, url)
    owners.enable(who, url)
    console.print(f"{who}'s jobs POST their end to {url} (secret: `manage.py auth webhook-secret {owner}`)")
