"""`webhooks`: completion webhook deliveries that failed for good (over the API's HTTP), and the endpoints a 410
disabled (Redis directly, like `auth`)."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from cli.common import client, console, err, fail, print_json, reachable_redis

group = typer.Typer(help="Completion webhooks: failed deliveries, retry, disabled endpoints.", no_args_is_help=True)


@group.command("failed")
def webhooks_failed(
    limit: int = typer.Option(50, help="How many (newest first)"), as_json: bool = typer.Option(False, "--json")
) -> None:
    """Deliveries that failed for good (no 2xx within the retry window, a 410, a forbidden address)."""
    _, body = client().request("GET", "/webhooks/failed", params={"limit": limit})
    if as_json:
        return print_json(body)
    table = Table("delivery (webhook-id)", "job", "url", "reason", "attempts", "last error", "failed", title="failed")
    for d in body["deliveries"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["failed_at"])) if d.get("failed_at") else "-"
        table.add_row(
            d["id"],
            d.get("ref") or "-",
            d.get("url") or "-",
            d.get("reason") or "-",
            str(d["attempts"]),
            (d.get("last_error") or "")[:80],
            when,
        )
    console.print(table)
    depth = body["depth"]
    console.print(
        f"queue: {depth['new']} new, {depth['retrying']} retrying, {depth['in_flight']} in flight, "
        f"{depth['failed']} failed; {depth['dispatchers']} dispatcher(s) alive"
    )


@group.command("retry")
def webhooks_retry(
    delivery_id: str | None = typer.Argument(None, help="A failed delivery's id (msg_...)"),
    all_failed: bool = typer.Option(False, "--all", help="Every failed delivery (asks for confirmation)"),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation"),
) -> None:
    """Send failed deliveries again: due at once, a new retry window, the same webhook-id (receivers dedupe)."""
    if (delivery_id is None) == (not all_failed):
        fail("give one delivery id, or --all", 2)
    api = client()
    if delivery_id:
        ids = [delivery_id]
    else:
        ids = [d["id"] for d in api.request("GET", "/webhooks/failed", params={"limit": 10000})[1]["deliveries"]]
    if not ids:
        console.print("no failed delivery")
        return
    if all_failed and not yes and not typer.confirm(f"send {len(ids)} failed deliveries again?"):
        raise typer.Exit(1)
    for one in ids:
        status, body = api.request("POST", f"/webhooks/failed/{one}/retry", ok=(202, 404))
        if status == 404:
            err.print(f"{one}: {body['error']['message']}")
        else:
            console.print(f"{one}: due again")


def _owners():
    from webhooks.owners import WebhookOwners

    return WebhookOwners(reachable_redis())


@group.command("disabled")
def webhooks_disabled(as_json: bool = typer.Option(False, "--json")) -> None:
    """Endpoints disabled because they answered 410 Gone (talks to Redis directly)."""
    found = _owners().disabled_endpoints()
    if as_json:
        return print_json(found)
    table = Table("owner", "url", "since", "why")
    for entry in found:
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["at"]))
        table.add_row(entry["owner"], entry["url"], since, entry["reason"])
    console.print(table)


@group.command("enable")
def webhooks_enable(
    url: str = typer.Argument(..., help="The endpoint's URL, as disabled"),
    owner: str = typer.Option(..., "--owner", help="Whose endpoint (key:<id>, env:<digest>, jwt:<subject>, anonymous)"),
) -> None:
    """Enable an endpoint a 410 disabled (talks to Redis directly)."""
    if not _owners().enable(owner, url):
        fail(f"{url} is not disabled for {owner}")
    console.print(f"enabled {url} for {owner}")
