"""Soak: the running system driven at a fraction of its measured maximum for a long time; nothing may leak.

    python -m bench.soak [--url http://127.0.0.1:8000] [--minutes 30] [--fraction 0.8] [--sample 10]
                         [--result-ttl 300] [--cycle-every 300] [--out bench/soak]

Against a deployment that is already up (`./scripts/up.sh`; the admin key `manage.py up` wrote, or
AETHERCORE_API_KEY). First it measures the deployment's maximum throughput for the request mix (closed loop,
`--calibrate` s), then offers `--fraction` of it, open loop (requests start on schedule whether or not the
earlier ones finished), for `--minutes`. The mix: 70 % `POST /serve?wait` (minilm, one sentence), 10 %
`/serve/batch` (4 sentences), 10 % submit then poll (`GET /jobs/{id}?wait`), 10 % streamed generations
(tiny-gpt2, 16 tokens, SSE); every request asks for `result_ttl` = `--result-ttl` s, so Redis reaches its
steady state within the run. Every `--cycle-every` s one model (minilm-onnx) is loaded, used and unloaded.

Every `--sample` s it records: requests and errors (by kind) in the interval, p50/p99 latency, RSS of every
process of the deployment (API, workers, model processes, Redis, Flower; found by command line), Redis
memory and key count, open streams. It shows progress (rich), writes a CSV and a PNG chart of throughput,
p99, RSS and Redis memory over time, and ends with a one-line verdict: errors, RSS growth per hour per
process (after the first --warmup-fraction of the run), Redis keys at the end against the start, Redis bytes
per retained job.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPSConnection, RemoteDisconnected
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import orjson
import redis

from bench.soak_report import ROLES, deployment_rss, progress_bar, verdict_of, write_report
from tasks.states import SUCCEEDED, TERMINAL

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A model server keeps models resident in memory.",
    "Redis streams carry every chunk to the client.",
    "Nothing may leak in a long run.",
    "Batching turns many small requests into one forward pass.",
    "The soak runs for half an hour.",
]
MIX = (("serve", 0.7), ("batch", 0.1), ("poll", 0.1), ("stream", 0.1))
CYCLE_MODEL = "minilm-onnx"


class RequestFailed(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Client:
    """One HTTP connection per thread to the API."""

    def __init__(self, url: str, key: str | None) -> None:
        parsed = urlparse(url)
        self.https = parsed.scheme == "https"
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or (443 if self.https else 80)
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self._local = threading.local()

    def _conn(self) -> HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = HTTPSConnection if self.https else HTTPConnection
            conn = self._local.conn = cls(self.host, self.port, timeout=120)
        return conn

    def request(self, method: str, path: str, body: Any = None, raw: bool = False) -> tuple[int, Any]:
        for attempt in (0, 1):
            reused = getattr(self._local, "conn", None) is not None
            conn = self._conn()
            try:
                conn.request(method, path, body=orjson.dumps(body) if body is not None else None, headers=self.headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (OSError, ConnectionError, RemoteDisconnected) as exc:
                conn.close()
                self._local.conn = None
                # A keep-alive connection the server closed while idle (gunicorn's keepalive) fails on its next
                # send: what any pooled HTTP client does is open a new one and send again, once.
                stale = reused and isinstance(exc, (BrokenPipeError, ConnectionResetError, RemoteDisconnected))
                if attempt == 0 and stale:
                    continue
                raise RequestFailed(f"connection: {type(exc).__name__}") from None
        if raw:
            return response.status, data
        try:
            return response.status, orjson.loads(data) if data else None
        except orjson.JSONDecodeError:
            raise RequestFailed(f"non-JSON {response.status}") from None


@dataclass
class Interval:
    requests: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)


class Soak:
    def __init__(self, url: str, key: str | None, redis_url: str, result_ttl: int, say: Callable[[str], None] = print):
        self.client = Client(url, key)
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.result_ttl = result_ttl
        self.say = say
        self._lock = threading.Lock()
        self.interval = Interval()
        self.open_streams = 0
        self.total_requests = 0
        self.total_errors: Counter = Counter()
        self.cycles = 0

    # -- one request of each kind ----------------------------------------------------------------
    def _body(self, n: int) -> dict[str, Any]:
        return {"model_id": "minilm", "inputs": {"text": SENTENCES[n % len(SENTENCES)]}, "result_ttl": self.result_ttl}

    def one(self, kind: str, n: int) -> None:
        if kind == "serve":
            status, job = self.client.request("POST", "/serve?wait=60", self._body(n))
            self._check(status, job, 200)
        elif kind == "batch":
            body = {
                "model_id": "minilm",
                "inputs": [{"text": SENTENCES[(n + i) % len(SENTENCES)]} for i in range(4)],
                "result_ttl": self.result_ttl,
            }
            status, job = self.client.request("POST", "/serve/batch?wait=60", body)
            self._check(status, job, 200)
        elif kind == "poll":
            status, job = self.client.request("POST", "/serve", self._body(n))
            self._check(status, job, 202, terminal=False)
            deadline = time.monotonic() + 60
            while job["status"] not in TERMINAL:
                if time.monotonic() > deadline:
                    raise RequestFailed("poll: not ended in 60 s")
                status, job = self.client.request("GET", f"/jobs/{job['job_id']}?wait=10")
                self._check(status, job, 200, terminal=False)
            self._check(200, job, 200)
        else:
            body = {
                "model_id": "tiny-gpt2",
                "inputs": {"text": SENTENCES[n % len(SENTENCES)]},
                "parameters": {"max_length": 16},
                "result_ttl": self.result_ttl,
            }
            status, job = self.client.request("POST", "/serve", body)
            self._check(status, job, 202, terminal=False)
            with self._lock:
                self.open_streams += 1
            try:
                status, text = self.client.request("GET", f"/jobs/{job['job_id']}/stream", raw=True)
            finally:
                with self._lock:
                    self.open_streams -= 1
            if status != 200 or b"event: done" not in text:
                raise RequestFailed(f"stream: {status}")
            if b"event: chunk" not in text or b'"status": "succeeded"' not in text.replace(b'":"', b'": "'):
                raise RequestFailed("stream: no chunk or not succeeded")

    @staticmethod
    def _check(status: int, job: Any, expected: int, terminal: bool = True) -> None:
        if status != expected:
            code = job.get("error", {}).get("code") if isinstance(job, dict) else None
            raise RequestFailed(f"HTTP {status} {code or ''}".strip())
        if terminal and job.get("status") != SUCCEEDED:
            raise RequestFailed(f"job {job.get('status')}: {(job.get('error') or {}).get('code')}")

    def timed(self, kind: str, n: int) -> None:
        began = time.perf_counter()
        error = None
        try:
            self.one(kind, n)
        except RequestFailed as exc:
            error = f"{kind}: {exc.kind}"
        except Exception as exc:  # a bug in the soak itself still counts, never kills it
            error = f"{kind}: {type(exc).__name__}"
        elapsed = (time.perf_counter() - began) * 1000
        with self._lock:
            self.interval.requests += 1
            self.total_requests += 1
            if error:
                self.interval.errors[error] += 1
                self.total_errors[error] += 1
            else:
                self.interval.latencies_ms.append(elapsed)

    # -- load ---------------------------------------------------------------------------------
    def calibrate(self, seconds: float, clients: int = 16) -> float:
        """Requests/s of the mix with `clients` closed-loop clients."""
        stop = time.monotonic() + seconds
        done = [0]

        def loop(index: int) -> None:
            rng = random.Random(index)
            n = index
            while time.monotonic() < stop:
                self.timed(_pick(rng), n)
                n += clients
                with self._lock:
                    done[0] += 1

        threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.take_interval()  # calibration is not part of the soak's figures
        self.total_requests, self.total_errors = 0, Counter()
        return done[0] / (time.monotonic() - began)

    def take_interval(self) -> Interval:
        with self._lock:
            taken, self.interval = self.interval, Interval()
        return taken

    def cycle_model(self) -> None:
        """Load a model, use it, unload it: the model-process lifecycle must not leak either."""
        began = time.perf_counter()
        error = None
        try:
            status, job = self.client.request("POST", f"/models/{CYCLE_MODEL}/load?wait=60")
            self._check(status, job, 200)
            status, job = self.client.request("POST", "/serve?wait=60", {**self._body(0), "model_id": CYCLE_MODEL})
            self._check(status, job, 200)
            status, job = self.client.request("POST", f"/models/{CYCLE_MODEL}/unload?wait=120")
            self._check(status, job, 200)
        except RequestFailed as exc:
            error = f"load/unload: {exc.kind}"
        with self._lock:  # counted, but a model load's seconds are not a request latency
            self.interval.requests += 1
            self.total_requests += 1
            self.cycles += 1
            if error:
                self.interval.errors[error] += 1
                self.total_errors[error] += 1
        if error:
            self.say(f"load/unload cycle of {CYCLE_MODEL} failed after {time.perf_counter() - began:.1f} s: {error}")


def _pick(rng: random.Random) -> str:
    x, total = rng.random(), 0.0
    for kind, share in MIX:
        total += share
        if x < total:
            return kind
    return MIX[-1][0]


def run(
    url: str,
    key: str | None,
    redis_url: str,
    *,
    minutes: float,
    fraction: float,
    sample_s: float,
    result_ttl: int,
    cycle_every_s: float,
    calibrate_s: float,
    out: Path,
    warmup_fraction: float = 0.2,
    say: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    soak = Soak(url, key, redis_url, result_ttl, say)
    maximum = soak.calibrate(calibrate_s)
    rate = max(0.5, fraction * maximum)
    say(f"maximum {maximum:.1f} req/s for the mix; offering {rate:.1f} req/s ({fraction:.0%}) for {minutes:g} min")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    duration = minutes * 60
    keys_start = soak.redis.dbsize()
    memory_start = int(soak.redis.info("memory")["used_memory"])
    pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="soak")
    stop = threading.Event()

    def offer() -> None:  # open loop: request n starts at n / rate, whatever happened to the others
        rng = random.Random(7)
        began, n = time.monotonic(), 0
        next_cycle = began + cycle_every_s
        while not stop.is_set():
            due = began + n / rate
            if due > time.monotonic():
                stop.wait(due - time.monotonic())
                continue
            pool.submit(soak.timed, _pick(rng), n)
            n += 1
            if time.monotonic() >= next_cycle:
                pool.submit(soak.cycle_model)
                next_cycle += cycle_every_s

    started = time.monotonic()
    offerer = threading.Thread(target=offer, daemon=True)
    offerer.start()
    bar = progress_bar(progress, duration)
    try:
        last = started
        while (elapsed := time.monotonic() - started) < duration:
            time.sleep(max(0.0, min(sample_s, duration - elapsed)))
            now = time.monotonic()
            row = _sample(soak, now - started, now - last)
            last = now
            rows.append(row)
            bar(row)
    finally:
        stop.set()
        offerer.join()
        pool.shutdown(wait=True)
        bar(None)
    verdict = verdict_of(rows, soak, keys_start, memory_start, warmup_fraction, result_ttl, rate)
    write_report(out, rows, verdict)
    say(verdict["line"])
    return verdict


def _sample(soak: Soak, t: float, interval_s: float) -> dict[str, Any]:
    taken = soak.take_interval()
    lat = sorted(taken.latencies_ms)
    info = soak.redis.info("memory")
    rss = deployment_rss()
    return {
        "t_s": round(t, 1),
        "requests_per_s": round(taken.requests / max(interval_s, 1e-6), 2),
        "errors": sum(taken.errors.values()),
        "p50_ms": round(statistics.median(lat), 1) if lat else None,
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None,
        "open_streams": soak.open_streams,
        "redis_used_bytes": int(info["used_memory"]),
        "redis_keys": soak.redis.dbsize(),
        **{f"rss_{role}": rss.get(role, 0) for role, _f in ROLES},
    }


def _default_key() -> str | None:
    if os.environ.get("AETHERCORE_API_KEY"):
        return os.environ["AETHERCORE_API_KEY"]
    from config.settings import Settings

    path = Settings.from_env().admin_key_file
    return path.read_text().strip() if path.exists() else None


def main() -> None:
    from config.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--redis-url", default=Settings.from_env().redis_url)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--fraction", type=float, default=0.8)
    parser.add_argument("--sample", type=float, default=10)
    parser.add_argument("--result-ttl", type=int, default=300)
    parser.add_argument("--cycle-every", type=float, default=300)
    parser.add_argument("--calibrate", type=float, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench/soak"))
    args = parser.parse_args()
    run(
        args.url,
        _default_key(),
        args.redis_url,
        minutes=args.minutes,
        fraction=args.fraction,
        sample_s=args.sample,
        result_ttl=args.result_ttl,
        cycle_every_s=args.cycle_every,
        calibrate_s=args.calibrate,
        out=args.out,
    )


if __name__ == "__main__":
    main()
