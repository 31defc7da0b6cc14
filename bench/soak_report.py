"""The soak benchmark's (bench/soak.py) report: the deployment's processes and their RSS, the samples' columns, the
progress line, the verdict (errors, RSS growth per process after warm-up, Redis keys and bytes per retained job) and
the files it writes (CSV, chart, verdict line)."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from bench.soak import Soak

# Which processes belong to the deployment, by a fragment of their command line.
ROLES = (
    ("api", "manage.py api"),
    ("worker", "manage.py worker"),
    ("model", "workers.model_host"),
    ("flower", "manage.py flower"),
    ("redis", "redis-server"),
)

COLUMNS = [
    "t_s",
    "requests_per_s",
    "errors",
    "p50_ms",
    "p99_ms",
    "open_streams",
    "redis_used_bytes",
    "redis_keys",
    "rss_api",
    "rss_worker",
    "rss_model",
    "rss_flower",
    "rss_redis",
]


def verdict_of(
    rows: list[dict[str, Any]],
    soak: Soak,
    keys_start: int,
    memory_start: int,
    warmup_fraction: float,
    result_ttl: int,
    rate: float,
) -> dict[str, Any]:
    hours = rows[-1]["t_s"] / 3600 if rows else 0
    after = rows[int(len(rows) * warmup_fraction) :] or rows
    growth: dict[str, dict[str, float]] = {}
    for role, _fragment in ROLES:
        column = f"rss_{role}"
        if not after or not after[0][column]:
            continue
        window = max(1, len(after) // 5)  # means of the first and last fifth after warm-up: noise-tolerant
        first = statistics.mean(r[column] for r in after[:window])
        last = statistics.mean(r[column] for r in after[-window:])
        span_h = max(1e-9, (after[-1]["t_s"] - after[0]["t_s"]) / 3600)
        growth[role] = {"percent": 100 * (last - first) / first, "mb_per_hour": (last - first) / 2**20 / span_h}
    p99 = [r["p99_ms"] for r in after if r["p99_ms"] is not None]
    keys_end = rows[-1]["redis_keys"] if rows else keys_start
    memory_end = rows[-1]["redis_used_bytes"] if rows else memory_start
    # At steady state Redis holds about rate x result_ttl jobs' keys (one or two each).
    retained = min(rows[-1]["t_s"], result_ttl) * rate if rows else 0
    per_job = (memory_end - memory_start) / retained if retained else 0.0
    errors = sum(soak.total_errors.values())
    worst = max(growth.items(), key=lambda kv: kv[1]["percent"], default=("-", {"percent": 0.0}))
    line = (
        f"verdict: {soak.total_requests} requests ({soak.cycles} load/unload cycles), {errors} errors"
        f"{' (' + ', '.join(f'{k} {n}' for k, n in soak.total_errors.most_common()) + ')' if errors else ''}; "
        f"p99 {min(p99, default=0):.0f}–{max(p99, default=0):.0f} ms after warm-up; RSS growth after warm-up "
        + ", ".join(f"{role} {g['percent']:+.1f} % ({g['mb_per_hour']:+.1f} MB/h)" for role, g in growth.items())
        + f"; Redis keys {keys_start} -> {keys_end}, {per_job / 1024:.1f} KB per retained job; "
        f"{'PASS' if errors == 0 and worst[1]['percent'] < 5 else 'FAIL'}"
    )
    return {
        "line": line,
        "requests": soak.total_requests,
        "errors": dict(soak.total_errors),
        "rss_growth": growth,
        "keys_start": keys_start,
        "keys_end": keys_end,
        "bytes_per_job": per_job,
        "hours": hours,
        "p99_ms": (min(p99, default=0), max(p99, default=0)),
    }


def write_report(out: Path, rows: list[dict[str, Any]], verdict: dict[str, Any]) -> None:
    with open(out / "soak.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "verdict.txt").write_text(verdict["line"] + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    axes[0].plot(t, [r["requests_per_s"] for r in rows])
    axes[0].set_ylabel("requests/s")
    axes[1].plot(t, [r["p99_ms"] or 0 for r in rows], label="p99")
    axes[1].plot(t, [r["p50_ms"] or 0 for r in rows], label="p50")
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend()
    for role, _fragment in ROLES:
        values = [r[f"rss_{role}"] / 2**20 for r in rows]
        if any(values):
            axes[2].plot(t, values, label=role)
    axes[2].set_ylabel("RSS (MiB)")
    axes[2].legend()
    axes[3].plot(t, [r["redis_used_bytes"] / 2**20 for r in rows])
    axes[3].set_ylabel("Redis used memory (MiB)")
    axes[3].set_xlabel("minutes")
    fig.suptitle(verdict["line"][:120], fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=90)
    plt.close(fig)


def deployment_rss() -> dict[str, int]:
    """RSS (bytes) of the deployment's processes, summed per role (`model` is every model process)."""
    rss: dict[str, int] = {}
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        for role, fragment in ROLES:
            if fragment in cmdline and proc.info.get("memory_info") is not None:
                rss[role] = rss.get(role, 0) + proc.info["memory_info"].rss
                break
    return rss


def progress_bar(enabled: bool, duration: float) -> Callable[[dict[str, Any] | None], None]:
    """The live progress line (rich) each sample updates; None ends it. A no-op unless `enabled`."""
    if not enabled:
        return lambda row: None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("soak"), BarColumn(), TextColumn("{task.fields[status]}"), TimeRemainingColumn())
    task = progress.add_task("soak", total=duration, status="starting")
    progress.start()

    def update(row: dict[str, Any] | None) -> None:
        if row is None:
            progress.stop()
            return
        progress.update(
            task,
            completed=row["t_s"],
            status=(
                f"{row['requests_per_s']:.0f} req/s, p99 {row['p99_ms']} ms, errors {row['errors']}, "
                f"redis {row['redis_used_bytes'] / 2**20:.0f} MiB / {row['redis_keys']} keys, "
                f"RSS {sum(v for k, v in row.items() if k.startswith('rss_')) / 2**20:.0f} MiB"
            ),
        )

    return update
