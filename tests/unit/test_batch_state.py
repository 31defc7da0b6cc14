"""A batch's state in Redis (api/batches.py, api/files.py) step by step against a real Redis: each line answered once
however often it is answered, lines taken once, a job noted only for a line still waiting, a status moved only from
the statuses named and a batch ended only when every line is answered; files byte for byte."""

from __future__ import annotations

import time

import numpy as np
import orjson
import redis

from api.batch_driver import _entry
from api.batches import (
    COMPLETED,
    ERROR,
    FINALIZING,
    IN_PROGRESS,
    NOT_SUBMITTED,
    OUTPUT,
    VALIDATING,
    Answer,
    BatchStore,
    batch_object,
    new_batch_id,
)
from api.files import FileStore, UploadLimits, new_file_id, rendered
from tasks.holdings import FILES, Holdings, Quota
from tasks.names import BATCHES_ACTIVE, file_key, file_lines_key

LIMITS = UploadLimits(max_bytes=1 << 20, max_lines=100, max_line_bytes=1 << 16)


def _files(client) -> FileStore:
    raw = redis.Redis(connection_pool=redis.ConnectionPool(**{**client.connection_pool.connection_kwargs}))
    raw.connection_pool.connection_kwargs["decode_responses"] = False
    return FileStore(client, raw, 600, Holdings(client, {FILES: Quota(1 << 30, 100)}))


def _batch(store: BatchStore, files: FileStore, total: int) -> dict:
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
    }
    assert store.create(fields, source["id"], max_active=4) == 1
    assert store.transition(fields["id"], (VALIDATING,), IN_PROGRESS, total=total) == ""
    return store.get(fields["id"])


def test_lines_are_taken_once_and_answered_once(scratch_redis):
    store, files = BatchStore(scratch_redis, 600), _files(scratch_redis)
    batch = _batch(store, files, total=5)
    assert store.claim(batch, 3, "room") == [0, 1, 2]
    assert store.claim(batch, 3, "room") == []  # three taken, none answered: no room
    assert store.record(batch["id"], 0, "job-a") and not store.record(batch["id"], 0, "job-b")
    answer = Answer(0, OUTPUT, '{"custom_id": "a"}\n', 19)
    assert store.answer(batch, [answer, answer, Answer(0, ERROR, "late\n", 5)]) == 1  # once, whatever comes after
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
    store, files = BatchStore(scratch_redis, 600), _files(scratch_redis)
    batch = _batch(store, files, total=2)
    lines = store.claim(batch, 10, "room")
    store.answer(batch, [Answer(line, OUTPUT, f"{line}\n", 2, input_tokens=3) for line in lines])
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
    store, files = BatchStore(scratch_redis, 600), _files(scratch_redis)
    batch = _batch(store, files, total=1)
    assert files.delete(batch["input_file_id"], "key:owner") == -1
    store.answer(batch, [Answer(line, ERROR, "x\n", 2) for line in store.claim(batch, 1, "room")])
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
    entry = {"custom_id": "a", "response": {"status_code": 200, "body": {"data": [{"embedding": vector}]}}}
    answer = _entry(0, OUTPUT, entry)
    as_json = orjson.dumps(entry, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
    assert "$nd" in answer.stored and len(answer.stored) < len(as_json) / 2
    assert rendered(answer.stored.encode()) == as_json and answer.size == len(as_json)
