"""`jobs`: recent jobs, one job, cancelling one."""

from __future__ import annotations

import typer
from rich.table import Table

from cli.common import client, console, print_json

group = typer.Typer(help="Submitted jobs: list, show, cancel.", no_args_is_help=True)


@group.command("list")
def jobs_list(
    limit: int = typer.Option(20, help="How many (newest first)"),
    status: str | None = typer.Option(None, help="Only this status"),
    model_id: str | None = typer.Option(None, "--model", help="Only this model"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Recent jobs, newest first."""
    params = {k: v for k, v in {"limit": limit, "status": status, "model_id": model_id}.items() if v is not None}
    _, body = client().request("GET", "/jobs", params=params)
    if as_json:
        return print_json(body)
    table = Table("job", "kind", "model", "status", "created", "worker", "error")
    for job in body["jobs"]:
        table.add_row(
            job["job_id"],
            job["kind"],
            job["model_id"],
            job["status"],
            job["created_at"] or "-",
            job["worker"] or "-",
            (job.get("error") or {}).get("code", ""),
        )
    console.print(table)


@group.command("show")
def jobs_show(job_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One job with its result or error."""
    _, job = client().request("GET", f"/jobs/{job_id}")
    print_json(job)


@group.command("cancel")
def jobs_cancel(job_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Cancel a queued job (it never runs) or stop a running stream."""
    status, job = client().request("DELETE", f"/jobs/{job_id}")
    if as_json:
        return print_json(job)
    console.print(f"{job_id}: {'cancelled' if status == 200 else 'asked to stop'} (status {job['status']})")
