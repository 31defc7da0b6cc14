"""`system`: the API's health, workers, queues and models, and each service's address and state."""

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
        make_redis(cfg.redis_url, cfg.redis_sentinel_master, **cfg.redis_ssl()).ping()
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
