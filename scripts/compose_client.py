"""scripts/compose_check.py's view of a running compose deployment: its API over HTTP, its containers through
docker and compose, its jobs' events in Redis (read inside the api container). Standard library only; the check
imports it from beside itself (scripts/ is on sys.path when the check runs as a script)."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled", "expired")  # tasks/states.py (this script imports nothing of ours)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A model server keeps models resident in memory.",
    "Workers die; the jobs they held must not.",
    "Batching turns many small requests into one forward pass.",
    "Compose scales the worker service up and down.",
]
# Run inside the api container (`compose exec -T api python -c ...`), job ids on stdin: status, `done` events.
DONE_EVENTS = """
import json, sys
from config.settings import Settings
from tasks.names import job_events_key, job_key
from tasks.redis_client import make_redis
s = Settings.from_env()
r = make_redis(s.redis_url, s.redis_sentinel_master, **s.redis_ssl())
ids = sys.stdin.read().split()
out = {}
for start in range(0, len(ids), 200):
    chunk = ids[start : start + 200]
    pipe = r.pipeline(transaction=False)
    for job_id in chunk:
        pipe.hget(job_key(job_id), "status")
        pipe.xrange(job_events_key(job_id))
    replies = pipe.execute()
    for i, job_id in enumerate(chunk):
        status, events = replies[2 * i], replies[2 * i + 1]
        out[job_id] = [status or "missing", sum(1 for _id, e in events if e.get("type") == "done")]
print(json.dumps(out))
"""


class Deployment:
    """A running compose deployment, as the check reaches it; `fail` and `say` report to the check's output."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.api = args.api.rstrip("/")
        self.headers = {"Authorization": f"Bearer {args.key}"}
        self.compose = shlex.split(args.compose)
        self.failures: list[str] = []
        self.results: dict[str, Any] = {}
        self.known: dict[str, str] = {}
        self.victim = ""

    # -- helpers ---------------------------------------------------------------------------------
    def http(
        self, method: str, url: str, body: Any = None, headers: dict | None = None, timeout: float = 90
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw, kind = response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status, raw, kind = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        except (urllib.error.URLError, OSError) as exc:
            return 0, str(exc)
        return status, json.loads(raw) if "json" in kind and raw else raw.decode(errors="replace")

    def fail(self, message: str) -> None:
        self.failures.append(message)
        print(f"  FAIL: {message}", flush=True)

    def say(self, message: str) -> None:
        print(f"  {message}", flush=True)

    def jobs_total(self) -> int:
        """aethercore_jobs_total of the check's inference jobs (both models, every status), as /metrics adds it up."""
        status, text = self.http("GET", f"{self.api}/metrics", headers=self.headers)
        if status != 200:
            raise RuntimeError(f"GET /metrics -> {status}")
        total = 0.0
        for line in text.splitlines():
            if line.startswith("aethercore_jobs_total{"):
                labels, value = line.rsplit(" ", 1)
                models = (self.args.model, self.args.spike_model)
                if 'kind="inference"' in labels and any(f'model="{m}"' in labels for m in models):
                    total += float(value)
        return int(total)

    def settled_jobs_total(self) -> int:
        """jobs_total once the workers' last counts arrived: unchanged over more than two heartbeats."""
        last, deadline = self.jobs_total(), time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(5)
            now = self.jobs_total()
            if now == last:
                return now
            last = now
        return last

    def worker_containers(self) -> dict[str, str]:
        """Running containers of the worker service: hostname (the short id, which ends worker names) -> name."""
        out = subprocess.run(
            [
                "docker",
                "ps",
                "--filter",
                f"label=com.docker.compose.project={self.args.project}",
                "--filter",
                "label=com.docker.compose.service=worker",
                "--format",
                "{{.ID}} {{.Names}}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        running = dict(zip(out[::2], out[1::2], strict=True))
        self.known.update(running)  # names of containers seen once, for the jobs of those gone since
        return running

    def live_workers(self) -> list[str]:
        status, body = self.http("GET", f"{self.api}/workers", headers=self.headers)
        return sorted(w["name"] for w in body["workers"]) if status == 200 else []

    def container_of(self, worker: str) -> str:
        host = worker.rsplit("@", 1)[-1]
        for cid, name in self.known.items():
            if host.startswith(cid):  # compose reuses the names of removed containers: mark the killed one
                return f"{name} (killed)" if cid == self.victim else name
        return f"?{host}"

    def serve(self, i: int, wait: int | None, generate: bool = False) -> tuple[int, Any]:
        body: dict[str, Any] = {
            "model_id": self.args.model,
            "inputs": {"text": f"{SENTENCES[i % len(SENTENCES)]} ({i})"},
        }
        if generate:  # a job that runs for seconds: the killed worker dies in the middle of some
            body.update(model_id=self.args.spike_model, parameters={"max_length": self.args.spike_tokens})
        return self.http("POST", f"{self.api}/serve" + (f"?wait={wait}" if wait else ""), body, self.headers)

    def done_events(self, ids: list[str]) -> dict[str, list]:
        out = subprocess.run(
            [*self.compose, "exec", "-T", "api", "python", "-c", DONE_EVENTS],
            input="\n".join(ids),
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            self.fail(f"reading the jobs' events in Redis failed: {out.stderr.strip()[-500:]}")
            return {}
        return json.loads(out.stdout.strip().splitlines()[-1])
