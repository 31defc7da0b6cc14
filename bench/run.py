"""AetherCore benchmark: the in-process limit of `minilm` against end-to-end serving, in one run.

    .venv/bin/python -m bench              # prints the table and the ratios
    .venv/bin/python -m bench --write      # also writes bench/RESULTS.md

Starts its own redis-server, worker and API (gunicorn) on spare ports; nothing else needs to run.
Everything is measured on this machine in this run, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

from bench import procstat  # noqa: E402
from bench.corpus import corpus  # noqa: E402
from bench.in_process import in_process_stream, in_process_throughput, load_runtime, single_forward_ms, thread_effect
from bench.processes import AUTH, RedisServer  # noqa: E402
from bench.processes import api as bench_api
from bench.processes import worker as bench_worker
from bench.report import Report  # noqa: E402
from cli.supervise import Api, Worker  # noqa: E402
from workers.device import rss_bytes_of  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = os.environ.get("BENCH_MODEL", "minilm")


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    clients: int
    mode: str
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per component over the window

    def cpu_ms_per_request(self, component: str) -> float:
        return 1000 * self.cpu_s.get(component, 0.0) / self.requests if self.requests else float("nan")

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")


def _one_request(conn: HTTPConnection, mode: str, text: str) -> bool:
    body = json.dumps({"model_id": MODEL, "inputs": {"text": text}})
    headers = {"Content-Type": "application/json", **AUTH}
    if mode == "wait":
        conn.request("POST", "/serve?wait=30", body, headers)
        response = conn.getresponse()
        data = response.read()
        return response.status == 200 and b'"succeeded"' in data
    conn.request("POST", "/serve", body, headers)
    response = conn.getresponse()
    job = json.loads(response.read())
    if response.status != 202:
        return False
    conn.request("GET", f"/jobs/{job['job_id']}?wait=30", headers=AUTH)
    response = conn.getresponse()
    data = response.read()
    return response.status == 200 and b'"succeeded"' in data


class Components:
    """The processes of a running system, grouped the way the CPU accounting reports them."""

    def __init__(self, api: Api, worker: Worker, redis: RedisServer) -> None:
        self.api, self.worker, self.redis = api, worker, redis

    def pids(self) -> dict[str, list[int]]:
        worker = self.worker.proc.pid
        return {
            "API processes": procstat.tree(self.api.proc.pid),
            "Celery worker process": [worker],
            "model processes": [p for p in procstat.tree(worker) if p != worker],
            "Redis": [self.redis.proc.pid],
        }

    def cpu(self) -> dict[str, float]:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        totals = {name: sum(procstat.cpu_seconds(p) for p in pids) for name, pids in self.pids().items()}
        totals["load generator (this process)"] = usage.ru_utime + usage.ru_stime
        return totals

    def rss_bytes(self) -> dict[str, int]:
        return {name: sum(rss_bytes_of(p) for p in pids) for name, pids in self.pids().items()}


def closed_loop(
    port: int,
    texts: list[str],
    clients: int,
    mode: str,
    seconds: float,
    warmup: float = 1.5,
    components: Components | None = None,
) -> LoadResult:
    result = LoadResult(clients, mode)
    cpu_at: dict[str, dict[str, float]] = {}

    def sample(label: str) -> None:
        if components is not None:
            cpu_at[label] = components.cpu()

    lock = threading.Lock()
    start_at = time.monotonic() + warmup
    stop_at = start_at + seconds

    def client(index: int) -> None:
        conn = HTTPConnection("127.0.0.1", port, timeout=60)
        i = index * 997
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            text = texts[i % len(texts)]
            i += 1
            began = time.perf_counter()
            try:
                ok = _one_request(conn, mode, text)
            except Exception:
                ok = False
                conn.close()
                conn = HTTPConnection("127.0.0.1", port, timeout=60)
            elapsed = (time.perf_counter() - began) * 1000
            if time.monotonic() <= stop_at and now >= start_at:
                with lock:
                    if ok:
                        result.requests += 1
                        result.latencies_ms.append(elapsed)
                    else:
                        result.errors += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    timers = [
        threading.Timer(max(0.0, start_at - time.monotonic()), sample, ("start",)),
        threading.Timer(max(0.0, stop_at - time.monotonic()), sample, ("stop",)),
    ]
    for timer in timers:
        timer.start()
    for thread in threads:
        thread.join()
    for timer in timers:
        timer.join()
    result.seconds = seconds
    if "start" in cpu_at and "stop" in cpu_at:
        result.cpu_s = {k: cpu_at["stop"][k] - cpu_at["start"].get(k, 0.0) for k in cpu_at["stop"]}
    return result


def ws_stream(base: str, tokens: int, runs: int = 5) -> tuple[float, float]:
    import simple_websocket

    url = base.replace("http://", "ws://") + "/serve/stream"
    ttfc, rates = [], []
    for _ in range(runs + 1):
        ws = simple_websocket.Client.connect(url, headers=AUTH)
        started = time.perf_counter()
        ws.send(
            json.dumps(
                {"model_id": "tiny-gpt2", "inputs": {"text": "Tell me a story"}, "parameters": {"max_length": tokens}}
            )
        )
        stamps = []
        while True:
            message = json.loads(ws.receive(timeout=60))
            if message["type"] == "chunk":
                stamps.append(time.perf_counter())
            elif message["type"] in {"done", "error"}:
                break
        try:
            ws.close()
        except Exception:
            pass
        ttfc.append((stamps[0] - started) * 1000)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(ttfc[1:]), statistics.median(rates[1:])


def start_system(
    redis: RedisServer, db: int, models_file: str | None = None, device: str = "cpu"
) -> tuple[Worker, Api]:
    """One worker (with its model processes) and one API (gunicorn), configured as `manage.py up` runs them."""
    # As deployed by default: INFO logs, authentication on, the per-caller rate limit on (high enough not to bite).
    env = {
        "AETHERCORE_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "INFO"),
        "AETHERCORE_AUTH": "true",
        "AETHERCORE_RATE_LIMIT": "60000/minute",
    }
    if models_file:
        env["AETHERCORE_MODELS_FILE"] = models_file
    worker = bench_worker(redis.url(db), "bench-worker", device, **env).start()
    api = bench_api(redis.url(db), "bench-api", **env).start()
    conn = HTTPConnection("127.0.0.1", api.port, timeout=120)
    for model_id in (MODEL, "tiny-gpt2"):
        conn.request("POST", f"/models/{model_id}/load?wait=60", headers=AUTH)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
    return worker, api


# ---------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per end-to-end run")
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.md")
    args = parser.parse_args()

    texts = corpus(3000)
    say = Report()

    say(
        f"# AetherCore benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, model `{MODEL}`, {len(texts)}-sentence corpus)"
    )
    say()
    runtime = load_runtime(MODEL)
    inproc = {
        "batch 1": in_process_throughput(runtime, texts[:300], 1),
        "batch 8": in_process_throughput(runtime, texts[:960], 8),
        "batch 32 (arrival order)": in_process_throughput(runtime, texts[:1920], 32),
        "batch 32 (sorted by length)": in_process_throughput(runtime, texts[:1920], 32, sort=True),
    }
    single_ms = single_forward_ms(runtime, texts[:200])
    threads = thread_effect(runtime, texts[:200])
    del runtime

    say("## In-process limit (the model's own forward pass, this process)")
    say()
    say("| run | sentences/s |")
    say("| --- | ---: |")
    for label, value in inproc.items():
        say(f"| {label} | {value:.1f} |")
    say(f"| single forward, median latency | {single_ms:.2f} ms |")
    say()
    say("Batch-1 forward passes by thread (torch's intra-op threads are a per-thread setting):")
    say()
    say("| thread | sentences/s |")
    say("| --- | ---: |")
    for label, value in threads.items():
        say(f"| {label} | {value:.1f} |")
    say()

    redis = RedisServer().start()
    try:
        worker, api = start_system(redis, 0)
        components = Components(api, worker, redis)
        runs: list[LoadResult] = []
        try:
            for mode in ("wait", "poll"):
                for clients in (1, 8, 32):
                    runs.append(closed_loop(api.port, texts, clients, mode, args.seconds, components=components))
            resident_rss = components.rss_bytes()
            stream_e2e = ws_stream(api.base, 64)
        finally:
            api.stop()
            worker.stop()

        tmp = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        document = yaml.safe_load((ROOT / "config" / "models.yaml").read_text())
        document["models"][MODEL]["max_batch_size"] = 1
        yaml.safe_dump(document, tmp)
        tmp.close()
        worker, api = start_system(redis, 1, tmp.name)
        try:
            off = [closed_loop(api.port, texts, clients, "wait", args.seconds) for clients in (1, 32)]
        finally:
            api.stop()
            worker.stop()
            os.unlink(tmp.name)
    finally:
        redis.cleanup()
    stream_inproc = in_process_stream(64)

    say("## End to end through the API (closed loop, one client = one thread with a keep-alive connection)")
    say()
    say("`wait`: POST /serve?wait=30. `poll`: POST /serve, then GET /jobs/{id}?wait=30.")
    say()
    say("| batching | mode | clients | requests/s | p50 ms | p99 ms | errors |")
    say("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, group in (("on", runs), ("off (max_batch_size 1)", off)):
        for r in group:
            say(
                f"| {label} | {r.mode} | {r.clients} | {r.throughput:.1f} | {r.pct(0.5):.1f} | {r.pct(0.99):.1f} "
                f"| {r.errors} |"
            )
    say()
    say("## Where the CPU goes (CPU milliseconds per request, `wait` mode, this run)")
    say()
    names = list(runs[0].cpu_s) if runs and runs[0].cpu_s else []
    say("| clients | " + " | ".join(names) + " | server total |")
    say("| ---: | " + " | ".join("---:" for _ in names) + " | ---: |")
    for r in (r for r in runs if r.mode == "wait"):
        server = sum(r.cpu_ms_per_request(n) for n in names if not n.startswith("load generator"))
        say(f"| {r.clients} | " + " | ".join(f"{r.cpu_ms_per_request(n):.2f}" for n in names) + f" | {server:.2f} |")
    say()
    say(
        "Resident memory with `minilm` and `tiny-gpt2` loaded (RSS, MB): "
        + ", ".join(f"{name} {value / 1e6:.0f}" for name, value in resident_rss.items())
        + f"; total {sum(resident_rss.values()) / 1e6:.0f}."
    )
    say()
    say("## Streaming (`tiny-gpt2`, 64 new tokens, median of 5)")
    say()
    say("| path | time to first chunk ms | chunks/s |")
    say("| --- | ---: | ---: |")
    say(f"| in-process generate() | {stream_inproc[0]:.1f} | {stream_inproc[1]:.1f} |")
    say(f"| WebSocket /serve/stream | {stream_e2e[0]:.1f} | {stream_e2e[1]:.1f} |")
    say()

    on32 = next(r for r in runs if r.mode == "wait" and r.clients == 32)
    on1 = next(r for r in runs if r.mode == "wait" and r.clients == 1)
    off32 = off[1]
    say("## Ratios")
    say()
    say("| ratio | value | target |")
    say("| --- | ---: | --- |")
    say(
        f"| end-to-end at 32 clients ÷ in-process batch 32 (arrival order) | "
        f"{on32.throughput / inproc['batch 32 (arrival order)']:.2f} | ≥ 0.8 |"
    )
    say(
        f"| batching on ÷ off at 32 clients | {on32.throughput / off32.throughput:.2f} | ≥ 2.5 "
        f"(in-process batch 32 ÷ batch 1 = {inproc['batch 32 (arrival order)'] / inproc['batch 1']:.2f}) |"
    )
    say(f"| end-to-end p50 at 1 client − in-process single forward | {on1.pct(0.5) - single_ms:.1f} ms | ≤ 5 ms |")
    say(f"| WebSocket chunks/s ÷ in-process pieces/s | {stream_e2e[1] / stream_inproc[1]:.2f} | |")
    if args.write:
        # Hand-written analysis below the marker survives a new run; the numbers above it are replaced.
        path = ROOT / "bench" / "RESULTS.md"
        marker = "<!-- analysis: kept across runs -->"
        kept = path.read_text().split(marker, 1)[1] if path.exists() and marker in path.read_text() else "\n"
        path.write_text("\n".join(say.lines) + "\n\n" + marker + kept)


if __name__ == "__main__":
    main()
