"""The Batch API under a hostile `user`: lines built to make validation errors huge, error lists capped, create and
cancel storms against the owner's quotas, a key revoked while its batch runs, and Redis's memory back near its
baseline once the attack's batches and files are deleted or expired. Each test ends with `assert_still_serving`."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from access.keys import KeyStore
from tasks.holdings import BATCHES, Holdings
from tasks.names import BATCHES_ACTIVE, batch_key, batches_active_key, batches_index_key
from tests.hostile.conftest import assert_still_serving, auth
from tests.support import ADMIN_KEY, OTHER_USER_KEY, USER_KEY, ApiProcess, wait_until

ENDED = ("completed", "failed", "expired", "cancelled")
MAX_KEPT, MAX_ACTIVE = 40, 4  # quota_api's AETHERCORE_BATCHES_MAX_KEPT and AETHERCORE_BATCH_MAX_ACTIVE
LINE = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "sim-h100", "input": "x"}}


def jsonl(lines: list[Any]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def upload(api, content: bytes, key: str = USER_KEY) -> str:
    response = requests.post(
        f"{api.base}/v1/files",
        files={"file": ("in.jsonl", content), "purpose": (None, "batch")},
        headers=auth(key),
        timeout=120,
    )
    assert response.status_code == 200, response.text[:500]
    return response.json()["id"]


def create(api, file_id: str, key: str = USER_KEY, endpoint: str = "/v1/embeddings") -> requests.Response:
    body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
    return requests.post(f"{api.base}/v1/batches", json=body, headers=auth(key), timeout=60)


def retrieve(api, batch_id: str, key: str = USER_KEY) -> requests.Response:
    return requests.get(f"{api.base}/v1/batches/{batch_id}", headers=auth(key), timeout=60)


def wait_ended(api, batch_id: str, key: str = USER_KEY, timeout: float = 180) -> dict[str, Any]:
    def ended():
        batch = retrieve(api, batch_id, key).json()
        return batch if batch["status"] in ENDED else None

    return wait_until(ended, timeout, 0.25, f"batch {batch_id} to end")


def test_junk_urls_leave_a_small_batch_object(hostile_api, hostile_redis):
    """Three lines whose `url` holds 2 MB of junk once made a 6.3 MB batch object, returned by every GET."""
    junk = [{**LINE, "custom_id": f"j{i}", "url": "/v1/" + "junk" * 500_000} for i in range(3)]
    file_id = upload(hostile_api, jsonl(junk))
    created = create(hostile_api, file_id)
    assert created.status_code == 200, created.text[:500]
    batch = wait_ended(hostile_api, created.json()["id"])
    assert batch["status"] == "failed"
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [(i, "mismatched_url") for i in (1, 2, 3)]
    for error in batch["errors"]["data"]:
        assert len(error["message"]) <= 512 and "…" in error["message"], error["message"][:600]
    got = retrieve(hostile_api, batch["id"])
    assert len(got.content) < 8_000, len(got.content)
    listed = requests.get(f"{hostile_api.base}/v1/batches?limit=100", headers=auth(), timeout=60)
    assert listed.status_code == 200 and len(listed.content) < 100 * 8_000
    assert hostile_redis.memory_usage(batch_key(batch["id"])) < 16_000
    assert requests.delete(f"{hostile_api.base}/v1/files/{file_id}", headers=auth(), timeout=60).json()["deleted"]
    assert_still_serving(hostile_api, hostile_redis)


def test_error_lists_are_capped_in_count_and_size(hostile_api, hostile_redis):
    """Every value a caller controls, huge, in every line: at most 100 errors and a summary, each short."""
    huge_body = {"model": "m" * 5000, "input": "x", "q" * 3000: 1}
    first = [{"custom_id": f"x{i}", "method": "POST", "url": "/v1/embeddings", "body": huge_body} for i in range(5)]
    rest = [
        {"custom_id": "c" * 600, "method": "G" * 4000, "url": "/v1/" + "u" * 5000, "body": huge_body, "k" * 3000: 1}
        for _ in range(300)
    ]
    file_id = upload(hostile_api, jsonl(first + rest))
    created = create(hostile_api, file_id)
    assert created.status_code == 200, created.text[:500]
    batch = wait_ended(hostile_api, created.json()["id"])
    assert batch["status"] == "failed"
    errors = batch["errors"]["data"]
    assert len(errors) == 101 and errors[-1]["code"] == "too_many_errors", [e["code"] for e in errors[-3:]]
    assert errors[0]["line"] == 1 and errors[0]["code"] == "validation_error"
    for error in errors:
        assert len(error["message"]) <= 512 and len(error["param"] or "") <= 64 and len(error["code"]) <= 64
    assert len(retrieve(hostile_api, batch["id"]).content) < 80_000
    assert hostile_redis.memory_usage(batch_key(batch["id"])) < 100_000
    assert requests.delete(f"{hostile_api.base}/v1/files/{file_id}", headers=auth(), timeout=60).json()["deleted"]
    assert_still_serving(hostile_api, hostile_redis)


@pytest.fixture()
def quota_api(hostile_redis_url: str, hostile_worker) -> Iterator[ApiProcess]:
    """A second API process on the suite's database whose owners may keep few batches, and its batch driver (the
    suite's stands aside meanwhile: tests.support `_DRIVING`)."""
    server = ApiProcess(
        hostile_redis_url,
        name="hostile-api-batch-quota",
        batches=True,
        AETHERCORE_AUTH="true",
        AETHERCORE_WORKERS="1",
        AETHERCORE_BATCHES_MAX_KEPT=str(MAX_KEPT),
        AETHERCORE_BATCH_MAX_ACTIVE=str(MAX_ACTIVE),
    ).start()
    yield server
    server.stop()


