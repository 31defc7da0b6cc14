"""A batch's state in Redis (batches/store.py, batches/files.py) step by step against a real Redis: each line answered
once however often it is answered, lines taken once, a job noted only for a line still waiting, a status moved only from
the statuses named and a batch ended only when every line is answered; files byte for byte. What a batch keeps is
charged to its owner in the same steps (tasks/holdings.py): its record at creation (a count quota), its files as
lines are answered (a cap per batch and a quota per owner, beyond which a line gets its short entry), and the end
queues its webhook's delivery itself."""

from __future__ import annotations

import time

import numpy as np
import orjson
import redis

from batches.files import FileStore, new_file_id, rendered
from batches.objects import batch_object
from batches.outputs import line_entry
from batches.store import (
    COMPLETED,
    ERROR,
    FINALIZING,
    IN_PROGRESS,
    NOT_SUBMITTED,
    OUTPUT,
    VALIDATING,
    Answer,
    BatchStore,
    new_batch_id,
)
from batches.uploads import UploadLimits
from tasks.holdings import BATCHES, DELIVERIES, FILES, OUTPUTS, Holdings, Quota
from tasks.names import (
    BATCHES_ACTIVE,
    BATCHES_WAKE,
    BATCHES_WAKE_MAX,
    WEBHOOKS_DUE,
    batch_key,
    file_key,
    file_lines_key,
    webhook_delivery_key,
)


def _store(client, quotas: dict | None = None) -> BatchStore:
    return BatchStore(client, 600, Holdings(client, quotas or {}))


def _answer(line: int, file: str, text: str, size: int, **tokens) -> Answer:
    return Answer(line, file, text, size, "short\n", 6, **tokens)


LIMITS = UploadLimits(max_bytes=1 << 20, max_lines=100, max_line_bytes=1 << 16)


def _files(client) -> FileStore:
    raw = redis.Redis(connection_pool=redis.ConnectionPool(**{**client.connection_pool.connection_kwargs}))
    raw.connection_pool.connection_kwargs["decode_responses"] = False
    return FileStore(client, raw, 600, Holdings(client, {FILES: Quota(1 << 30, 100)}))


def _batch(store: BatchStore, files: FileStore, total: int, **extra) -> dict:
    source = files.upload("key:owner", "in.jsonl", "batch", [b'{"n": %d}\n' % i for i in range(total)], 3600, LIMITS)
    now = int(time.time())
    fields = {
        "id": new_batch_id(),
        "endpoint": "/v1/embeddings",
        "input_file_id": source["id"],
        "completion_window": "24h",
        "status": VALIDATING,
        "created_at": now,
        "expires_at": now + 86400,
        "owner": "key:owner",
        "role": "user",
        "output_file": new_file_id(),
        "error_file": new_file_id(),
        "total": 0,
        "completed": 0,
        "failed": 0,
        "next_line": 0,
        **extra,
    }
    assert store.create(fields, source["id"], max_active=4) == 1
    assert store.transition(fields["id"], (VALIDATING,), IN_PROGRESS, total=total) == ""
    return store.get(fields["id"])


def test_lines_are_taken_once_and_answered_once(scratch_redis):
    store, files = _store(scratch_redis), _files(scratch_redis)
    batch = _batch(store, files, total=5)
    assert store.claim(batch, 3, "room") == [0, 1, 2]
    assert store.claim(batch, 3, "room") == []  # three taken, none answered: no room
    assert store.record(batch["id"], 0, "job-a") and not store.record(batch["id"], 0, "job-b")
    answer = _answer(0, OUTPUT, '{"custom_id": "a"}\n', 19)
    assert store.answer(batch, [answer, answer, _answer(0, ERROR, "late\n", 5)], 0) == (1, 0)  # once, whatever after
    assert store.taken(batch["id"]) == {1: NOT_SUBMITTED, 2: NOT_SUBMITTED}
    assert not store.record(batch["id"], 0, "job-c")  # answered: no job is noted for it any more
    assert store.claim(batch, 3, "room") == [3]
    current = store.get(batch["id"])
    assert (current["completed"], current["failed"], current["output_bytes"], current["next_line"]) == (
        "1",
        "0",
        "19",
        "4",
    )
    assert store.end(current, (IN_PROGRESS,), FINALIZING, final=False) == "busy"


