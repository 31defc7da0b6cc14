"""Crash storm: workers SIGKILLed one after another under load; nothing may be lost or wrongly failed.

    python -m bench.storm [--jobs 1600] [--clients 8] [--workers 2] [--kill-every 1.5] [--kills 40]
                          [--model minilm] [--poison]

Its own redis-server (spare port), one API and `--workers` CPU workers. `--clients` threads submit
`--jobs` single-sentence jobs between them (POST /serve, then GET /jobs/{id}?wait until it ends) while a
killer SIGKILLs the oldest live worker process every `--kill-every` s (`--kills` times) and starts a
replacement at once, as an orchestrator would. Workers run with a short heartbeat TTL, so a dead worker's
jobs are taken over by the reaper (workers/reaper.py) within seconds; the broker's visibility timeout
is left long (`--visibility-timeout`, default 300 s) so that it cannot be what saves them.

With `--poison`, one more job is a stand-in for an input that takes its worker down (a long tiny-gpt2
generation): whenever it is in a forward pass, the killer SIGKILLs the worker running it. It must end as
`poison_job` and nothing else may.

Reports submitted / succeeded / failed by error code / never ended (still queued or running
`--grace` s after the last kill), and how many jobs have more than one `done` event.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.client import HTTPConnection

import orjson
import redis

from bench.processes import RedisServer
from bench.processes import api as bench_api
from bench.processes import worker as bench_worker
from bench.report import Report
from cli.supervise import Worker
from tasks.names import job_events_key, job_key
from tasks.states import SUCCEEDED, TERMINAL

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A model server keeps models resident in memory.",
    "Redis streams carry every chunk to the client.",
    "Workers die; the jobs they held must not.",
    "Batching turns many small requests into one forward pass.",
    "Nothing may be lost in a storm.",
]
# The stand-in for an input that takes its worker down: a generation long enough to be seen in the model.
POISON = {"model_id": "tiny-gpt2", "inputs": {"text": "poison"}, "parameters": {"max_length": 256}}


@dataclass
class StormResult:
    submitted: int = 0
    outcomes: Counter = field(default_factory=Counter)  # "succeeded" | "failed:<code>" | "never ended:<status>"
    kills: int = 0
    poison_kills: int = 0  # workers the poison job took down
    client_errors: Counter = field(default_factory=Counter)  # what the clients saw go wrong (a refused POST...)
    duplicate_done_events: int = 0
    poison: str | None = None  # the poison job's outcome, if there was one
    seconds: float = 0.0

    @property
    def never_ended(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k.startswith("never ended"))

    @property
    def failed(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k.startswith("failed"))

    def lines(self) -> list[str]:
        by_outcome = ", ".join(f"{k} {n}" for k, n in sorted(self.outcomes.items()))
        lines = [
            f"submitted {self.submitted} jobs; {self.kills} workers SIGKILLed; {self.seconds:.0f} s",
            f"outcomes: {by_outcome}",
            f"succeeded {self.outcomes['succeeded']} / failed {self.failed} / never ended {self.never_ended}; "
            f"jobs with more than one `done` event: {self.duplicate_done_events}",
        ]
        if self.client_errors:
            lines.append("client errors: " + ", ".join(f"{k} {n}" for k, n in self.client_errors.most_common()))
        if self.poison is not None:
            lines.append(f"the poison job: {self.poison} (it took down {self.poison_kills} workers)")
        return lines


class Storm:
    def __init__(
        self,
        *,
        jobs: int,
        clients: int,
        workers: int,
        kill_every: float,
        kills: int,
        model: str,
        poison: bool,
        grace: float,
        visibility_timeout: int,
        worker_ttl: int = 3,
        say=print,
    ) -> None:
        self.jobs, self.clients, self.n_workers = jobs, clients, workers
        self.kill_every, self.kills, self.model = kill_every, kills, model
        self.with_poison, self.grace = poison, grace
        self.say = say
        self.env = {
            "AETHERCORE_VISIBILITY_TIMEOUT": str(visibility_timeout),
            "AETHERCORE_WORKER_TTL": str(worker_ttl),
            "AETHERCORE_HEARTBEAT_INTERVAL": "0.5",
            "AETHERCORE_LOG_LEVEL": "WARNING",
        }
        self.workers: list[Worker] = []
        self.job_ids: list[str] = []
        self._lock = threading.Lock()
        self.storming = threading.Event()
        self.closing = threading.Event()  # the grace time is over: clients submit nothing more

    # -- processes ---------------------------------------------------------------------------
    def _start_worker(self, wait: bool) -> None:
        worker = bench_worker(self.url, "storm-worker", **self.env).start(wait=wait)
        self.workers.append(worker)

    def _live(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None]

    def _kill(self, worker: Worker) -> None:
        # The worker process only, as the OOM killer or a node failure would: its model processes see their
        # pipe close and exit on their own.
        try:
            os.kill(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait(10)
        except ProcessLookupError:
            pass

    # -- load ----------------------------------------------------------------------------------
    def _client(self, index: int, count: int, port: int) -> None:
        for n in range(count):
            if self.closing.is_set():
                return
            try:
                self._one(index + n, port)
            except Exception as exc:  # counted and reported; the client goes on with its next job
                with self._lock:
                    self.result.client_errors[str(exc)[:120]] += 1

    def _one(self, n: int, port: int) -> None:
        conn = HTTPConnection("127.0.0.1", port, timeout=60)
        body = orjson.dumps({"model_id": self.model, "inputs": {"text": SENTENCES[n % len(SENTENCES)]}})
        conn.request("POST", "/serve", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        job = orjson.loads(response.read())
        if response.status != 202:
            raise RuntimeError(f"submission refused: {response.status} {job}")
        with self._lock:
            self.job_ids.append(job["job_id"])
        # Wait for it (as a submit-and-poll client would), so the load stays at `clients` jobs in flight.
        status = job["status"]
        while status not in TERMINAL and self.storming.is_set():
            conn.request("GET", f"/jobs/{job['job_id']}?wait=5")
            status = orjson.loads(conn.getresponse().read())["status"]

    def _killer(self, poison_id: str | None) -> None:
        """`kills` SIGKILLs every `kill_every` s; and, as long as the poison job has not ended, its worker's
        death whenever it is in a forward pass (those deaths are its doing, not the storm's: not counted)."""
        r = redis.Redis.from_url(self.url, decode_responses=True)
        next_kill = time.monotonic() + self.kill_every
        done = 0
        poison_open = poison_id is not None
        while self.storming.is_set() and (done < self.kills or poison_open):
            if poison_open:
                job = r.hgetall(job_key(poison_id))
                poison_open = job.get("status") not in TERMINAL
                if job.get("status") == "running" and job.get("pass"):
                    victim = next((w for w in self._live() if w.name == job.get("worker")), None)
                    if victim is not None:
                        self._kill(victim)
                        self._start_worker(wait=False)
                        self.result.poison_kills += 1
            if done < self.kills and time.monotonic() >= next_kill:
                live = self._live()
                if live:
                    self._kill(live[0])
                    self._start_worker(wait=False)
                    done += 1
                    self.result.kills += 1
                next_kill += self.kill_every
            time.sleep(0.05)

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> StormResult:
        self.result = StormResult()
        redis_server = RedisServer().start()
        self.url = redis_server.url(0)
        api = bench_api(
            self.url, "storm-api", AETHERCORE_LOG_LEVEL="WARNING", AETHERCORE_AUTH="false", AETHERCORE_RATE_LIMIT=""
        )
        try:
            api.start()
            for _ in range(self.n_workers):
                self._start_worker(wait=True)
            conn = HTTPConnection("127.0.0.1", api.port, timeout=120)
            for model in (self.model, *((POISON["model_id"],) if self.with_poison else ())):
                conn.request("POST", f"/models/{model}/load?wait=120")
                response = conn.getresponse()
                if response.status != 200:
                    raise RuntimeError(f"cannot load {model}: {response.read()!r}")
                response.read()
            started = time.monotonic()
            self.storming.set()
            poison_id = None
            if self.with_poison:
                conn.request("POST", "/serve", body=orjson.dumps(POISON), headers={"Content-Type": "application/json"})
                poison_id = orjson.loads(conn.getresponse().read())["job_id"]
            share = [
                self.jobs // self.clients + (1 if i < self.jobs % self.clients else 0) for i in range(self.clients)
            ]
            threads = [
                threading.Thread(target=self._client, args=(i, n, api.port), daemon=True) for i, n in enumerate(share)
            ]
            killer = threading.Thread(target=self._killer, args=(poison_id,), daemon=True)
            for thread in (*threads, killer):
                thread.start()
            killer.join()
            self.say(
                f"storm over after {time.monotonic() - started:.0f} s ({self.result.kills} kills); "
                f"waiting up to {self.grace:.0f} s for the jobs to end"
            )
            deadline = time.monotonic() + self.grace
            r = redis.Redis.from_url(self.url, decode_responses=True)
            ids = lambda: list(self.job_ids) + ([poison_id] if poison_id else [])  # noqa: E731
            while time.monotonic() < deadline:
                pipe = r.pipeline(transaction=False)
                for job_id in ids():
                    pipe.hget(job_key(job_id), "status")
                open_jobs = sum(1 for s in pipe.execute() if s not in TERMINAL)
                if open_jobs == 0 and all(not t.is_alive() for t in threads):
                    break
                time.sleep(0.5)
            self.closing.set()
            self.storming.clear()
            self.result.seconds = time.monotonic() - started
            self._tally(r, ids(), poison_id)
            return self.result
        finally:
            self.storming.clear()
            for worker in self.workers:
                worker.stop()
            api.stop()
            redis_server.cleanup()

    def _tally(self, r: redis.Redis, job_ids: list[str], poison_id: str | None) -> None:
        for job_id in job_ids:
            job = r.hgetall(job_key(job_id))
            status = job.get("status", "missing")
            if status == SUCCEEDED:
                outcome = "succeeded"
            elif status in TERMINAL:
                outcome = f"{status}:{orjson.loads(job.get('error') or '{}').get('code')}"
            else:
                outcome = f"never ended:{status}"
            if status in TERMINAL:
                dones = sum(1 for _id, e in r.xrange(job_events_key(job_id)) if e.get("type") == "done")
                self.result.duplicate_done_events += dones > 1  # 0 when nobody followed it (no stream)
            if job_id == poison_id:
                self.result.poison = outcome
                continue
            self.result.submitted += 1
            self.result.outcomes[outcome] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1600)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=1.5)
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--poison", action="store_true")
    parser.add_argument("--grace", type=float, default=120.0)
    parser.add_argument("--visibility-timeout", type=int, default=300)
    args = parser.parse_args()
    say = Report()
    storm = Storm(
        jobs=args.jobs,
        clients=args.clients,
        workers=args.workers,
        kill_every=args.kill_every,
        kills=args.kills,
        model=args.model,
        poison=args.poison,
        grace=args.grace,
        visibility_timeout=args.visibility_timeout,
        say=say,
    )
    for line in storm.run().lines():
        say(line)


if __name__ == "__main__":
    main()
