"""`system`: the API's health, workers, queues and models, what each owner makes the service keep, and each
service's address and state. Over the API's HTTP with this CLI's key (AETHERCORE_API_KEY), like every admin verb but
`auth`: the API is what an operator reaches from outside a deployment (Redis is behind its network policy)."""

from __future__ import annotations

import typer
from rich.table import Table

from cli.common import client, console, print_json, probe, settings
from config.units import format_size
from tasks.states import LOADED

group = typer.Typer(help="System status, health and services.", no_args_is_help=True)


@group.command("health")
def system_health(as_json: bool = typer.Option(False, "--json")) -> None:
    """The API's health checks; exits 1 when degraded."""
    status, body = client().request("GET", "/health", ok=(200, 503))
    if as_json:
        print_json(body)
    else:
        table = Table("check", "status", "detail")
        for name, check in body["checks"].items():
            detail = ", ".join(f"{k}={v}" for k, v in check.items() if k != "status")
            table.add_row(name, check["status"], detail)
        console.print(f"overall: [bold]{body['status']}[/bold]")
        console.print(table)
    if status != 200:
        raise typer.Exit(1)


@group.command("status")
def system_status(as_json: bool = typer.Option(False, "--json")) -> None:
    """API health, workers per device (heartbeat age, resident models, memory), queues, models, Flower."""
    api = client()
    _, health = api.request("GET", "/health", ok=(200, 503))
    _, workers = api.request("GET", "/workers")
    _, models = api.request("GET", "/models")
    flower_url = f"http://127.0.0.1:{settings().flower_port}"
    flower, _ms = probe(f"{flower_url}/healthcheck")
    if as_json:
        return print_json(
            {
                "api": api.base_url,
                "health": health,
                "workers": workers["workers"],
                "models": models["models"],
                "flower": {"url": flower_url, "status": flower},
            }
        )
    checks = health["checks"]
    console.print(
        f"API {api.base_url}: [bold]{health['status']}[/bold]   Redis: {checks['redis']['status']}   "
        f"Flower {flower_url}: {flower}"
    )
    depth = checks.get("queues", {}).get("depth", {})
    console.print("queues: " + (", ".join(f"{q}={n}" for q, n in depth.items()) or "-"))
    table = Table("worker", "device", "heartbeat age", "resident models", "model memory", "process memory")
    for w in workers["workers"]:
        resident = [
            f"{mid} ({format_size(info.get('memory_bytes', 0))})"
            for mid, info in w["models"].items()
            if info.get("state") == LOADED
        ]
        table.add_row(
            w["name"],
            w["device"],
            f"{w['heartbeat_age_s']:.1f} s",
            ", ".join(resident) or "-",
            format_size(w["memory"].get("cache_used_bytes", 0)),
            format_size(w["memory"].get("rss_bytes", 0)),
        )
    console.print(table)
    table = Table("model", "state", "device", "replicas")
    for m in models["models"]:
        table.add_row(m["model_id"], m["state"], m["device"] or "-", str(len(m["replicas"])))
    console.print(table)


def _held(entry: dict, kind: str) -> str:
    held = entry["kinds"][kind]
    return f"{format_size(held['bytes'])} / {held['objects']}" if held["objects"] or held["bytes"] else "-"


def _limit(quota: dict) -> str:
    parts = [format_size(quota["max_bytes"]) if quota["max_bytes"] else "", str(quota["max_count"] or "")]
    return " / ".join(p for p in parts if p) or "-"


@group.command("holdings")
def system_holdings(as_json: bool = typer.Option(False, "--json")) -> None:
    """Bytes / objects each owner makes the service keep, per kind, with each kind's quota per owner. An admin,
    operator or viewer key sees every owner and the totals; any other key its own account."""
    _, body = client().request("GET", "/holdings")
    if as_json:
        return print_json(body)
    kinds = list(body["quotas"])
    table = Table("owner", *(k.replace("_", " ") for k in kinds), "total", title="bytes / objects held")
    for entry in body["owners"]:
        table.add_row(entry["owner"], *(_held(entry, k) for k in kinds), format_size(entry["bytes"]))
    table.add_row("quota per owner", *(_limit(body["quotas"][k]) for k in kinds), "", style="dim")
    if "totals" in body:
        totals = body["totals"]
        limit = format_size(body["limit_bytes"]) if body["limit_bytes"] else "no limit"
        table.add_row("every owner", *(_held(totals, k) for k in kinds), f"{format_size(totals['bytes'])} of {limit}")
    console.print(table)


@group.command("services")
def system_services(as_json: bool = typer.Option(False, "--json")) -> None:
    """Each service with its address and whether it answers."""
    from tasks.redis_client import make_redis

    cfg = settings()
    rows = []

    def probe_http(name: str, url: str) -> None:
        state, _ms = probe(url)
        rows.append({"service": name, "address": url, "status": state.split(" ")[0], "detail": state})

    probe_http("api", f"{cfg.url.rstrip('/')}/heartbeat")
    try:
        make_redis(cfg.redis_url, cfg.redis_sentinel_master, **cfg.redis_options()).ping()
        rows.append({"service": "redis", "address": cfg.redis_url, "status": "up", "detail": "PONG"})
    except Exception as exc:
        rows.append({"service": "redis", "address": cfg.redis_url, "status": "down", "detail": type(exc).__name__})
    probe_http("flower", f"http://127.0.0.1:{cfg.flower_port}/healthcheck")
    if as_json:
        return print_json(rows)
    table = Table("service", "address", "status", "detail")
    for row in rows:
        table.add_row(row["service"], row["address"], row["status"], row["detail"])
    console.print(table)
