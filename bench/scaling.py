"""Scaling within a host at GPU speed: 1 -> 2 API processes and 1 -> 2 consumers (Celery workers) on `sim-h100`,
with the CPU each component spends per request, in one run.

    python -m bench.scaling [--seconds 15] [--clients 64] [--configs 1x1,2x1,1x2,2x2]

A config `AxW` is A API processes (AETHERCORE_WORKERS) and W Celery worker processes on the cpu queue (each
with its own model process: the simulated device costs no CPU, so a second copy measures the consumer, not the
model). Load: wrk (Debian's `wrk`; its C client costs ~0.05 ms of CPU per request) with C keep-alive clients
POSTing `/serve?wait=30` for `sim-h100`, closed loop. Per config: requests/s, p50/p99, and CPU milliseconds
per request per component (API processes, consumers, model processes, Redis), read from /proc over the
measured window. docs/CAPACITY.md projects a GPU host from these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from http.client import HTTPConnection

from bench import procstat
from bench.processes import AUTH, BENCH_KEY, RedisServer
from bench.processes import api as bench_api
from bench.processes import worker as bench_worker

MODEL = "sim-h100"
TEXT = "The quick brown fox jumps over the lazy dog"
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def _wrk(port: int, clients: int, seconds: float) -> dict[str, float]:
    body = json.dumps({"model_id": MODEL, "inputs": {"text": TEXT}})
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % (body, BENCH_KEY))
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t2",
                f"-c{clients}",
                f"-d{seconds:g}s",
                "--latency",
                "-s",
                script.name,
                f"http://127.0.0.1:{port}/serve?wait=30",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)

    def ms(text: str) -> float:
        found = re.match(r"([\d.]+)(us|ms|s|m)$", text)
        if found is None:
            raise RuntimeError(f"unexpected wrk latency {text!r} in:\n{out}")
        value, unit = found.groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    return {
        "requests": requests,
        "errors": errors,
        # Anchored to wrk's "Latency Distribution" lines: "Req/Sec ... 77.50%" ends in "50%" too.
        "p50": ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1)),
        "p99": ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1)),
    }


def _cpu(groups: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(procstat.cpu_seconds(p) for p in pids) for name, pids in groups.items()}


def run_config(redis: RedisServer, db: int, apis: int, consumers: int, clients: int, seconds: float) -> dict:
    env = {"AETHERCORE_AUTH": "true", "AETHERCORE_RATE_LIMIT": "600000/minute", "AETHERCORE_WORKERS": str(apis)}
    url = redis.url(db)
    workers = [bench_worker(url, f"scale-worker-{i}", "cpu", **env).start() for i in range(consumers)]
    api = bench_api(url, "scale-api", **env).start()
    try:
        conn = HTTPConnection("127.0.0.1", api.port, timeout=120)
        conn.request("POST", f"/models/{MODEL}/load?wait=60", headers=AUTH)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
        _wrk(api.port, clients, 4)  # warm-up: every API process, thread and connection made
        groups = {
            "API processes": procstat.tree(api.proc.pid),
            "consumers": [w.proc.pid for w in workers],
            "model processes": [p for w in workers for p in procstat.tree(w.proc.pid) if p != w.proc.pid],
            "Redis": [redis.proc.pid],
        }
        before, began = _cpu(groups), time.monotonic()
        load = _wrk(api.port, clients, seconds)
        elapsed = time.monotonic() - began
        after = _cpu(groups)
    finally:
        api.stop()
        for worker in workers:
            worker.stop()
    n = max(1, load["requests"])
    cpu_ms = {name: 1000 * (after[name] - before[name]) / n for name in groups}
    return {
        "config": f"{apis}x{consumers}",
        "apis": apis,
        "consumers": consumers,
        "rps": load["requests"] / elapsed,
        "p50": load["p50"],
        "p99": load["p99"],
        "errors": load["errors"],
        "cpu_ms": cpu_ms,
        "cores": sum(after[name] - before[name] for name in groups) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--configs", default="1x1,2x1,1x2,2x2", help="APIsxCONSUMERS, comma-separated")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed (apt-get install wrk)")
    redis = RedisServer().start()
    rows = []
    try:
        for db, config in enumerate(args.configs.split(","), start=1):
            apis, consumers = (int(x) for x in config.split("x"))
            rows.append(run_config(redis, db, apis, consumers, args.clients, args.seconds))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        redis.cleanup()
    names = list(rows[0]["cpu_ms"])
    print(f"\n### Scaling at GPU speed (`{MODEL}`, {args.clients} clients, wrk, {os.cpu_count()} cores)\n")
    print(
        "| APIs x consumers | req/s | p50 ms | p99 ms | errors | "
        + " | ".join(f"{n} ms/req" for n in names)
        + " | total ms/req | cores busy |"
    )
    print("|---|" + "---:|" * (6 + len(names)))
    base = rows[0]["rps"]
    for r in rows:
        cpu = " | ".join(f"{r['cpu_ms'][n]:.3f}" for n in names)
        print(
            f"| {r['config']} | {r['rps']:.1f} ({r['rps'] / base:.2f}x) | {r['p50']:.1f} | {r['p99']:.1f} | "
            f"{r['errors']} | {cpu} | {sum(r['cpu_ms'].values()):.3f} | {r['cores']:.2f} |"
        )


if __name__ == "__main__":
    main()
