"""Interactive callers beside a batch backlog: three owners' batches through the real /v1/batches API, in one run.

    python -m bench.lanes [--model sim-h100,minilm] [--lines 3000] [--seconds 8]

One worker, one API deployment and one batch driver (as `manage.py up` runs them, default settings: auth on, the
default rate limit and queue bounds, the driver at nice 10), four `user` keys: three batch owners and one
interactive caller. Per model:
1. no backlog: 1, then 8 closed-loop clients POST /serve?wait=30 (the `normal` lane) for `--seconds` each;
2. the backlog alone: each owner uploads a `--lines` JSONL file of /v1/embeddings requests and creates a batch; its
   drain rate (lines answered per second, over a window of 2 x `--seconds` once all three run, or over the whole
   run if it ends sooner), and the forward pass its lines rode in (median size and time, read from the line jobs'
   timings);
3. the same backlog again, and once it drains, 1 and then 8 interactive clients: their p50/p99, their 429s, and the
   backlog's drain rate over the same window (the batches are cancelled after it).
Targets (issue 34): zero interactive 429s; with the backlog, p99 <= the no-backlog p99 plus one forward pass at the
backlog's batch size on a real model (minilm), <= 1.5 x the no-backlog p99 on sim-h100; the backlog draining at
>= 0.8 of its rate alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from http.client import HTTPConnection
from typing import Any

import redis
import requests

from access.keys import KeyStore
from bench.processes import AUTH, RedisServer
from bench.processes import api as bench_api
from bench.processes import batch_driver as bench_batch_driver
from bench.processes import worker as bench_worker

OWNERS = 3
REAL_MODELS = {"minilm"}  # the models whose target is "+ one forward pass" (a simulated device's is 1.5 x)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def pct(data: list[float], q: float) -> float:
    data = sorted(data)
    return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")


def interactive(port: int, key: str, model: str, clients: int, seconds: float) -> tuple[list[float], int, int]:
    """Latencies (ms) of `clients` closed-loop callers for `seconds`, their 429s and their other failures."""
    latencies: list[float] = []
    refused, failed = [0], [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    headers = {"Content-Type": "application/json", **_bearer(key)}
    body = json.dumps({"model_id": model, "inputs": {"text": "an interactive request"}})

    def client() -> None:
        conn = HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < stop_at:
            began = time.perf_counter()
            conn.request("POST", "/serve?wait=30", body, headers)
            response = conn.getresponse()
            job = json.loads(response.read())
            with lock:
                if response.status == 429:
                    refused[0] += 1
                    time.sleep(0.05)
                elif job.get("status") == "succeeded":
                    latencies.append((time.perf_counter() - began) * 1000)
                else:
                    failed[0] += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, refused[0], failed[0]


class Backlog:
    """Three owners' batches of `lines` /v1/embeddings requests each."""

    def __init__(self, base: str, owners: list[str], model: str, lines: int) -> None:
        self.base, self.owners, self.model, self.lines = base, owners, model, lines
        self.ids: list[tuple[str, str]] = []  # (batch id, its owner's key)

    def start(self) -> Backlog:
        text = "".join(
            json.dumps(
                {
                    "custom_id": f"line-{i}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": self.model, "input": f"line {i} of a large batch file"},
                }
            )
            + "\n"
            for i in range(self.lines)
        )
        for key in self.owners:
            file = {"file": ("b.jsonl", text)}
            uploaded = requests.post(
                f"{self.base}/v1/files", headers=_bearer(key), files=file, data={"purpose": "batch"}, timeout=120
            )
            uploaded.raise_for_status()
            body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}
            created = requests.post(f"{self.base}/v1/batches", headers=_bearer(key), json=body, timeout=30)
            created.raise_for_status()
            self.ids.append((created.json()["id"], key))
        return self

    def states(self) -> list[dict[str, Any]]:
        return [requests.get(f"{self.base}/v1/batches/{b}", headers=_bearer(k), timeout=30).json() for b, k in self.ids]

    def answered(self) -> tuple[int, bool, bool]:
        """Lines answered so far, whether every batch runs (in_progress or beyond), whether all ended."""
        states = self.states()
        done = sum(s["request_counts"]["completed"] + s["request_counts"]["failed"] for s in states)
        running = all(s["status"] != "validating" for s in states)
        ended = all(s["status"] in ("completed", "failed", "cancelled", "expired") for s in states)
        return done, running and done > 0, ended

    def wait_running(self) -> None:
        while not self.answered()[1]:
            time.sleep(0.2)

    def rate_over(self, seconds: float, during=None) -> tuple[float, bool, Any]:
        """Lines answered per second over `seconds` (while `during()` runs, if given), whether the backlog outlasted
        the window, and what `during` returned."""
        first, _running, _ended = self.answered()
        began = time.monotonic()
        result = during() if during else time.sleep(seconds)
        last, _running, ended = self.answered()
        return (last - first) / (time.monotonic() - began), not ended, result

    def finish(self) -> None:
        while not self.answered()[2]:
            time.sleep(0.5)

    def cancel(self) -> None:
        for b, k in self.ids:
            requests.post(f"{self.base}/v1/batches/{b}/cancel", headers=_bearer(k), timeout=30)
        self.finish()

    def passes(self, sample: int = 200) -> tuple[float, float]:
        """The forward passes its lines rode in: median size and median time (ms), from `sample` line jobs."""
        sizes, times = [], []
        file_id, key = self.states()[0]["output_file_id"], self.ids[0][1]
        content = requests.get(f"{self.base}/v1/files/{file_id}/content", headers=_bearer(key), timeout=60).text
        for line in content.splitlines()[:sample]:
            job_id = json.loads(line)["response"]["request_id"]
            job = requests.get(f"{self.base}/jobs/{job_id}", headers=AUTH, timeout=10).json()
            timings = (job.get("result") or {}).get("timings") or {}
            if "batch_size" in timings:
                sizes.append(timings["batch_size"])
                times.append(timings["inference_ms"])
        return statistics.median(sizes or [0]), statistics.median(times or [float("nan")])


