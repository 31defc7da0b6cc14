"""Issue 34, cases 13, 14 and 15 under a hostile `user`: dead letters minted by the thousand (`timeout: 0.001`), a
replay of them refused for load, and an `Idempotency-Key` storm whose waiters all give up before the job ends.

The attacks need settings of their own (a small per-owner dead-letter cap, a short dead-letter retention, a rate
limit and a short AETHERCORE_MAX_WAIT on one API process), so this module runs its own cluster: a redis-server of
its own (its used_memory is this module's alone), a worker and two API processes on it (auth on, one gunicorn
process each): `api` as deployed by default, `strict` with the rate limit and the short wait. Every attacker is a
`user` of its own (a JWT subject per test), so each test's rate limits and holdings start empty. Replay is an
operator's route: the attacker mints the dead letters, an admin replays them. Each test ends with
`assert_still_serving`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
import redis
import requests
import yaml

from access.keys import issue_token
from tests.hostile.conftest import assert_every_job_ends, assert_still_serving
from tests.support import ADMIN_KEY, JWT_SECRET, REPO_ROOT, ApiProcess, RedisServer, WorkerProcess, base_env

pytestmark = pytest.mark.slow

OWNER_MAX = 40  # AETHERCORE_DEAD_LETTER_OWNER_MAX
OWNER_QUOTA = 200_000  # AETHERCORE_DEAD_LETTER_OWNER_QUOTA (bytes)
QUEUE_MAX = 400  # AETHERCORE_DEAD_LETTER_MAX: fewer than one attacker mints, more than every owner's cap together
RETENTION_S = 60  # AETHERCORE_DEAD_LETTER_TTL (its minimum)
STRICT_RATE = 24  # per minute, on the `strict` API process (flask-limiter counts /v1 duplicates too: above 20)
STRICT_WAIT_S = 3  # AETHERCORE_MAX_WAIT on `strict`
MINTED = 2000
TEXT = "poison " * 1100  # ~7.7 KB: what each dead letter keeps to be replayed
# A generation that outlasts STRICT_WAIT_S: 120 steps of 50 ms.
SLOW_MODEL = "sim-slow"
SLOW = {
    "name": "A simulated generation model that takes 50 ms a step (for waits that end first)",
    "model_type": "simulated",
    "task": "text-generation",
    "device": "cpu",
    "autoload": True,
    "max_length": 32,
    "max_length_limit": 256,
    "simulate": {"step_ms": 50.0, "per_row_ms": 0.0},
}
JOB_ID = re.compile(r"\b[0-9a-f]{32}\b")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("replay-idempotency")
    models = yaml.safe_load((REPO_ROOT / "config" / "models.yaml").read_text())
    models["models"][SLOW_MODEL] = SLOW
    models_file = tmp / "models.yaml"
    models_file.write_text(yaml.safe_dump(models))
    server = RedisServer().start()
    url = server.url(0)
    common = {
        "AETHERCORE_MODELS_FILE": str(models_file),
        "AETHERCORE_DEAD_LETTER_OWNER_MAX": str(OWNER_MAX),
        "AETHERCORE_DEAD_LETTER_OWNER_QUOTA": str(OWNER_QUOTA),
        "AETHERCORE_DEAD_LETTER_MAX": str(QUEUE_MAX),
        "AETHERCORE_DEAD_LETTER_TTL": str(RETENTION_S),
        "AETHERCORE_RESULT_TTL": "20",
    }
    worker = WorkerProcess(url, name="replay-worker", **common).start()
    api = ApiProcess(url, name="replay-api", AETHERCORE_AUTH="true", AETHERCORE_WORKERS="1", **common).start()
    strict = ApiProcess(
        url,
        name="replay-strict",
        AETHERCORE_AUTH="true",
        AETHERCORE_WORKERS="1",
        AETHERCORE_RATE_LIMIT=f"{STRICT_RATE}/minute",
        AETHERCORE_MAX_WAIT=str(STRICT_WAIT_S),
        **common,
    ).start()
    yield {
        "url": url,
        "redis": redis.Redis.from_url(url, decode_responses=True),
        "api": api,
        "strict": strict,
        "common": common,
        "worker": worker,
    }
    strict.stop()
    api.stop()
    worker.stop()
    server.cleanup()


def user(name: str) -> tuple[dict[str, str], str]:
    """A `user` of its own (a JWT subject), named for the test: its rate limits and holdings start empty. Its
    headers and its owner id (what its jobs and dead letters name)."""
    subject = f"{name}-{uuid.uuid4().hex[:8]}"
    token = issue_token(JWT_SECRET, subject, "user", 3600)
    return {"Authorization": f"Bearer {token}"}, f"jwt:{subject}"


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@contextmanager
def paused(worker: WorkerProcess) -> Iterator[None]:
    """The worker takes no message meanwhile (SIGSTOP, then SIGCONT): an idle worker's BRPOP can take a job within
    its 1 ms deadline and run it; paused, every job minted waits past it in the queue. For a few seconds at most (its
    heartbeat stops meanwhile: past AETHERCORE_WORKER_TTL it would count as dead)."""
    assert worker.proc is not None
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)


def mint(base: str, who: dict[str, str], count: int, text: str = "x", pause: WorkerProcess | None = None) -> list[str]:
    """`count` jobs that expire in the queue (`timeout: 0.001`): each becomes a dead letter of `who` (every one of
    them when the worker is `pause`d while they are queued; without, a few may start within the millisecond)."""
    body = {"model_id": "minilm", "inputs": {"text": text}, "timeout": 0.001}

    def one(_i: int, session: requests.Session) -> str:
        response = session.post(f"{base}/serve", json=body, headers=who, timeout=30)
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    def batch(indexes: range) -> list[str]:
        with requests.Session() as session:
            return [one(i, session) for i in indexes]

    step = max(1, count // 6)
    with paused(pause) if pause is not None else nullcontext(), ThreadPoolExecutor(6) as pool:
        parts = list(pool.map(batch, [range(i, min(count, i + step)) for i in range(0, count, step)]))
    return [job_id for part in parts for job_id in part]


def dead_letters(base: str) -> list[dict[str, Any]]:
    response = requests.get(f"{base}/dead-letters", params={"limit": 10000}, headers=ADMIN, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["dead_letters"]


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def test_a_user_minting_dead_letters_keeps_only_their_cap_and_redis_memory_returns(cluster):
    api, client = cluster["api"], cluster["redis"]
    bystander, _ = user("bystander")
    kept = mint(api.base, bystander, 3, pause=cluster["worker"])
    assert_every_job_ends(client)
    baseline = used_memory(client)

    attacker, owner = user("minter")
    minted = mint(api.base, attacker, MINTED, TEXT)
    assert_every_job_ends(client, within_s=180)
    found = dead_letters(api.base)
    theirs = [e for e in found if e["owner"] == owner]
    assert theirs, "the attack made no dead letter: nothing was tested"
    assert len(theirs) <= OWNER_MAX, f"{len(theirs)} dead letters kept for one owner (cap {OWNER_MAX})"
    assert {e["job_id"] for e in theirs} <= set(minted)
    # the attacker only ever displaced their own: the other caller's dead letters are all still there
    assert {e["job_id"] for e in found if e["job_id"] in kept} == set(kept)
    held = client.hgetall(f"aethercore:holdings:{owner}")
    assert int(held["dead_letters.count"]) == len(theirs) and int(held["dead_letters.bytes"]) <= OWNER_QUOTA
    grown = used_memory(client) - baseline
    # what the attack would hold without the cap: every minted dead letter with its ~7.7 KB request
    assert grown < MINTED * len(TEXT) / 4, f"Redis grew {grown} bytes for {MINTED} dead letters of one owner"

    # when they leave (the retention ends), Redis's memory returns near its baseline
    def returned() -> bool:
        left = [key for key in client.scan_iter("aethercore:dead-entry:*", count=1000)]
        return not left and used_memory(client) < baseline + 1_000_000

    deadline = time.monotonic() + RETENTION_S + 90
    while not returned():
        assert time.monotonic() < deadline, f"Redis at {used_memory(client) - baseline} bytes over its baseline"
        time.sleep(2)
    assert_still_serving(api, client)


def replay(base: str, job_id: str) -> requests.Response:
    return requests.post(f"{base}/dead-letters/{job_id}/replay", headers=ADMIN, timeout=30)


def test_a_replay_refused_for_load_answers_429_not_202(cluster):
    api, strict, client = cluster["api"], cluster["strict"], cluster["redis"]
    attacker, owner = user("replayed")
    minted = mint(api.base, attacker, STRICT_RATE + 4, pause=cluster["worker"])
    assert_every_job_ends(client)
    # oldest first: each replay expires in its queue again (it keeps its 1 ms timeout) and becomes the owner's
    # newest dead letter, so the owner's cap makes the oldest (already replayed) leave, not the next to replay
    mine = [e["job_id"] for e in reversed(dead_letters(api.base)) if e["owner"] == owner]
    assert set(mine) == set(minted)

    # The replays run as their owner: `strict` counts them in the owner's rate limit, then refuses.
    answers = [replay(strict.base, job_id) for job_id in mine]
    statuses = [a.status_code for a in answers]
    assert statuses[:STRICT_RATE] == [202] * STRICT_RATE, [a.text for a in answers]
    refused = answers[STRICT_RATE]
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_requests" and int(refused.headers["Retry-After"]) >= 1
    assert all(a.status_code == 429 for a in answers[STRICT_RATE:])
    replayed = {a.json()["job"]["job_id"] for a in answers if a.status_code == 202}
    for job_id in replayed:
        job = requests.get(f"{api.base}/jobs/{job_id}", headers=attacker, timeout=10).json()
        assert job["owner"] == owner and job.get("replay_of") in mine  # the owner's job, linked to its dead letter

    # `manage.py jobs replay --all-matching` stops at the first refusal for load and says so
    before = {e["job_id"]: e["replayed_as"] for e in dead_letters(api.base)}
    cli_env = base_env(cluster["url"], AETHERCORE_URL=strict.base, AETHERCORE_API_KEY=ADMIN_KEY, COLUMNS="250")
    cli_env.update(cluster["common"])
    bulk = subprocess.run(
        [sys.executable, str(REPO_ROOT / "manage.py"), "jobs", "replay", "--all-matching", "--yes"],
        env=cli_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = bulk.stdout + bulk.stderr
    assert bulk.returncode != 0 and "429" in output and "stopped" in output, output
    after = {e["job_id"]: e["replayed_as"] for e in dead_letters(api.base)}
    assert {k: v for k, v in after.items() if k in before} == before, "the CLI went on replaying after a refusal"
    assert_still_serving(api, client)


def oip_infer(base: str, who: dict[str, str], key: str | None, timeout_s: float = 60) -> requests.Response:
    body = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["Once upon a time"]}],
        "parameters": {"max_length": 120, "timeout": 60_000_000},  # its own deadline: a minute (µs)
    }
    headers = {**who, **({"Idempotency-Key": key} if key else {})}
    return requests.post(f"{base}/v2/models/{SLOW_MODEL}/infer", json=body, headers=headers, timeout=timeout_s)


def test_an_idempotency_key_storm_whose_waiters_time_out_leaves_the_job_running(cluster):
    api, strict, client = cluster["api"], cluster["strict"], cluster["redis"]
    (attacker, _), key = user("storm"), str(uuid.uuid4())
    oip_infer(api.base, attacker, None)  # the model loaded (its first request waits for it)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _i: oip_infer(strict.base, attacker, key), range(20)))
    assert all(a.status_code == 504 for a in answers), [(a.status_code, a.text) for a in answers]
    named = {m.group(0) for a in answers if (m := JOB_ID.search(a.json()["error"]))}
    assert len(named) == 1, [a.text for a in answers]  # one job for every duplicate
    job_id = named.pop()
    job = requests.get(f"{api.base}/jobs/{job_id}?wait=30", headers=attacker, timeout=40).json()
    assert job["status"] == "succeeded", job  # no waiter's timeout cancelled it: it ran to its end

    again = oip_infer(strict.base, attacker, key)  # the client's retry with its key gets the job's real end
    assert again.status_code == 200 and again.headers.get("Idempotency-Replayed") == "true", again.text
    assert again.json()["outputs"][0]["data"]

    # /v1 the same; its deadline is the wait (a /v1 body has no timeout), so its job ends `expired` on its own, and
    # the key answers that end: never a cancellation one of the waiters caused
    v1_key = str(uuid.uuid4())
    body = {"model": SLOW_MODEL, "prompt": "Once upon a time", "max_tokens": 120}

    def complete(_i: int) -> requests.Response:
        headers = {**attacker, "Idempotency-Key": v1_key}
        return requests.post(f"{strict.base}/v1/completions", json=body, headers=headers, timeout=60)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(complete, range(20)))
    assert all(a.status_code == 504 for a in answers), [(a.status_code, a.text) for a in answers]
    assert not [a.text for a in answers if "cancel" in a.text]
    time.sleep(1)
    retried = complete(0)
    assert retried.headers.get("Idempotency-Replayed") == "true", retried.text
    assert retried.json()["error"]["code"] == "deadline_exceeded", retried.text

    # Without a key nobody else can read the job: its waiter's timeout still cancels it.
    alone = oip_infer(strict.base, attacker, None)
    assert alone.status_code == 504, alone.text
    lone_id = JOB_ID.search(alone.json()["error"]).group(0)
    lone = requests.get(f"{api.base}/jobs/{lone_id}?wait=30", headers=attacker, timeout=40).json()
    assert lone["status"] == "cancelled", lone
    assert_still_serving(api, client)
