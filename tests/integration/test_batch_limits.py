"""What a batch may hold, and for how long, against real Redis, worker, API and batch driver processes: output and
error files charged to their owner as lines are answered, within a cap per batch and a quota per owner (the rest
answered `output_limit_reached`); `POST /v1/batches` refused when Redis or the held objects' share of it is full; a
validation that cannot finish in its window ends `expired`; a line whose preparation keeps raising is answered
`internal_error` and a step that keeps raising ends its batch `failed`, never retried for ever; lines that never
end (their worker SIGKILLed) do not hold the owner's slot past the deadline."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis
import requests

from access.keys import issue_token
from batches.ending import FINISH_GRACE_S
from tasks.holdings import FILES, OUTPUTS, Holdings
from tasks.names import batch_key, batches_active_key, file_key, file_lines_key
from tests.support import JWT_SECRET, USER_KEY, ApiProcess, RedisServer, WorkerProcess, wait_until

ENDED = ("completed", "failed", "expired", "cancelled")
EMBED = {"model": "sim-h100", "input": "some text"}


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def fresh_owner() -> tuple[str, str]:
    """A JWT of a subject no other test uses: its own account of what it holds. (owner id, token)"""
    subject = f"batch-limits-{uuid.uuid4().hex[:8]}"
    return f"jwt:{subject}", issue_token(JWT_SECRET, subject, "user", 3600)


def line(custom_id: str, url: str = "/v1/embeddings", body: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body or EMBED}


def upload(api, lines: list[dict[str, Any]], key: str) -> str:
    content = "".join(json.dumps(item) + "\n" for item in lines).encode()
    response = requests.post(
        f"{api.base}/v1/files", files={"file": ("in.jsonl", content), "purpose": (None, "batch")}, headers=headers(key)
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create(api, file_id: str, key: str, endpoint: str = "/v1/embeddings") -> requests.Response:
    body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
    return requests.post(f"{api.base}/v1/batches", json=body, headers=headers(key), timeout=60)


def started(api, lines: list[dict[str, Any]], key: str, endpoint: str = "/v1/embeddings") -> str:
    made = create(api, upload(api, lines, key), key, endpoint)
    assert made.status_code == 200, made.text
    return made.json()["id"]


def batch(api, batch_id: str, key: str) -> dict[str, Any]:
    return requests.get(f"{api.base}/v1/batches/{batch_id}", headers=headers(key), timeout=60).json()


def wait_for(api, batch_id: str, key: str, done=lambda b: b["status"] in ENDED, timeout: float = 180):
    def ready():
        current = batch(api, batch_id, key)
        return current if done(current) else None

    return wait_until(ready, timeout, 0.25, f"batch {batch_id}")


def entries(api, file_id: str | None, key: str) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = requests.get(f"{api.base}/v1/files/{file_id}/content", headers=headers(key), timeout=60)
    return [json.loads(text) for text in content.text.splitlines()]


def stored(r: redis.Redis, file_id: str) -> list[str]:
    return list(r.hgetall(file_lines_key(file_id)).values())


# -- output and error files ---------------------------------------------------------------------------------------
def test_output_files_are_charged_capped_per_batch_and_within_the_owner_quota(main_redis_url, main_worker):
    """A cap of 6 KB per batch (two answers of ~2.3 KB) and 14 KB per owner: the first batches keep two answers
    each, the third none; every other line is answered `output_limit_reached`, and the owner's account is the
    bytes its files hold, to the byte."""
    api = ApiProcess(
        main_redis_url,
        name="api-batch-outputs",
        batches=True,
        AETHERCORE_AUTH="true",
        AETHERCORE_BATCH_OUTPUT_MAX_BYTES="6KB",
        AETHERCORE_OUTPUTS_QUOTA="14KB",
    ).start()
    r = redis.Redis.from_url(main_redis_url, decode_responses=True)
    owner, key = fresh_owner()
    try:
        ended = []
        for n in range(3):
            batch_id = started(api, [line(f"b{n}-{i}") for i in range(10)], key)
            ended.append(wait_for(api, batch_id, key))
        files = []
        for done in ended:
            assert done["status"] == "completed" and done["request_counts"]["total"] == 10
            output, errors = entries(api, done["output_file_id"], key), entries(api, done["error_file_id"], key)
            assert len(output) == done["request_counts"]["completed"] and len(output) + len(errors) == 10
            assert {e["error"]["code"] for e in errors} == {"output_limit_reached"}
            assert all(e["response"]["status_code"] == 200 and e["custom_id"] for e in output)
            kept = stored(r, done["output_file_id"]) if done["output_file_id"] else []
            assert sum(len(text) for text in kept) <= 6 * 1024  # the batch's cap
            files += [f for f in (done["output_file_id"], done["error_file_id"]) if f]
        assert [done["request_counts"]["completed"] for done in ended] == [2, 2, 0]  # the owner's quota
        held = Holdings(r, {}).usage(owner)[OUTPUTS]
        assert held.bytes == sum(len(text.encode()) for f in files for text in stored(r, f))
        assert held.count == len(files)
    finally:
        api.stop()


# -- POST /v1/batches and a full Redis ----------------------------------------------------------------------------
def test_creating_a_batch_is_refused_while_redis_or_the_holdings_share_is_full():
    server = RedisServer().start()
    api = None
    try:
        url = server.url(0)
        api = ApiProcess(
            url, name="api-batch-full", AETHERCORE_AUTH="true", AETHERCORE_HOLDINGS_MAX_SHARE="0.05"
        ).start()
        r = redis.Redis.from_url(url, decode_responses=True)
        file_id = upload(api, [line("a")], USER_KEY)
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory", used + 1024)

        def refused(code: str) -> dict | None:
            response = create(api, file_id, USER_KEY)
            error = response.json().get("error") or {}
            return error if response.status_code == 503 and error.get("code") == code else None

        assert "maxmemory" in wait_until(lambda: refused("redis_full"), 10, 0.2, "redis_full")["message"]
        r.config_set("maxmemory", 1024 * 2**20)  # room in Redis: 51 MB for every caller's objects together
        Holdings(r, {}).put("someone-else", FILES, "file-x", 60 * 2**20, time.time() + 600, force=True)
        share = wait_until(lambda: refused("storage_full"), 10, 0.2, "storage_full")
        assert "AETHERCORE_HOLDINGS_MAX_SHARE" in share["message"]
        Holdings(r, {}).drop("someone-else", FILES, "file-x")
        assert create(api, file_id, USER_KEY).status_code == 200
    finally:
        if api is not None:
            api.stop()
        server.cleanup()


# -- deadlines and failures ----------------------------------------------------------------------------------------
def test_a_validation_that_outlives_the_window_ends_expired(main_redis_url, main_worker):
    api = ApiProcess(main_redis_url, name="api-batch-validate-window", batches=True, AETHERCORE_AUTH="true").start()
    r = redis.Redis.from_url(main_redis_url, decode_responses=True)
    _owner, key = fresh_owner()
    try:
        batch_id = started(api, [line(f"r{i}") for i in range(20_000)], key)
        r.hset(batch_key(batch_id), "expires_at", int(time.time()) - 1)  # 24 h later, still validating
        done = wait_for(api, batch_id, key)
        assert done["status"] == "expired" and done["in_progress_at"] is None, done
        assert done["request_counts"]["total"] == 0 and [e["code"] for e in done["errors"]["data"]] == ["batch_expired"]
        assert r.hget(file_key(done["input_file_id"]), "in_use") == "0"
    finally:
        api.stop()


def test_a_line_whose_preparation_keeps_failing_is_answered_and_the_batch_goes_on(main_redis_url, main_worker):
    api = ApiProcess(
        main_redis_url,
        name="api-batch-broken-line",
        batches=True,
        AETHERCORE_AUTH="true",
        AETHERCORE_BATCH_MAX_IN_FLIGHT="2",
    ).start()
    r = redis.Redis.from_url(main_redis_url, decode_responses=True)
    _owner, key = fresh_owner()
    body = {"model": "sim-gpt2-h100", "prompt": "the device", "max_tokens": 40}
    try:
        batch_id = started(api, [line(f"r{i}", "/v1/completions", body) for i in range(30)], key, "/v1/completions")
        current = wait_for(api, batch_id, key, lambda b: b["status"] != "validating")
        r.hset(file_lines_key(current["input_file_id"]), "29", "not what was validated\n")
        done = wait_for(api, batch_id, key, timeout=120)
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 29
        (broken,) = entries(api, done["error_file_id"], key)
        assert broken["custom_id"] is None and broken["response"]["status_code"] == 500
        assert broken["response"]["body"]["error"]["code"] == "internal_error"
    finally:
        api.stop()


def test_a_validation_that_keeps_failing_fails_the_batch(main_redis_url, main_worker):
    api = ApiProcess(main_redis_url, name="api-batch-broken-step", batches=True, AETHERCORE_AUTH="true").start()
    r = redis.Redis.from_url(main_redis_url, decode_responses=True)
    owner, key = fresh_owner()
    try:
        file_id = upload(api, [line("a")], key)
        r.hset(file_key(file_id), "lines", "many")  # what no validation expects: it raises at every try
        made = create(api, file_id, key)
        assert made.status_code == 200, made.text
        done = wait_for(api, made.json()["id"], key, timeout=60)
        assert done["status"] == "failed" and done["errors"]["data"][-1]["code"] == "internal_error", done
        assert "validating" in done["errors"]["data"][-1]["message"]
        assert not r.smembers(batches_active_key(owner))
    finally:
        api.stop()


def test_lines_that_never_end_do_not_hold_the_slot_past_the_deadline():
    """The only worker is SIGKILLed with lines running (no reaper is left to queue them again): they never end.
    Once the deadline passes (the window's end plus FINISH_GRACE_S, simulated) the batch ends without them."""
    server = RedisServer().start()
    url = server.url(0)
    worker = WorkerProcess(url, name="batch-deadline-worker").start()
    api = ApiProcess(
        url, name="api-batch-deadline", batches=True, AETHERCORE_AUTH="true", AETHERCORE_BATCH_MAX_IN_FLIGHT="4"
    ).start()
    try:
        r = redis.Redis.from_url(url, decode_responses=True)
        _owner, key = fresh_owner()
        body = {"model": "sim-gpt2-h100", "prompt": "the device", "max_tokens": 250}
        batch_id = started(api, [line(f"r{i}", "/v1/completions", body) for i in range(20)], key, "/v1/completions")
        wait_for(api, batch_id, key, lambda b: b["request_counts"]["completed"] >= 1, timeout=120)
        worker.kill()
        owner = r.hget(batch_key(batch_id), "owner")
        r.hset(batch_key(batch_id), "expires_at", int(time.time()) - 1)  # the window ends: lines are asked to stop
        time.sleep(3)
        assert batch(api, batch_id, key)["status"] == "in_progress"  # lines still running: it waits for them
        r.hset(batch_key(batch_id), "expires_at", int(time.time()) - FINISH_GRACE_S - 1)
        done = wait_for(api, batch_id, key, timeout=60)
        assert done["status"] == "expired" and done["errors"]["data"][-1]["code"] == "batch_expired", done
        assert "unanswered" in done["errors"]["data"][-1]["message"]
        counts = done["request_counts"]
        assert counts["completed"] >= 1 and counts["completed"] + counts["failed"] < 20
        assert not r.smembers(batches_active_key(owner))
        assert entries(api, done["output_file_id"], key)  # what was answered is kept
    finally:
        api.stop()
        worker.stop()
        server.cleanup()
