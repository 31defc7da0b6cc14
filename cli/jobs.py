"""`jobs`: recent jobs, one job, cancelling one; dead letters and their replay."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from cli.common import client, console, err, fail, print_json

group = typer.Typer(help="Submitted jobs: list, show, cancel; dead letters: dead, replay.", no_args_is_help=True)


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


def _dead_letters(queue: str | None, code: str | None, limit: int) -> dict:
    params = {k: v for k, v in {"queue": queue, "code": code, "limit": limit}.items() if v is not None}
    return client().request("GET", "/dead-letters", params=params)[1]


@group.command("dead")
def jobs_dead(
    queue: str | None = typer.Option(None, "--queue", help="Only this queue (cpu, cuda:0, ...)"),
    code: str | None = typer.Option(
        None, "--code", help="Only this reason (poison_job, expired_in_queue, webhook_failed) or error code"
    ),
    limit: int = typer.Option(50, help="How many (newest first)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Dead letters: jobs that ended poison_job, expired in their queue, or whose webhook failed for good."""
    body = _dead_letters(queue, code, limit)
    if as_json:
        return print_json(body)
    columns = ("job", "queue", "reason", "error", "model", "owner", "dead since", "replayed as")
    table = Table(*columns, title="dead letters")
    for entry in body["dead_letters"]:
        error = entry.get("error") or {}
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["dead_at"])) if entry.get("dead_at") else "-"
        table.add_row(
            entry["job_id"],
            entry["queue"],
            entry["reason"],
            error.get("code", ""),
            entry.get("model_id") or "-",
            entry.get("owner") or "-",
            when,
            entry.get("replayed_as") or "",
        )
    console.print(table)
    depth = ", ".join(f"{q}: {n}" for q, n in sorted(body["depth"].items())) or "none"
    console.print(f"kept per queue: {depth}")


@group.command("replay")
def jobs_replay(
    job_id: str | None = typer.Argument(None, help="The dead letter's job id"),
    all_matching: bool = typer.Option(
        False, "--all-matching", help="Every dead letter matching --queue/--code (asks for confirmation)"
    ),
    queue: str | None = typer.Option(None, "--queue", help="With --all-matching: only this queue"),
    code: str | None = typer.Option(None, "--code", help="With --all-matching: only this reason or error code"),
    force: bool = typer.Option(False, "--force", help="Replay dead letters already replayed too"),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Queue a dead letter again: a new job linked by `replay_of` (a failed webhook: its delivery sent again)."""
    if (job_id is None) == (not all_matching):
        fail("give one dead letter's job id, or --all-matching (with --queue/--code)", 2)
    if job_id is not None:
        ids = [job_id]
    else:
        found = _dead_letters(queue, code, 10000)["dead_letters"]
        ids = [e["job_id"] for e in found if e.get("replayable") and (force or not e.get("replayed_as"))]
        if not ids:
            console.print("no dead letter to replay matches")
            return
        what = ", ".join(f"{k}={v}" for k, v in {"queue": queue, "code": code}.items() if v) or "all queues"
        if not yes and not typer.confirm(f"replay {len(ids)} dead letter(s) ({what})?"):
            raise typer.Exit(1)
    results = []
    api = client()
    for dead_id in ids:
        status, body = api.request(
            "POST", f"/dead-letters/{dead_id}/replay", params={"force": str(force).lower()}, ok=(202, 409)
        )
        results.append(body)
        if status == 409:
            err.print(f"{dead_id}: {body['error']['message']}")
            continue
        if not as_json:
            new = (body.get("job") or {}).get("job_id")
            target = f"new job {new}" if new else f"webhook delivery {body.get('delivery_id')} sent again"
            console.print(f"{dead_id}: replayed as {target}")
    if as_json:
        print_json(results)
    elif len(ids) > 1:
        err.print(f"replayed {len(ids)} dead letter(s)")
