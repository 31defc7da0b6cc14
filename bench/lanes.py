"""Priority lanes under a backlog: interactive `high` callers beside thousands of queued `low` jobs, in one run.

    python -m bench.lanes [--backlog 3000] [--seconds 8] [--model sim-h100]

One worker and one API (as `manage.py up` runs them). Four phases, each measured alone:
1. no backlog: 1, then 8 closed-loop clients POST /serve?wait=30 at `priority: high` (p50/p99);
2. backlog alone: `--backlog` jobs at `priority: low` (POST /serve, 202) from 8 submitting threads, then how fast
   the worker drains them (jobs ended per second, from the first submission to the last end);
3. the same backlog again, and while it drains, 1 and then 8 `high` clients: their p50/p99, and the backlog's
   drain rate meanwhile.
Targets (issue 22): p99 with the backlog within 1.5x of p99 without, and the backlog draining at >= 0.8 of its
rate alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from http.client import HTTPConnection

from bench.processes import AUTH, RedisServer
from bench.processes import api as bench_api
from bench.processes import worker as bench_worker

HEADERS = {"Content-Type": "application/json", **AUTH}


def _post(conn: HTTPConnection, path: str, body: dict) -> dict:
    conn.request("POST", path, json.dumps(body), HEADERS)
    response = conn.getresponse()
    return json.loads(response.read())


def interactive(port: int, model: str, clients: int, seconds: float) -> list[float]:
    """Latencies (ms) of `clients` closed-loop `high` callers for `seconds`."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        conn = HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"model_id": model, "inputs": {"text": "an interactive request"}, "priority": "high"}
        while time.monotonic() < stop_at:
            began = time.perf_counter()
            job = _post(conn, "/serve?wait=30", body)
            if job.get("status") == "succeeded":
                with lock:
                    latencies.append((time.perf_counter() - began) * 1000)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def submit_backlog(port: int, model: str, count: int) -> list[str]:
    ids: list[str] = []
    lock = threading.Lock()

    def submitter(n: int) -> None:
        conn = HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"model_id": model, "inputs": {"text": "a line of a batch file"}, "priority": "low"}
        for _ in range(n):
            job = _post(conn, "/serve", body)
            with lock:
                ids.append(job["job_id"])
        conn.close()

    threads = [threading.Thread(target=submitter, args=(count // 8 + (i < count % 8),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ids


def ended(port: int, ids: list[str]) -> tuple[int, float]:
    """How many of `ids` have ended, and the latest finished_at among them (epoch s)."""
    conn = HTTPConnection("127.0.0.1", port, timeout=60)
    done, last = 0, 0.0
    for job_id in ids:
        conn.request("GET", f"/jobs/{job_id}", headers=AUTH)
        job = json.loads(conn.getresponse().read())
        if job.get("finished_at"):
            done += 1
            last = max(last, _epoch(job["finished_at"]))
    conn.close()
    return done, last


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def drain(port: int, model: str, count: int, during=None) -> dict:
    """Submit a backlog, optionally run `during()` meanwhile, wait for it to end; its drain rate (jobs/s)."""
    began = time.time()
    ids = submit_backlog(port, model, count)
    result = during() if during else None
    while True:
        done, last = ended(port, ids[-50:])
        if done == min(50, len(ids)):
            break
        time.sleep(0.5)
    done, last = ended(port, ids)
    return {"rate": done / max(1e-6, last - began), "ended": done, "interactive": result}


def pct(data: list[float], q: float) -> float:
    data = sorted(data)
    return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--model", default="sim-h100")
    args = parser.parse_args()
    redis = RedisServer().start()
    env = {"AETHERCORE_AUTH": "true", "AETHERCORE_RATE_LIMIT": "", "AETHERCORE_MAX_QUEUE_DEPTH": "100000"}
    worker = bench_worker(redis.url(0), "lanes-worker", "cpu", **env).start()
    api = bench_api(redis.url(0), "lanes-api", **env).start()
    rows = []
    try:
        conn = HTTPConnection("127.0.0.1", api.port, timeout=120)
        conn.request("POST", f"/models/{args.model}/load?wait=60", headers=AUTH)
        assert conn.getresponse().status == 200
        interactive(api.port, args.model, 8, 2)  # warm-up
        quiet = {n: interactive(api.port, args.model, n, args.seconds) for n in (1, 8)}
        alone = drain(api.port, args.model, args.backlog)
        busy = drain(
            api.port,
            args.model,
            args.backlog,
            lambda: {n: interactive(api.port, args.model, n, args.seconds / 2) for n in (1, 8)},
        )
        for n in (1, 8):
            q, b = quiet[n], busy["interactive"][n]
            rows.append((n, pct(q, 0.5), pct(q, 0.99), pct(b, 0.5), pct(b, 0.99), len(b)))
    finally:
        api.stop()
        worker.stop()
        redis.cleanup()
    print(f"\n### Priority lanes under a backlog ({args.model}, {args.backlog} low jobs)\n")
    print("| high clients | p50 ms, no backlog | p99 ms, no backlog | p50 ms, backlog | p99 ms, backlog | p99 ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, qp50, qp99, bp50, bp99, count in rows:
        print(f"| {n} | {qp50:.1f} | {qp99:.1f} | {bp50:.1f} | {bp99:.1f} ({count} requests) | {bp99 / qp99:.2f} |")
    print(
        f"\nBacklog drain: {alone['rate']:.0f} jobs/s alone, {busy['rate']:.0f} jobs/s beside the high clients "
        f"(ratio {busy['rate'] / alone['rate']:.2f}; every backlog job ended: {alone['ended']}, {busy['ended']})"
    )
    print(f"median of the interactive p50s: {statistics.median(r[3] for r in rows):.1f} ms")


if __name__ == "__main__":
    main()
