"""`jobs`: recent jobs, one job, cancelling one; dead letters and their replay."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

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


def _dead_letters(queue: str | None, code: str | None, limit: int, before: float | None = None) -> dict:
    query = {"queue": queue, "code": code, "limit": limit, "before": before}
    params = {k: v for k, v in query.items() if v is not None}
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


# --all-matching replays this many dead letters per listed page, and at most --max in all.
REPLAY_PAGE = 100
# Refusals for load (the owner's rate limit, a full queue, Redis full, no device): the next replays would be refused
# too, so a bulk replay stops at the first instead of pressing on.
LOAD_REFUSALS = (429, 503)


@group.command("replay")
def jobs_replay(
    job_id: str | None = typer.Argument(None, help="The dead letter's job id"),
    all_matching: bool = typer.Option(
        False, "--all-matching", help="Every dead letter matching --queue/--code (asks for confirmation)"
    ),
    queue: str | None = typer.Option(None, "--queue", help="With --all-matching: only this queue"),
    code: str | None = typer.Option(None, "--code", help="With --all-matching: only this reason or error code"),
    most: int = typer.Option(1000, "--max", min=1, help="With --all-matching: replay at most this many"),
    force: bool = typer.Option(False, "--force", help="Replay dead letters already replayed too"),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Submit a dead letter again as its owner: a new job linked by `replay_of` (a failed webhook: its delivery sent
    again). Each replay is checked as the owner's new request (rate limit, queue depth, lane, autoload): --all-matching
    replays in pages, newest first, and stops at the first refusal for load (429/503)."""
    if (job_id is None) == (not all_matching):
        fail("give one dead letter's job id, or --all-matching (with --queue/--code)", 2)
    if job_id is not None:
        return _replay_report([job_id], force, as_json)
    first = [e for e in _dead_letters(queue, code, REPLAY_PAGE)["dead_letters"] if _wanted(e, force)]
    if not first:
        console.print("no dead letter to replay matches")
        return
    what = ", ".join(f"{k}={v}" for k, v in {"queue": queue, "code": code}.items() if v) or "all queues"
    count = f"{len(first)}" if len(first) < REPLAY_PAGE else f"up to {most}"
    if not yes and not typer.confirm(f"replay {count} dead letter(s) ({what})?"):
        raise typer.Exit(1)
    _replay_report(_matching(queue, code, force, most), force, as_json)


def _wanted(entry: dict, force: bool) -> bool:
    return bool(entry.get("replayable")) and (force or not entry.get("replayed_as"))


def _matching(queue: str | None, code: str | None, force: bool, most: int) -> Iterator[str]:
    """The ids to replay, newest first, a page at a time (read as the replays go: nothing is listed in advance)."""
    before, given = None, 0
    while given < most:
        page = _dead_letters(queue, code, REPLAY_PAGE, before)["dead_letters"]
        for entry in page:
            if _wanted(entry, force) and given < most:
                given += 1
                yield entry["job_id"]
        if len(page) < REPLAY_PAGE:
            return
        before = page[-1]["dead_at"]


def _replay_report(ids: Iterable[str], force: bool, as_json: bool) -> None:
    """Replay each; a refusal for load stops the run (exit 3), any other refusal is reported and skipped (exit 1)."""
    results, replayed, api = [], 0, client()
    for dead_id in ids:
        status, body = api.request(
            "POST",
            f"/dead-letters/{dead_id}/replay",
            params={"force": str(force).lower()},
            ok=(202, 403, 404, 409, 422, *LOAD_REFUSALS),
        )
        results.append(body)
        if status in LOAD_REFUSALS:
            err.print(
                f"{dead_id}: refused {status} {body['error']['code']}: {body['error']['message']}\n"
                f"stopped at the first refusal for load after {replayed} replay(s); run it again later"
            )
            if as_json:
                print_json(results)
            raise typer.Exit(3)
        if status != 202:
            err.print(f"{dead_id}: {status} {body['error']['code']}: {body['error']['message']}")
            continue
        replayed += 1
        if not as_json:
            new = (body.get("job") or {}).get("job_id")
            target = f"new job {new}" if new else f"webhook delivery {body.get('delivery_id')} sent again"
            console.print(f"{dead_id}: replayed as {target}")
    if as_json:
        print_json(results)
    elif len(results) > 1:
        err.print(f"replayed {replayed} of {len(results)} dead letter(s)")
    if replayed < len(results):
        raise typer.Exit(1)
