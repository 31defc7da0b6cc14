"""Failover storm: the Redis primary killed under load, again and again; nothing acknowledged may be lost.

    python -m bench.failover [--ack 1] [--clients 8] [--streams 32] [--kills 3] [--down-after-ms 3000]

One primary, two replicas and three sentinels (Debian's redis-server, `--sentinel` mode, spare loopback ports);
an API, two CPU workers and the webhook dispatcher on `sentinel://`, with AETHERCORE_REDIS_MIN_REPLICAS_ACK=`--ack`
(and `min-replicas-to-write` 1 on the data nodes when it is 1 or more). `--clients` threads submit minilm jobs to
POST /serve (every fourth with a completion webhook to a receiver of this process) and poll each to its end;
`--streams` threads each run tiny-gpt2 generations one after another and read them over SSE, resuming with
Last-Event-ID after any break. Once the load runs, the current primary is SIGKILLed `--kills` times (each time the
one just promoted; the killed node comes back as a replica), then frozen (SIGSTOP) past the sentinels'
down-after and resumed: it must come back as a replica, not a second primary.

Reports, over every job answered 202 (acknowledged): lost (its record is gone from the new primary), never ended,
ended twice (more than one `done` event), webhook deliveries missing, streams that missed a chunk (a chunk of the
job's final stream the client never got); per event, seconds from the kill to the promotion, to the first job
accepted again and to /health 200; the 5xx answers in each gap (503 with Retry-After expected, never another).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from bench.processes import BENCH_KEY, LOGS, bench_env
from bench.report import Report
from cli.supervise import Api, Child, SentinelGroup, Worker, free_port, wait_until
from tasks.names import job_events_key, job_key
from tasks.redis_client import make_redis
from tasks.states import TERMINAL

AUTH = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
OWNER = f"env:{hashlib.sha256(BENCH_KEY.encode()).hexdigest()[:12]}"  # how jobs name the bench key's caller
MASTER = "aether"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A failover must lose nothing that was acknowledged.",
    "Sentinel promotes a replica; every process follows.",
    "Redis streams carry every chunk to the client.",
]


class Hooks:
    """The webhook receiver: every POST's job id, answered 200."""

    def __init__(self) -> None:
        self.port = free_port()
        self.by_job: Counter = Counter()
        lock = threading.Lock()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                job_id = _find_job_id(json.loads(body or b"{}"))
                with lock:
                    hooks.by_job[job_id] += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def stop(self) -> None:
        self.server.shutdown()


def _find_job_id(body: Any) -> str | None:
    if isinstance(body, dict):
        if isinstance(body.get("job_id"), str):
            return body["job_id"]
        for value in body.values():
            found = _find_job_id(value)
            if found:
                return found
    return None


@dataclass
class Event:
    kind: str  # "SIGKILL" | "SIGSTOP"
    started: float
    promoted: float = 0.0
    old: int = 0
    new: int = 0


@dataclass
class Tally:
    posts: list[tuple[float, float, int, bool]] = field(default_factory=list)  # (sent, answered, status, retry-after)
    polls: list[tuple[float, int, bool]] = field(default_factory=list)  # GET /jobs answered 5xx: (sent, status, R-A)
    acknowledged: list[str] = field(default_factory=list)
    hooked: set[str] = field(default_factory=set)
    streams: list[tuple[str, set[str]]] = field(default_factory=list)  # (job id, chunk ids the client got)
    health: list[tuple[float, int]] = field(default_factory=list)
    client_errors: Counter = field(default_factory=Counter)
    stream_breaks: Counter = field(default_factory=Counter)  # error events that ended a stream early, by code
    health_failures: Counter = field(default_factory=Counter)  # the failing checks /health named


