"""`models`: build the demo models, write a manifest, list, load, unload, inspect."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.table import Table

from cli.common import client, console, fail, print_json, settings
from config.units import format_size
from tasks.states import FAILED, SUCCEEDED

group = typer.Typer(help="Configured models: build the demo models, list, load, unload, inspect.", no_args_is_help=True)


@group.command("bootstrap")
def models_bootstrap(
    force: bool = typer.Option(False, help="Rebuild even if present"),
    only: list[str] | None = typer.Argument(None, help="Build only these demo models"),
) -> None:
    """Build the demo models into the model store, offline and idempotently."""
    from model_store.bootstrap import BUILDERS, bootstrap

    cfg = settings()
    unknown = set(only or []) - set(BUILDERS)
    if unknown:
        fail(f"unknown demo model(s) {sorted(unknown)}; known: {', '.join(BUILDERS)}", 2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with console.status("building demo models...") as status:
        outcome = bootstrap(
            cfg.model_store, only, force, progress=lambda name, state: status.update(f"{name}: {state}...")
        )
    table = Table("model", "state", "path")
    for name, state in outcome.items():
        table.add_row(name, state, str(cfg.model_store / name))
    console.print(table)


@group.command("manifest")
def models_manifest(directory: Path = typer.Argument(..., help="A model's directory")) -> None:
    """Write the directory's aethercore-manifest.json (sha256 of every file); declare `manifest: true`."""
    from model_store.verify import write_manifest

    if not directory.is_dir():
        fail(f"{directory} is not a directory", 2)
    path = write_manifest(directory)
    console.print(f"wrote {path}; declare `manifest: true` for the model in models.yaml")


@group.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="Print JSON")) -> None:
    """Every configured model with its state."""
    _, body = client().request("GET", "/models")
    if as_json:
        return print_json(body)
    table = Table("model", "type", "task", "state", "device", "replicas")
    for m in body["models"]:
        table.add_row(
            m["model_id"],
            m["model_type"],
            m["task"],
            m["state"],
            m["device"] or m["configured_device"],
            str(len(m["replicas"])),
        )
    console.print(table)


def _job(kind: str, model_id: str, wait: float, as_json: bool) -> None:
    with console.status(f"{kind} {model_id}..."):
        _, job = client().request("POST", f"/models/{model_id}/{kind}", params={"wait": wait})
    if as_json:
        return print_json(job)
    if job["status"] == FAILED:
        fail(f"{kind} {model_id} failed: {job['error']['message']}")
    state = job["status"] if job["status"] != SUCCEEDED else job["result"]["state"]
    console.print(f"{model_id}: [green]{state}[/green] (job {job['job_id']})")


@group.command("load")
def models_load(
    model_id: str,
    wait: float = typer.Option(60, help="Seconds to wait for the job"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Load a model on every worker of its device."""
    _job("load", model_id, wait, as_json)


@group.command("unload")
def models_unload(
    model_id: str,
    wait: float = typer.Option(60, help="Seconds to wait for the job"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Unload a model from every worker and free its memory."""
    _job("unload", model_id, wait, as_json)


@group.command("status")
def models_status(model_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """State of a model and its replicas."""
    _, body = client().request("GET", f"/models/{model_id}/status")
    if as_json:
        return print_json(body)
    console.print(f"{model_id}: [bold]{body['state']}[/bold]" + (f" on {body['device']}" if body["device"] else ""))
    if body.get("error"):
        console.print(f"last error: {body['error']['message']}")
    table = Table("worker", "device", "state", "memory", "loaded at")
    for r in body["replicas"]:
        loaded = time.strftime("%H:%M:%S", time.localtime(r["loaded_at"])) if r.get("loaded_at") else "-"
        table.add_row(r["worker"], r["device"], r["state"], format_size(r.get("memory_bytes", 0)), loaded)
    console.print(table)


@group.command("info")
def models_info(model_id: str) -> None:
    """Configuration of a model plus what the loaded model reports."""
    _, body = client().request("GET", f"/models/{model_id}/info")
    print_json(body)