def test_create_and_cancel_storms_get_clean_429s_and_leave_nothing_stuck(quota_api, hostile_redis):
    """320 creates from 8 threads, each batch cancelled as soon as it exists: only 200s and clean 429s, never more
    than the quota kept, and every batch ends and gives its slot back."""
    key_id, key = KeyStore(hostile_redis).create("user", "batch-storm")
    owner = f"key:{key_id}"
    file_id = upload(quota_api, jsonl([LINE]), key)

    def storm(_thread: int) -> list[tuple[int, str, str | None]]:
        seen = []
        for _ in range(40):
            made = create(quota_api, file_id, key)
            code = made.json()["error"]["code"] if made.status_code != 200 else None
            seen.append((made.status_code, code, made.json().get("id") if made.status_code == 200 else None))
            if made.status_code == 200:
                cancel = requests.post(
                    f"{quota_api.base}/v1/batches/{made.json()['id']}/cancel", headers=auth(key), timeout=60
                )
                assert cancel.status_code in (200, 409), cancel.text
        return seen

    with ThreadPoolExecutor(8) as pool:
        outcomes = [item for seen in pool.map(storm, range(8)) for item in seen]
    statuses = Counter((status, code) for status, code, _id in outcomes)
    assert set(statuses) <= {(200, None), (429, "too_many_batches"), (429, "quota_exceeded")}, statuses
    created = [batch_id for status, _code, batch_id in outcomes if status == 200]
    assert len(created) <= MAX_KEPT and statuses[(429, "quota_exceeded")] > 0, statuses
    for batch_id in created:
        wait_ended(quota_api, batch_id, key, timeout=120)
    assert not hostile_redis.smembers(batches_active_key(owner))
    assert not set(created) & hostile_redis.smembers(BATCHES_ACTIVE)
    kept = [b for b in hostile_redis.zrange(batches_index_key(owner), 0, -1) if hostile_redis.exists(batch_key(b))]
    assert sorted(kept) == sorted(created)
    assert Holdings(hostile_redis, {}).usage(owner)[BATCHES].count == len(created)  # the account agrees
    refused = create(quota_api, file_id, key)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
    assert "AETHERCORE_BATCHES_MAX_KEPT" in refused.json()["error"]["message"]
    other_file = upload(quota_api, jsonl([LINE]), OTHER_USER_KEY)  # another owner's quota is their own
    other = create(quota_api, other_file, OTHER_USER_KEY)
    assert other.status_code == 200, other.text
    wait_ended(quota_api, other.json()["id"], OTHER_USER_KEY)
    assert_still_serving(quota_api, hostile_redis)