def test_a_batch_ends_once_every_line_is_answered(scratch_redis):
    store, files = _store(scratch_redis), _files(scratch_redis)
    batch = _batch(store, files, total=2)
    lines = store.claim(batch, 10, "room")
    store.answer(batch, [_answer(line, OUTPUT, f"{line}\n", 2, input_tokens=3) for line in lines], 0)
    assert store.end(batch, (IN_PROGRESS,), FINALIZING, final=False) == ""
    assert store.end(batch, (IN_PROGRESS,), FINALIZING, final=False) == FINALIZING  # moved once
    assert store.transition(batch["id"], (VALIDATING, IN_PROGRESS), "cancelling") == FINALIZING  # too late to cancel
    assert scratch_redis.hget(file_key(batch["input_file_id"]), "in_use") == "1"
    assert store.end(batch, (FINALIZING,), COMPLETED, final=True, output_file_id=batch["output_file"]) == ""
    assert batch["id"] not in scratch_redis.smembers(BATCHES_ACTIVE)
    assert scratch_redis.hget(file_key(batch["input_file_id"]), "in_use") == "0"
    public = batch_object(store.get(batch["id"]))
    assert public["status"] == COMPLETED and public["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    assert public["usage"]["input_tokens"] == 6 and public["output_file_id"] == batch["output_file"]
    assert public["completed_at"] >= public["finalizing_at"] and public["error_file_id"] is None
    assert 0 < scratch_redis.ttl(f"aethercore:batch:{batch['id']}") <= 600


def test_an_input_file_cannot_be_deleted_while_a_batch_reads_it(scratch_redis):
    store, files = _store(scratch_redis), _files(scratch_redis)
    batch = _batch(store, files, total=1)
    assert files.delete(batch["input_file_id"], "key:owner") == -1
    store.answer(batch, [_answer(line, ERROR, "x\n", 2) for line in store.claim(batch, 1, "room")], 0)
    store.end(batch, (IN_PROGRESS,), "expired", final=True)
    assert files.delete(batch["input_file_id"], "key:owner") == 1
    assert not scratch_redis.exists(file_key(batch["input_file_id"]), file_lines_key(batch["input_file_id"]))


def test_a_file_is_its_lines_byte_for_byte(scratch_redis):
    files = _files(scratch_redis)
    for content in (b"a\nb\n", b"a\nb", b"", b"\n", "é\r\nx\n\n".encode(), b"\xff\xfe\n{}", b"a\nb\n\n \n"):
        stored = files.upload("key:owner", "f", "batch", [content[:3], content[3:]], 60, LIMITS)
        assert b"".join(files.content(stored)) == content


def test_an_output_line_keeps_its_embedding_as_bytes_and_reads_as_written(scratch_redis):
    vector = np.linspace(-1, 1, 384, dtype="<f4")
    entry = {
        "id": "batch_req_x",
        "custom_id": "a",
        "response": {"status_code": 200, "body": {"data": [{"embedding": vector}]}},
    }
    answer = line_entry(0, OUTPUT, entry)
    as_json = orjson.dumps(entry, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
    assert "$nd" in answer.stored and len(answer.stored) < len(as_json) / 2
    assert rendered(answer.stored.encode()) == as_json and answer.size == len(as_json)


def test_a_batch_record_is_charged_and_its_owner_keeps_at_most_its_quota(scratch_redis):
    import pytest

    from tasks.holdings import QuotaExceeded

    quotas = {BATCHES: Quota(0, 2, "", "AETHERCORE_BATCHES_MAX_KEPT")}
    store, files = _store(scratch_redis, quotas), _files(scratch_redis)
    kept = [_batch(store, files, total=1) for _ in range(2)]
    with pytest.raises(QuotaExceeded) as refused:
        _batch(store, files, total=1)
    assert refused.value.reason == "owner_count" and "AETHERCORE_BATCHES_MAX_KEPT=2" in refused.value.message()
    held = store.holdings.usage("key:owner")[BATCHES]
    assert held.count == 2 and held.bytes >= 2 * sum(len(k) + len(v) for k, v in kept[0].items())
    assert len(scratch_redis.keys("aethercore:batch:batch_*")) == 2  # the refused one wrote nothing
    full = BatchStore(scratch_redis, 600, Holdings(scratch_redis, {}, total_limit=1))
    with pytest.raises(QuotaExceeded) as storage:
        _batch(full, files, total=1, owner="key:another")
    assert storage.value.global_limit


def test_a_slot_whose_batch_record_vanished_is_free_again(scratch_redis):
    """An owner's unfinished batches are counted by record: one that expired (or Redis lost) holds no slot."""
    store, files = _store(scratch_redis), _files(scratch_redis)
    gone = _batch(store, files, total=1)
    scratch_redis.delete(batch_key(gone["id"]))
    for _ in range(4):  # max_active=4: the vanished one no longer counts
        _batch(store, files, total=1)


def test_answers_are_charged_to_the_owner_within_the_batch_cap_and_the_owner_quota(scratch_redis):
    quotas = {OUTPUTS: Quota(250, 0, "AETHERCORE_OUTPUTS_QUOTA")}
    store, files = _store(scratch_redis, quotas), _files(scratch_redis)
    batch = _batch(store, files, total=5)
    lines = store.claim(batch, 5, "room")
    text = "x" * 99 + "\n"
    assert store.answer(batch, [_answer(lines[0], OUTPUT, text, 100)], 210) == (1, 0)
    assert store.answer(batch, [_answer(lines[1], ERROR, text, 100)], 210) == (1, 0)
    assert store.answer(batch, [_answer(lines[2], OUTPUT, text, 100)], 210) == (1, 1)  # past the batch's cap
    assert scratch_redis.hget(file_lines_key(batch["error_file"]), "2") == "short\n"
    assert not scratch_redis.hexists(file_lines_key(batch["output_file"]), "2")
    usage = store.holdings.usage("key:owner")[OUTPUTS]
    assert (usage.bytes, usage.count) == (206, 2)  # one object per file, the short entry charged too
    bigger = _batch(store, files, total=2)  # the owner's quota: 250 bytes, 206 held
    assert store.answer(bigger, [_answer(line, OUTPUT, text, 100) for line in store.claim(bigger, 2, "room")], 0) == (
        2,
        2,
    )
    current = store.get(bigger["id"])
    assert (current["completed"], current["failed"], current["error_bytes"]) == ("0", "2", "12")
    assert store.holdings.usage("key:owner")[OUTPUTS].bytes == 206 + 12  # short entries pass the quota: bounded


def test_the_end_charges_the_errors_and_queues_the_webhook_in_its_own_step(scratch_redis):
    """No application, no services: what ends the batch in Redis also makes its delivery due (a process that dies
    right after the step loses nothing)."""
    from batches.objects import webhook_body
    from batches.store import FAILED

    store, files = _store(scratch_redis), _files(scratch_redis)
    hook = orjson.dumps({"url": "https://example.com/hook", "owner": "key:owner"}).decode()
    batch = _batch(store, files, total=0, webhook=hook)
    before = store.holdings.usage("key:owner")[BATCHES].bytes
    errors = orjson.dumps([{"code": "x", "message": "m" * 500, "param": None, "line": 1}]).decode()
    assert store.end(batch, (IN_PROGRESS,), FAILED, final=True, errors=errors) == ""
    delivery = scratch_redis.hgetall(webhook_delivery_key(f"msg_{batch['id']}"))
    assert delivery["kind"] == "batch" and delivery["ref"] == batch["id"] and delivery["event"] == "batch.failed"
    assert orjson.loads(delivery["webhook"])["url"] == "https://example.com/hook"
    assert scratch_redis.zscore(WEBHOOKS_DUE, f"msg_{batch['id']}") == 0
    usage = store.holdings.usage("key:owner")
    assert usage[BATCHES].bytes >= before + 500 and usage[DELIVERIES].count == 1
    body = orjson.loads(webhook_body(scratch_redis, batch["id"], time.time()))
    assert body["type"] == "batch.failed" and body["data"]["id"] == batch["id"]
    assert body["data"]["errors"]["data"][0]["message"] == "m" * 500


def test_a_forced_end_ends_a_batch_whose_lines_are_unanswered(scratch_redis):
    store, files = _store(scratch_redis), _files(scratch_redis)
    batch = _batch(store, files, total=3)
    store.claim(batch, 2, "room")
    assert store.end(batch, (IN_PROGRESS,), "expired", final=True) == "busy"
    assert store.end(batch, (IN_PROGRESS,), "expired", final=True, force=True) == ""
    assert batch["id"] not in scratch_redis.smembers(BATCHES_ACTIVE) and not store.taken(batch["id"])
    assert scratch_redis.hget(file_key(batch["input_file_id"]), "in_use") == "0"


def test_wake_notes_are_bounded_and_end_an_idle_drivers_wait(scratch_redis):
    """The API's note (one round trip) ends a driver's BLPOP at once; however many batches are created while no
    driver takes them, the list stays BATCHES_WAKE_MAX long and expires."""
    store = _store(scratch_redis)
    began = time.monotonic()
    assert store.wait_for_work(0.3) is False and time.monotonic() - began >= 0.29
    for _ in range(100):
        store.wake()
    assert scratch_redis.llen(BATCHES_WAKE) == BATCHES_WAKE_MAX and 0 < scratch_redis.ttl(BATCHES_WAKE) <= 60
    began = time.monotonic()
    assert store.wait_for_work(5) is True and time.monotonic() - began < 0.5


def test_a_stopping_driver_gives_up_its_own_leases_only(scratch_redis):
    store = _store(scratch_redis)
    assert store.lease("batch_a", "mine", 10_000) and store.lease("batch_b", "theirs", 10_000)
    assert store.release(["batch_a", "batch_b", "batch_c"], "mine") == 1
    assert store.lease("batch_a", "another", 10_000)  # free at once, not when the TTL lapses
    assert not store.lease("batch_b", "another", 10_000)
    assert store.release([], "mine") == 0