class FailoverStorm:
    def __init__(self, args: argparse.Namespace, say=print) -> None:
        self.args = args
        self.say = say
        self.tally = Tally()
        self.lock = threading.Lock()
        self.loading = threading.Event()
        self.events: list[Event] = []

    # -- load ----------------------------------------------------------------------------------------
    def _conn(self) -> HTTPConnection:
        return HTTPConnection("127.0.0.1", self.api.port, timeout=30)

    def _client(self, index: int) -> None:
        n = index
        while self.loading.is_set():
            n += self.args.clients
            body: dict[str, Any] = {"model_id": "minilm", "inputs": {"text": SENTENCES[n % len(SENTENCES)]}}
            if n % 4 == 0:
                body["webhook"] = {"url": self.hooks.url}
            try:
                conn = self._conn()
                sent = time.monotonic()
                conn.request("POST", "/serve", body=orjson.dumps(body), headers=AUTH)
                response = conn.getresponse()
                answer = orjson.loads(response.read() or b"{}")
                with self.lock:
                    self.tally.posts.append(
                        (sent, time.monotonic(), response.status, bool(response.getheader("Retry-After")))
                    )
                if response.status != 202:
                    time.sleep(0.1)
                    continue
                with self.lock:
                    self.tally.acknowledged.append(answer["job_id"])
                    if "webhook" in body:
                        self.tally.hooked.add(answer["job_id"])
                self._until_ended(conn, answer["job_id"])
            except Exception as exc:  # counted; the client goes on
                with self.lock:
                    self.tally.client_errors[type(exc).__name__] += 1
                time.sleep(0.1)

    def _until_ended(self, conn: HTTPConnection, job_id: str) -> None:
        while self.loading.is_set():
            try:
                sent = time.monotonic()
                conn.request("GET", f"/jobs/{job_id}?wait=5", headers=AUTH)
                response = conn.getresponse()
                job = orjson.loads(response.read() or b"{}")
                if response.status >= 500:
                    with self.lock:
                        self.tally.polls.append((sent, response.status, bool(response.getheader("Retry-After"))))
                if response.status in (200, 202) and job.get("status") in TERMINAL:
                    return
                if response.status == 404:  # acknowledged, then gone: counted lost in the report
                    return
                if response.status not in (200, 202):
                    time.sleep(0.2)
            except Exception:
                time.sleep(0.2)
                conn = self._conn()

    def _streamer(self, index: int) -> None:
        while self.loading.is_set():
            body = {"model_id": "tiny-gpt2", "inputs": {"text": f"Story {index}:"}, "parameters": {"max_length": 48}}
            try:
                conn = self._conn()
                conn.request("POST", "/serve", body=orjson.dumps(body), headers=AUTH)
                response = conn.getresponse()
                answer = orjson.loads(response.read() or b"{}")
                if response.status != 202:
                    time.sleep(0.2)
                    continue
            except Exception:
                time.sleep(0.2)
                continue
            got: set[str] = set()
            with self.lock:
                self.tally.acknowledged.append(answer["job_id"])
                self.tally.streams.append((answer["job_id"], got))
            self._follow(answer["job_id"], got)

    def _follow(self, job_id: str, got: set[str]) -> None:
        """Read the job's SSE stream to its end, resuming after the last id seen whenever it breaks."""
        last = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                conn = HTTPConnection("127.0.0.1", self.api.port, timeout=15)
                headers = {**AUTH, **({"Last-Event-ID": last} if last else {})}
                conn.request("GET", f"/jobs/{job_id}/stream", headers=headers)
                response = conn.getresponse()
                if response.status == 404:  # acknowledged, then gone: counted lost in the report
                    return
                if response.status != 200:
                    response.read()
                    time.sleep(0.3)
                    continue
                event, event_id, data = None, None, ""
                for raw in response:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        data = line[6:]
                    elif line == "" and event:
                        if event == "chunk" and event_id:
                            got.add(event_id)
                        if event_id:
                            last = event_id
                        if event == "done" or (event == "error" and "job" in orjson.loads(data or b"{}")):
                            return  # the job ended (an error event without the job: the stream broke, resume)
                        if event == "error":
                            with self.lock:
                                self.tally.stream_breaks[orjson.loads(data)["error"].get("code")] += 1
                            break
                        event, event_id, data = None, None, ""
            except Exception:
                time.sleep(0.3)

    def _health(self) -> None:
        while self.loading.is_set():
            try:
                conn = HTTPConnection("127.0.0.1", self.api.port, timeout=5)
                conn.request("GET", "/health", headers=AUTH)
                response = conn.getresponse()
                status, body = response.status, orjson.loads(response.read() or b"{}")
                if status != 200:
                    checks = body.get("checks", {}).items()
                    failing = [f"{n}: {c.get('error')}" for n, c in checks if c["status"] != "ok"]
                    with self.lock:
                        self.tally.health_failures.update(failing)
            except Exception:
                status = 0
            with self.lock:
                self.tally.health.append((time.monotonic(), status))
            time.sleep(0.25)

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> list[str]:
        args = self.args
        self.group = SentinelGroup(
            replicas=2,
            sentinels=3,
            master_name=MASTER,
            down_after_ms=args.down_after_ms,
            min_replicas_to_write=1 if args.ack else 0,
        ).start()
        self.hooks = Hooks()
        env = bench_env(
            self.group.url,
            AETHERCORE_REDIS_SENTINEL_MASTER=MASTER,
            AETHERCORE_REDIS_MIN_REPLICAS_ACK=str(args.ack),
            AETHERCORE_WEBHOOK_ALLOW="127.0.0.1",
            AETHERCORE_LOG_LEVEL="WARNING",
            AETHERCORE_RATE_LIMIT="",
            AETHERCORE_HEARTBEAT_INTERVAL="1",
        )
        children: list[Child] = []
        try:
            self.api = Api(env, "failover-api", log_dir=LOGS).start()
            children.append(self.api)
            for n in range(2):
                children.append(Worker(self.group.url, env, f"failover-worker{n}", "cpu", LOGS).start())
            client = make_redis(self.group.url, MASTER)
            from webhooks.owners import WebhookOwners

            WebhookOwners(client).secret(OWNER, create=True)
            dispatcher = Child("failover-dispatcher", env, LOGS).spawn("dispatcher")
            children.append(dispatcher)
            for model in ("minilm", "tiny-gpt2"):
                conn = HTTPConnection("127.0.0.1", self.api.port, timeout=180)
                conn.request("POST", f"/models/{model}/load?wait=170", headers=AUTH)
                response = conn.getresponse()
                if response.status != 200:
                    raise RuntimeError(f"cannot load {model}: {response.read()!r}")
                response.read()
            self.loading.set()
            threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(args.clients)]
            threads += [threading.Thread(target=self._streamer, args=(i,), daemon=True) for i in range(args.streams)]
            threads.append(threading.Thread(target=self._health, daemon=True))
            for thread in threads:
                thread.start()
            time.sleep(args.warmup)
            for kind in ["SIGKILL"] * args.kills + ["SIGSTOP"]:
                event = Event(kind, time.monotonic())
                self.say(f"{kind} of the primary on port {self.group.master_port()}")
                event.old, event.new = self.group.kill_primary() if kind == "SIGKILL" else self.group.pause_primary()
                event.started = self.group.signalled_at  # the signal's moment, not the lookup's before it
                event.promoted = self.group.promoted_at
                self.events.append(event)
                time.sleep(args.between)
            until = time.monotonic() + 300
            while len(self.tally.acknowledged) < args.min_jobs and time.monotonic() < until:
                time.sleep(1)
            self.loading.clear()
            joined_by = time.monotonic() + 60  # a stream still open then is left to the report
            for thread in threads:
                thread.join(max(0.1, joined_by - time.monotonic()))
            self.say(f"load stopped; waiting up to {args.grace:.0f} s for every acknowledged job to end")
            client = make_redis(self.group.url, MASTER)
            wait_until(lambda: self._open_jobs(client) == 0, args.grace, 1.0, "every acknowledged job to end")
            time.sleep(5)  # the last webhooks
            return self._report(client, children)
        finally:
            self.loading.clear()
            for child in reversed(children):
                child.stop()
            self.hooks.stop()
            self.group.stop()

    def _open_jobs(self, client: Any) -> int:
        pipe = client.pipeline(transaction=False)
        for job_id in self.tally.acknowledged:
            pipe.hget(job_key(job_id), "status")
        return sum(1 for status in pipe.execute() if status is not None and status not in TERMINAL)

    # -- the report ---------------------------------------------------------------------------------------
    def _report(self, client: Any, children: list[Child]) -> list[str]:
        lost, never_ended, twice, statuses = 0, 0, 0, Counter()
        for job_id in self.tally.acknowledged:
            job = client.hgetall(job_key(job_id))
            if not job:
                lost += 1
                continue
            statuses[job.get("status")] += 1
            if job.get("status") not in TERMINAL:
                never_ended += 1
                continue
            dones = sum(1 for _id, e in client.xrange(job_events_key(job_id)) if e.get("type") == "done")
            twice += dones > 1
        hooks_missing = sum(1 for job_id in self.tally.hooked if not self.hooks.by_job.get(job_id))
        hooks_twice = sum(1 for job_id in self.tally.hooked if self.hooks.by_job.get(job_id, 0) > 1)
        missed = holes = extra = 0
        for job_id, got in self.tally.streams:
            final = {i: int(e["index"]) for i, e in client.xrange(job_events_key(job_id)) if e.get("type") == "chunk"}
            missed += bool(set(final) - got)  # a chunk of the final stream this client never got
            holes += sorted(final.values()) != list(range(len(final)))  # the stream itself lacks an index
            extra += bool(got - set(final))  # it read a chunk the failover then lost (and got its copy again)
        posts = Counter(status for _s, _a, status, _r in self.tally.posts)
        answered_5xx = [(status, retry) for _s, _a, status, retry in self.tally.posts if status >= 500]
        answered_5xx += [(status, retry) for _s, status, retry in self.tally.polls]
        wrong_5xx = sum(1 for status, retry in answered_5xx if not (status == 503 and retry))
        lines = [
            f"acknowledged jobs {len(self.tally.acknowledged)} (of them {len(self.tally.streams)} streamed "
            f"generations, {len(self.tally.hooked)} with a webhook); AETHERCORE_REDIS_MIN_REPLICAS_ACK={self.args.ack}",
            f"lost {lost}; never ended {never_ended}; ended twice {twice}; final states {dict(statuses)}",
            f"webhook deliveries missing {hooks_missing} (jobs delivered more than once: {hooks_twice})",
            f"streams that missed a chunk {missed} of {len(self.tally.streams)}; final streams with a hole {holes}; "
            f"streams that read a chunk the failover lost (and then its copy) {extra}",
            f"POST /serve answers {dict(sorted(posts.items()))}; GET /jobs answered 5xx {len(self.tally.polls)}; "
            f"5xx (POST or GET) other than 503 with Retry-After: {wrong_5xx}",
            f"client errors {dict(self.tally.client_errors)}; streams broken and resumed, by error "
            f"{dict(self.tally.stream_breaks)}",
            f"processes that died: {[c.label for c in children if c.died()]}",
            f"/health's failing checks, by times seen: {dict(self.tally.health_failures.most_common(6))}",
            "",
            "| event | old → new primary | promoted after (s) | first 202 after (s) | /health 200 after (s) "
            "| 503 in the gap (POST, GET) | other 5xx in the gap |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        ends = [e.started for e in self.events[1:]] + [float("inf")]
        for event, until in zip(self.events, ends):

            def window(t: float, start: float = event.started, end: float = until) -> bool:
                return start <= t < end  # this event's, up to the next one

            first_202 = min((s for s, _a, st, _r in self.tally.posts if window(s) and st == 202), default=None)
            down = [t for t, st in self.tally.health if window(t) and st != 200]
            back = min(
                (t for t, st in self.tally.health if window(t) and st == 200 and t > (max(down) if down else 0)),
                default=None,
            )
            gap_end = first_202 or event.started
            in_gap = [st for s, _a, st, _r in self.tally.posts if event.started <= s < gap_end]
            in_gap += [st for s, st, _r in self.tally.polls if event.started <= s < gap_end]
            lines.append(
                f"| {event.kind} | {event.old} → {event.new} | {event.promoted - event.started:.1f} | "
                f"{_since(first_202, event.started)} | {_since(back, event.started)} | "
                f"{sum(st == 503 for st in in_gap)} | {sum(st >= 500 and st != 503 for st in in_gap)} |"
            )
        return lines


def _since(moment: float | None, start: float) -> str:
    return f"{moment - start:.1f}" if moment is not None else "never"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ack", type=int, default=1, help="AETHERCORE_REDIS_MIN_REPLICAS_ACK")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--down-after-ms", type=int, default=3000)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--between", type=float, default=10.0, help="seconds of load between two events")
    parser.add_argument("--min-jobs", type=int, default=1000, help="keep the load on until this many were accepted")
    parser.add_argument("--grace", type=float, default=180.0)
    args = parser.parse_args()
    say = Report()
    for line in FailoverStorm(args, say).run():
        say(line)


if __name__ == "__main__":
    main()
