"""The load-and-survive half of scripts/compose-check.sh: drives a running compose deployment from the host.

    python3 scripts/compose_check.py --api URL --key KEY --project P --compose "docker-compose -p P -f ..."
        [--flower URL --flower-auth USER:PASS] [--prometheus URL] [--jobs 600] [--rate 5] [--model minilm]
        [--spike 150] [--spike-model tiny-gpt2] [--tail 100] [--out results.json]

Standard library only (it runs with any Python 3.11). Three phases, a line or two each, then a JSON of everything
to --out; exit 1 when a check fails:

spread   90 jobs served by the three workers: each worker's count (the `worker` of every finished job) adds up to
         the rise of aethercore_jobs_total on the API's /metrics, which adds up to the jobs sent.
burst    --jobs POST /serve at --rate a second, a tenth in a spike of --spike generations at once (each runs for
         seconds); in its middle one worker container is SIGKILLed (`docker kill`), then the worker service is
         scaled 3 -> 2 -> 4 (`compose up -d --no-deps --no-recreate --scale worker=N worker`); the last --tail
         jobs wait until the four are live and must reach all four. Then every job must end exactly once: a
         terminal status for every accepted job (none lost, none left queued or running), succeeded, and never
         more than one `done` event in its Redis event stream (read inside the api container, which holds Redis's
         password); /metrics must not count more jobs than ended.
observe  the live workers agree: the API's /workers, the running worker containers and Flower's online
         workers; Prometheus (when given) has every scrape target up.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from compose_client import TERMINAL, Deployment  # scripts/compose_client.py (beside this script)


class Check(Deployment):
    """The three phases, each adding to `results` and `failures`."""

    # -- phases ------------------------------------------------------------------------------------
    def spread(self) -> None:
        """Jobs spread over the three workers; their counts add up on /metrics."""
        containers = self.worker_containers()
        n = self.args.spread_jobs
        before = self.settled_jobs_total()
        with ThreadPoolExecutor(max_workers=9) as pool:
            replies = list(pool.map(lambda i: self.serve(i, 60), range(n)))
        per_worker: Counter = Counter()
        for status, job in replies:
            if status == 200 and job.get("status") == "succeeded":
                per_worker[self.container_of(job["result"]["worker"])] += 1
            else:
                self.fail(f"spread: POST /serve?wait -> {status} {job if status != 200 else job.get('error')}")
        deadline, rise = time.monotonic() + 30, 0
        while time.monotonic() < deadline:  # workers add their counts to Redis with each heartbeat
            rise = self.jobs_total() - before
            if rise >= n:
                break
            time.sleep(1)
        self.results["spread"] = {"jobs": n, "per_worker": dict(sorted(per_worker.items())), "metrics_rise": rise}
        self.say(
            f"spread: {n} jobs, per worker {dict(sorted(per_worker.items()))} = {sum(per_worker.values())}; "
            f"/metrics aethercore_jobs_total rose by {rise}"
        )
        if len(per_worker) != len(containers):
            self.fail(f"spread: {len(per_worker)} of the {len(containers)} workers served jobs")
        if not (sum(per_worker.values()) == rise == n):
            self.fail(f"spread: the workers' counts {sum(per_worker.values())}, /metrics {rise} and {n} jobs differ")

    def chaos(self, submitted: list[int], events: list[dict], kill_at: int, grown: threading.Event) -> None:
        """In the middle of the spike: SIGKILL one worker container, scale 3 -> 2, then 2 -> 4; `grown` is set once
        the two new workers are live (or after --grow-timeout)."""

        def at(job: float) -> None:
            while submitted[0] < job:
                time.sleep(0.01)

        def step(what: str, command: list[str]) -> None:
            began, at_job = time.monotonic(), submitted[0]
            out = subprocess.run(command, capture_output=True, text=True)
            event = {"at_job": at_job, "what": what, "seconds": round(time.monotonic() - began, 1)}
            event["ok"] = out.returncode == 0
            events.append(event)
            self.say(f"chaos at job {at_job}: {what} ({event['seconds']} s)")
            if out.returncode != 0:
                self.fail(f"chaos: {what}: {' '.join(command)} -> {out.returncode}: {out.stderr.strip()[-500:]}")

        at(kill_at)
        containers = sorted(self.worker_containers().values(), key=lambda name: int(re.findall(r"\d+", name)[-1]))
        victim = containers[-1]  # the highest-numbered: scaling to 2 then removes the dead one, not a live one
        self.victim = next(cid for cid, name in self.known.items() if name == victim)
        step(f"docker kill {victim} (SIGKILL)", ["docker", "kill", victim])
        step(
            "scale worker 3 -> 2 (the killed one goes)",
            [*self.compose, "up", "-d", "--no-deps", "--no-recreate", "--scale", "worker=2", "worker"],
        )
        step(
            "scale worker 2 -> 4",
            [*self.compose, "up", "-d", "--no-deps", "--no-recreate", "--scale", "worker=4", "worker"],
        )
        began, deadline = time.monotonic(), time.monotonic() + self.args.grow_timeout
        while time.monotonic() < deadline and len(self.live_workers()) < 4:
            time.sleep(1)
        live = len(self.live_workers())
        self.say(
            f"chaos at job {submitted[0]}: {live} workers live, {time.monotonic() - began:.0f} s after the scale-up"
        )
        grown.set()

    def await_ends(self, accepted: list[str]) -> dict[str, dict]:
        """Every accepted job must end: poll until none is queued or running (the reaper requeues a dead worker's),
        for --grace seconds at most. Each job's last answer, by id."""
        final: dict[str, dict] = {}
        deadline = time.monotonic() + self.args.grace
        pending = list(accepted)
        while pending and time.monotonic() < deadline:
            with ThreadPoolExecutor(max_workers=8) as pool:
                replies = list(
                    pool.map(lambda j: self.http("GET", f"{self.api}/jobs/{j}", headers=self.headers), pending)
                )
            still = []
            for job_id, (status, job) in zip(pending, replies, strict=True):
                if status == 200 and job.get("status") in TERMINAL:
                    final[job_id] = job
                else:
                    still.append(job_id)
                    final[job_id] = job if status == 200 else {"status": f"http {status}"}
            pending = still
            if pending:
                time.sleep(1)
        return final

    def tally(
        self, accepted: list[str], final: dict[str, dict], tail_ids: set[str | None]
    ) -> tuple[Counter, Counter, int, Counter]:
        """The jobs' outcomes, the successes per worker container, how many ran again, and the last jobs' workers."""
        outcomes: Counter = Counter()
        per_worker: Counter = Counter()
        reran = 0
        tail_workers: Counter = Counter()
        for job_id in accepted:
            job = final.get(job_id, {})
            status = job.get("status", "missing")
            if status == "succeeded":
                outcomes["succeeded"] += 1
                per_worker[self.container_of(job.get("worker") or "?")] += 1
            elif status in TERMINAL:
                outcomes[f"{status}:{(job.get('error') or {}).get('code')}"] += 1
            else:
                outcomes[f"never ended:{status}"] += 1
            reran += job.get("attempts", 0) > 1
            if job_id in tail_ids and job.get("worker"):
                tail_workers[self.container_of(job["worker"])] += 1
        return outcomes, per_worker, reran, tail_workers

    def metrics_rise(self, before: int, accepted: int) -> int:
        """How far the settled-jobs metric rose since `before`, waiting up to 20 s for it to count every job."""
        deadline, rise = time.monotonic() + 20, 0
        while time.monotonic() < deadline:
            rise = self.jobs_total() - before
            if rise >= accepted:
                break
            time.sleep(1)
        return rise

    def burst(self) -> None:
        """--jobs at --rate a second, but for a spike of --spike generations (seconds each) at once a tenth in, so
        that the worker killed in its middle dies holding running jobs; the kill and scalings of chaos() meanwhile.
        The last --tail jobs wait until the scaled-up workers are live: the new workers must take their share."""
        n, rate, spike = self.args.jobs, self.args.rate, min(self.args.spike, self.args.jobs // 2)
        spike_from, tail = n // 10, min(self.args.tail, n - n // 10 - spike)
        grown = threading.Event()
        before = self.settled_jobs_total()
        ids: list[str | None] = [None] * n
        refused: Counter = Counter()
        submitted, events = [0], []
        lock = threading.Lock()

        def submit(i: int) -> None:
            status, job = self.serve(i, None, generate=spike_from <= i < spike_from + spike)
            with lock:
                submitted[0] += 1
                if status == 202:
                    ids[i] = job["job_id"]
                else:
                    refused[f"{status} {job.get('error', {}).get('code') if isinstance(job, dict) else job}"] += 1

        chaos = threading.Thread(
            target=self.chaos, args=(submitted, events, spike_from + spike // 2, grown), daemon=True
        )
        self.worker_containers()
        chaos.start()
        began = time.monotonic()
        tail_began = None
        with ThreadPoolExecutor(max_workers=16) as pool:
            for i in range(n):
                if i == n - tail:  # the rest go to four workers
                    grown.wait(self.args.grow_timeout + 300)
                    tail_began, first_tail = time.monotonic(), i
                if tail_began is not None:
                    delay = tail_began + (i - first_tail) / rate - time.monotonic()
                else:
                    slot = i if i < spike_from else max(spike_from, i - spike)  # the spike's jobs share one slot
                    delay = began + slot / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(submit, i)
        chaos.join()
        submit_s = time.monotonic() - began
        accepted = [job_id for job_id in ids if job_id]
        final = self.await_ends(accepted)
        end_s = time.monotonic() - began
        done_events = self.done_events(accepted)
        self.worker_containers()
        outcomes, per_worker, reran, tail_workers = self.tally(accepted, final, set(ids[n - tail :]))
        twice = sum(1 for dones in done_events.values() if dones[1] > 1)
        lost = sum(1 for status, _dones in done_events.values() if status == "missing")
        rise = self.metrics_rise(before, len(accepted))
        never = sum(v for k, v in outcomes.items() if k.startswith("never ended"))
        failed = sum(v for k, v in outcomes.items() if k != "succeeded" and not k.startswith("never ended"))
        self.results["burst"] = {
            "jobs": n,
            "rate_per_s": rate,
            "spike": {"from_job": spike_from, "jobs": spike},
            "accepted": len(accepted),
            "refused": dict(refused),
            "outcomes": dict(outcomes),
            "succeeded": outcomes["succeeded"],
            "failed": failed,
            "never_ended": never,
            "lost": lost,
            "ended_twice": twice,
            "ran_again_after_the_kill": reran,
            "spike_model": self.args.spike_model,
            "per_worker": dict(sorted(per_worker.items())),
            "last_jobs_per_worker": dict(sorted(tail_workers.items())),
            "chaos": events,
            "submit_seconds": round(submit_s, 1),
            "all_ended_after_seconds": round(end_s, 1),
            "metrics_rise": rise,
        }
        self.say(
            f"burst: {n} jobs at {rate:g}/s ({spike} {self.args.spike_model} generations at once from job "
            f"{spike_from}), {len(accepted)} accepted, "
            f"{dict(refused) or 'none'} refused; "
            f"{outcomes['succeeded']} succeeded, {failed} failed, {never} never ended, {lost} lost, {twice} ended "
            f"twice; {reran} ran again after the kill; all ended {end_s:.0f} s after the first"
        )
        lost_counts = (
            f" (what the killed worker counted in its last {self.args.heartbeat:g} s, not yet flushed, died with it)"
            if rise < len(accepted)
            else ""
        )
        self.say(
            f"burst: per worker {dict(sorted(per_worker.items()))}; /metrics aethercore_jobs_total rose by "
            f"{rise}{lost_counts}"
        )
        if refused:
            self.fail(f"burst: submissions refused: {dict(refused)}")
        if outcomes["succeeded"] != n or never or lost or twice or failed:
            self.fail(
                f"burst: not every job ended exactly once with success: {dict(outcomes)}, lost {lost}, twice {twice}"
            )
        if rise > len(accepted):
            self.fail(f"burst: /metrics counted {rise} ended jobs for {len(accepted)}: a job counted twice")
        if not all(e["ok"] for e in events) or len(events) != 3:
            self.fail("burst: the kill and the two scalings did not all happen")
        self.say(f"burst: the last {tail} jobs, after the scale-up: per worker {dict(sorted(tail_workers.items()))}")
        if len(tail_workers) < 4:
            self.fail(
                f"burst: the last {tail} jobs went to {len(tail_workers)} workers, not the 4 of the scaled-up service"
            )

    def observe(self) -> None:
        expected = self.args.final_workers
        deadline = time.monotonic() + 90
        live, containers, flower_online = [], {}, []
        while time.monotonic() < deadline:  # a killed worker leaves /workers within AETHERCORE_WORKER_TTL
            live, containers = self.live_workers(), self.worker_containers()
            flower_online = self.flower_workers() if self.args.flower else []
            hosts = {name.rsplit("@", 1)[-1] for name in live}
            if (
                len(live) == len(containers) == expected
                and all(any(h.startswith(cid) for h in hosts) for cid in containers)
                and (not self.args.flower or sorted(flower_online) == live)
            ):
                break
            time.sleep(2)
        self.results["workers"] = {"api_live": live, "containers": sorted(containers.values()), "flower": flower_online}
        self.say(
            f"workers: {len(containers)} worker containers running, {len(live)} live in the API's /workers"
            + (f", {len(flower_online)} online in Flower" if self.args.flower else "")
        )
        if not len(live) == len(containers) == expected:
            self.fail(f"workers: expected {expected} live; API {len(live)}, containers {len(containers)}")
        if self.args.flower and sorted(flower_online) != live:
            self.fail(f"Flower's online workers {sorted(flower_online)} are not the API's {live}")
        if self.args.prometheus:
            self.prometheus()

    def flower_workers(self) -> list[str]:
        auth = base64.b64encode(self.args.flower_auth.encode()).decode()
        status, body = self.http(
            "GET", f"{self.args.flower.rstrip('/')}/api/workers?status=true", headers={"Authorization": f"Basic {auth}"}
        )
        return sorted(name for name, online in body.items() if online) if status == 200 else []

    def prometheus(self) -> None:
        deadline, targets = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            status, body = self.http("GET", f"{self.args.prometheus.rstrip('/')}/api/v1/targets")
            targets = body["data"]["activeTargets"] if status == 200 else []
            if targets and all(t["health"] == "up" for t in targets):
                break
            time.sleep(3)
        summary = sorted(f"{t['labels'].get('job')} {t['labels'].get('instance')} {t['health']}" for t in targets)
        self.results["prometheus"] = summary
        up = sum(1 for t in targets if t["health"] == "up")
        self.say(f"prometheus: {up}/{len(targets)} targets up ({'; '.join(summary)})")
        if not targets or up != len(targets):
            self.fail(f"prometheus: targets not all up: {summary}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", required=True)
    parser.add_argument("--key", required=True, help="an API key that may serve the model")
    parser.add_argument("--compose", required=True, help="the compose command line, project and files included")
    parser.add_argument("--project", required=True, help="the compose project name (container labels)")
    parser.add_argument("--flower", help="Flower's URL")
    parser.add_argument("--flower-auth", default="", help="user:password")
    parser.add_argument("--prometheus", help="Prometheus's URL")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--spread-jobs", type=int, default=90)
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--rate", type=float, default=5.0, help="submissions a second in the burst")
    parser.add_argument(
        "--spike", type=int, default=150, help="generations submitted at once at a quarter of the burst"
    )
    parser.add_argument("--spike-model", default="tiny-gpt2")
    parser.add_argument("--tail", type=int, default=100, help="jobs sent after the scale-up's workers are live")
    parser.add_argument("--grow-timeout", type=float, default=180.0, help="seconds for the new workers to go live")
    parser.add_argument("--spike-tokens", type=int, default=128, help="max_length of the spike's generations")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="the workers' AETHERCORE_HEARTBEAT_INTERVAL")
    parser.add_argument("--grace", type=float, default=240.0, help="seconds for the jobs to end after the burst")
    parser.add_argument("--final-workers", type=int, default=4)
    parser.add_argument("--phases", default="spread,burst,observe")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    check = Check(args)
    for phase in args.phases.split(","):
        try:
            getattr(check, phase)()
        except Exception as exc:  # noqa: BLE001 - a phase that breaks is a failed check, and the others still run
            check.fail(f"{phase}: {type(exc).__name__}: {exc}")
    check.results["failures"] = check.failures
    if args.out:
        with open(args.out, "w") as out:
            json.dump(check.results, out, indent=2)
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