def run_model(base: str, port: int, model: str, owners: list[str], caller: str, lines: int, seconds: float) -> dict:
    loaded = requests.post(f"{base}/models/{model}/load?wait=120", headers=AUTH, timeout=130).json()
    assert loaded.get("status") == "succeeded", loaded
    interactive(port, caller, model, 8, 2)  # warm-up
    quiet = {n: interactive(port, caller, model, n, seconds) for n in (1, 8)}

    alone = Backlog(base, owners, model, lines).start()
    alone.wait_running()
    alone_rate, outlasted_alone, _ = alone.rate_over(2 * seconds)
    alone.finish()
    pass_size, pass_ms = alone.passes()

    busy = Backlog(base, owners, model, lines).start()
    busy.wait_running()
    busy_rate, outlasted, during = busy.rate_over(
        2 * seconds, lambda: {n: interactive(port, caller, model, n, seconds) for n in (1, 8)}
    )
    busy.cancel()
    return {
        "quiet": quiet,
        "busy": during,
        "alone_rate": alone_rate,
        "busy_rate": busy_rate,
        "outlasted": outlasted and outlasted_alone,
        "pass_size": pass_size,
        "pass_ms": pass_ms,
    }


def report(model: str, lines: int, r: dict) -> None:
    print(f"\n### Interactive /serve?wait beside three owners' batches ({model}, {OWNERS} x {lines} lines)\n")
    print(
        "| clients | p50 ms, no backlog | p99 ms, no backlog | p50 ms, backlog | p99 ms, backlog | p99 ratio | 429s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    refused = 0
    for n in (1, 8):
        (q, q429, _qf), (b, b429, bf) = r["quiet"][n], r["busy"][n]
        refused += q429 + b429
        print(
            f"| {n} | {pct(q, 0.5):.1f} | {pct(q, 0.99):.1f} | {pct(b, 0.5):.1f} | {pct(b, 0.99):.1f} "
            f"({len(b)} requests{f', {bf} failed' if bf else ''}) | {pct(b, 0.99) / pct(q, 0.99):.2f} | {q429 + b429} |"
        )
    ratio = r["busy_rate"] / r["alone_rate"] if r["alone_rate"] else float("nan")
    print(
        f"\nForward pass at the backlog's batch size: {r['pass_size']:g} lines, {r['pass_ms']:.1f} ms (median of the "
        f"line jobs' passes). Backlog drain: {r['alone_rate']:.0f} lines/s alone, {r['busy_rate']:.0f} lines/s beside "
        f"the interactive clients (ratio {ratio:.2f}, target >= 0.8)."
    )
    checks = [f"interactive 429s: {refused} (target 0)"]
    for n in (1, 8):
        q99, b99 = pct(r["quiet"][n][0], 0.99), pct(r["busy"][n][0], 0.99)
        if model in REAL_MODELS:
            bound = q99 + r["pass_ms"]
            checks.append(f"{n} client(s): p99 {b99:.1f} ms vs no-backlog p99 + one pass {bound:.1f} ms")
        else:
            checks.append(f"{n} client(s): p99 {b99 / q99:.2f} x the no-backlog p99 (target <= 1.5)")
    print("Targets: " + "; ".join(checks) + ".")
    if not r["outlasted"]:
        print("(a backlog ended inside its measuring window: its drain rates are short; run with more --lines)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sim-h100", help="comma-separated: e.g. sim-h100,minilm")
    parser.add_argument("--lines", type=int, default=3000, help="lines of each owner's batch (issue 34: 50000)")
    parser.add_argument("--seconds", type=float, default=8.0, help="each interactive measurement")
    args = parser.parse_args()
    server = RedisServer().start()
    client = redis.Redis.from_url(server.url(0), decode_responses=True)
    keys = KeyStore(client)
    owners = [keys.create("user", f"batch owner {n}")[1] for n in range(OWNERS)]
    caller = keys.create("user", "interactive caller")[1]
    env = {"AETHERCORE_AUTH": "true"}
    worker = bench_worker(server.url(0), "lanes-worker", "cpu", **env).start()
    api = bench_api(server.url(0), "lanes-api", **env).start()
    driver = bench_batch_driver(api, "lanes-batches").start()
    try:
        results = {
            model: run_model(api.base, api.port, model, owners, caller, args.lines, args.seconds)
            for model in args.model.split(",")
        }
    finally:
        driver.stop()
        api.stop()
        worker.stop()
        server.cleanup()
    for model, result in results.items():
        report(model, args.lines, result)


if __name__ == "__main__":
    main()