def test_a_revoked_keys_batch_stops(hostile_api, hostile_redis):
    keys = KeyStore(hostile_redis)
    key_id, key = keys.create("user", "batch-revoked")
    body = {"model": "sim-gpt2-h100", "prompt": "the device", "max_tokens": 250}
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body} for i in range(1000)]
    created = create(hostile_api, upload(hostile_api, jsonl(lines), key), key, "/v1/completions")
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    wait_until(lambda: retrieve(hostile_api, batch_id, key).json()["status"] != "validating", 120, 0.05, "validated")
    keys.revoke(key_id)
    batch = wait_ended(hostile_api, batch_id, ADMIN_KEY)
    assert batch["status"] == "cancelled", batch
    assert [e["code"] for e in batch["errors"]["data"]] == ["owner_revoked"]
    assert "revoked" in batch["errors"]["data"][0]["message"]
    counts = batch["request_counts"]
    assert counts["total"] == 1000 and counts["completed"] < 1000 and counts["completed"] + counts["failed"] == 1000
    content = requests.get(f"{hostile_api.base}/v1/files/{batch['error_file_id']}/content", headers=auth(ADMIN_KEY))
    errors = [json.loads(line) for line in content.text.splitlines()]
    assert any(e["error"] and "revoked" in e["error"]["message"] for e in errors)
    assert not hostile_redis.smembers(batches_active_key(f"key:{key_id}"))
    assert_still_serving(hostile_api, hostile_redis)


def test_redis_memory_returns_to_its_baseline(hostile_api, hostile_redis):
    """Batches whose files are deleted and whose records expire (their retention ended: simulated by shortening
    it) leave Redis's used memory near where it was."""
    baseline = int(hostile_redis.info("memory")["used_memory"])
    junk = [{**LINE, "custom_id": f"j{i}", "url": "/v1/" + "junk" * 500_000} for i in range(3)]
    inputs = [upload(hostile_api, jsonl(junk)) for _ in range(3)] + [upload(hostile_api, jsonl([LINE]))]
    batches = []
    for file_id in inputs:
        made = create(hostile_api, file_id)
        assert made.status_code == 200, made.text[:500]
        batches.append(wait_ended(hostile_api, made.json()["id"]))
    assert [b["status"] for b in batches] == ["failed"] * 3 + ["completed"]
    peak = int(hostile_redis.info("memory")["used_memory"])
    outputs = [b["output_file_id"] for b in batches if b["output_file_id"]]
    for file_id in inputs + outputs:
        deleted = requests.delete(f"{hostile_api.base}/v1/files/{file_id}", headers=auth(), timeout=60)
        assert deleted.status_code == 200 and deleted.json()["deleted"], deleted.text
    for batch in batches:
        hostile_redis.expire(batch_key(batch["id"]), 1)
    wait_until(lambda: not any(hostile_redis.exists(batch_key(b["id"])) for b in batches), 30, 0.2, "expiry")
    assert peak - baseline > 15 * 2**20, (baseline, peak)  # the attack's 18 MB were there

    def returned() -> bool:  # freed memory may be given back by Redis's background thread (UNLINK) a moment later
        after.append(int(hostile_redis.info("memory")["used_memory"]))
        return after[-1] - baseline < 2**20

    after: list[int] = []
    try:
        wait_until(returned, 10, 0.5, "Redis's memory back near its baseline")
    except AssertionError:
        raise AssertionError(f"Redis's memory stayed above its baseline: {baseline, peak, after[-3:]}") from None
    assert_still_serving(hostile_api, hostile_redis)
