"""Dead letters, webhook deliveries and Idempotency-Keys charged to their owner in the Lua step that writes them
(tasks/holdings.py), on the session's real Redis: the per-owner caps make the owner's OLDEST dead letters leave
(hash, index entry and charge), never another owner's; the per-queue trim deletes what it drops; a dead letter keeps
its submission (tasks/deadletters.py `Submission`); a new key past its owner's most is refused, a replay never."""

from __future__ import annotations

import time

import orjson
import pytest

from tasks.deadletters import POISON, WEBHOOK_FAILED, DeadLetters, NotReplayable, Submission
from tasks.errors import POISON_JOB
from tasks.holdings import DEAD_LETTERS, DELIVERIES, IDEMPOTENCY, Holdings, Quota, QuotaExceeded
from tasks.jobs import Jobs
from tasks.jobs.inflight import requeue_payload
from tasks.jobs.lifecycle import JobEnd
from tasks.jobs.records import IdempotencyConflict
from tasks.names import INFER, KEEP_DELIVERY_S, UNLOAD_MODEL, dead_entry_key, dead_letter_key, idempotency_key
from tasks.states import FAILED

RETENTION_S = 600


def store_with(client, owner_max: int = 0, owner_bytes: int = 0, per_queue: int = 1000, max_keys: int = 0):
    quotas = {DEAD_LETTERS: Quota(owner_bytes, owner_max), IDEMPOTENCY: Quota(0, max_keys)}
    return Jobs(client, ttl_s=60, dead_letter_ttl=RETENTION_S, dead_letter_max=per_queue, quotas=quotas)


def dead_letter(store: Jobs, owner: str, work: dict | None = None, webhook: str | None = None, **job) -> str:
    """A job of `owner` that ends poison_job, through the real transition (what a worker's end writes)."""
    created = store.records.create(
        kind=job.get("kind", "inference"),
        model_id="m",
        device="cpu",
        owner=owner,
        extra={"role": "user", "webhook": webhook},
        ttl=job.get("ttl"),
    )
    job_id = created["job_id"]
    work = {"job_id": job_id, "inputs": {"text": "x"}, "parameters": {}, "submitted_at": time.time(), **(work or {})}
    task = job.get("task", INFER)
    kwargs = {"model_id": "m", "jobs": [work]} if task == INFER else {"job_id": job_id, "model_id": "m", **work}
    assert store.lifecycle.mark_running(job_id, "w1", requeue_payload(task, "cpu", kwargs)) == 1
    assert store.lifecycle.end_jobs([JobEnd(job_id, FAILED, POISON_JOB, "killed", dead=POISON)]) == [True]
    return job_id


def held(client, owner: str, kind: str = DEAD_LETTERS) -> tuple[int, int]:
    usage = Holdings(client, {}).usage(owner)[kind]
    return usage.count, usage.bytes


def test_an_owner_past_its_count_loses_its_oldest_and_only_its_own(scratch_redis):
    store = store_with(scratch_redis, owner_max=3)
    other = dead_letter(store, "key:other")
    mine = [dead_letter(store, "key:minter") for _ in range(5)]
    kept = {e["job_id"] for e in DeadLetters(scratch_redis, RETENTION_S, 1000).list()}
    assert kept == {other, *mine[-3:]}
    for gone in mine[:2]:  # hash, index entry and charge left together
        assert not scratch_redis.exists(dead_entry_key(gone))
        assert scratch_redis.zscore(dead_letter_key("cpu"), gone) is None
    assert held(scratch_redis, "key:minter")[0] == 3 and held(scratch_redis, "key:other")[0] == 1
    assert 0 < scratch_redis.ttl(dead_entry_key(mine[-1])) <= RETENTION_S


def test_an_owner_past_its_bytes_loses_its_oldest(scratch_redis):
    store = store_with(scratch_redis, owner_bytes=12_000)
    big = {"inputs": {"text": "y" * 5000}}
    mine = [dead_letter(store, "key:minter", big) for _ in range(4)]
    count, size = held(scratch_redis, "key:minter")
    assert count == 2 and 10_000 < size <= 12_000
    assert [scratch_redis.exists(dead_entry_key(j)) for j in mine] == [0, 0, 1, 1]


def test_the_queue_trim_deletes_what_it_drops_and_its_charge(scratch_redis):
    store = store_with(scratch_redis, per_queue=2)
    first, second, third = (dead_letter(store, f"key:{n}") for n in ("a", "b", "c"))
    assert not scratch_redis.exists(dead_entry_key(first)) and held(scratch_redis, "key:a") == (0, 0)
    assert scratch_redis.zrange(dead_letter_key("cpu"), 0, -1) == [second, third]


def test_a_delivery_is_charged_to_its_webhooks_owner_in_the_jobs_end(scratch_redis):
    store = store_with(scratch_redis)
    hook = orjson.dumps({"url": "https://example.com/h", "owner": "key:hooked"}).decode()
    job_id = dead_letter(store, "key:hooked", webhook=hook)
    dead_letter(store, "key:plain")
    assert held(scratch_redis, "key:hooked", DELIVERIES)[0] == 1
    assert held(scratch_redis, "key:plain", DELIVERIES) == (0, 0)
    expires = scratch_redis.zscore(f"aethercore:holdings:key:hooked:{DELIVERIES}", f"msg_{job_id}")
    assert abs(expires - (time.time() + KEEP_DELIVERY_S)) < 60


def test_a_failed_webhooks_dead_letter_replaces_the_jobs_and_is_capped_alike(scratch_redis):
    store = store_with(scratch_redis, owner_max=2)
    dead = DeadLetters(scratch_redis, RETENTION_S, 1000, Quota(0, 2))
    job_id = dead_letter(store, "key:o", {"inputs": {"text": "z" * 3000}})
    dead.add(job_id, "cpu", WEBHOOK_FAILED, owner="key:o", delivery_id=f"msg_{job_id}", error={"code": "x"})
    entry = dead.get(job_id)
    assert entry["reason"] == WEBHOOK_FAILED and entry["_request"] is None
    count, size = held(scratch_redis, "key:o")
    assert count == 1 and size < 1000  # charged for what it keeps now, not the request it replaced
    for n in range(3):
        dead.add(f"{n:032x}", "cpu", WEBHOOK_FAILED, owner="key:o", delivery_id=f"msg_{n}")
    assert held(scratch_redis, "key:o")[0] == 2 and not dead.get(job_id)


def test_a_dead_letter_keeps_its_submission(scratch_redis):
    store = store_with(scratch_redis)
    now = time.time()
    work = {
        "inputs": [{"text": "a"}, {"text": "b"}],
        "parameters": {"max_length": 5},
        "priority": "low",
        "submitted_at": now,
        "deadline": now + 2.5,
        "encoding_format": "base64",
        "batch": True,
        "autoload": True,
    }
    hook = orjson.dumps({"url": "https://example.com/h", "owner": "key:k"}).decode()
    job_id = dead_letter(store, "key:k", work, webhook=hook, ttl=120)
    entry = DeadLetters(scratch_redis, RETENTION_S, 1000).get(job_id)
    assert entry["role"] == "user" and entry["kind"] == "inference" and entry["replayable"]
    assert "task" not in orjson.loads(entry["_request"])  # the submission, not the Celery message that carried it
    submission = Submission.from_entry(entry)
    assert submission == Submission(
        kind="inference",
        model_id="m",
        owner="key:k",
        role="user",
        lane="low",
        inputs=work["inputs"],
        parameters={"max_length": 5},
        batch=True,
        timeout_s=pytest.approx(2.5),
        encoding_format="base64",
        result_ttl=120,
        webhook_url="https://example.com/h",
    )
    ended = dead_letter(store, "key:admin", {"device": "cpu", "force": True}, task=UNLOAD_MODEL, kind="unload")
    unload = Submission.from_entry(DeadLetters(scratch_redis, RETENTION_S, 1000).get(ended))
    assert unload.kind == "unload" and unload.force and unload.inputs is None


def test_a_dead_letter_written_before_this_shape_is_not_replayable(scratch_redis):
    legacy = "ab" * 16
    payload = requeue_payload(INFER, "cpu", {"model_id": "m", "jobs": [{"job_id": legacy, "inputs": {"text": "x"}}]})
    scratch_redis.hset(
        dead_entry_key(legacy),
        mapping={"job_id": legacy, "queue": "cpu", "reason": POISON, "dead_at": time.time(), "payload": payload},
    )
    scratch_redis.zadd(dead_letter_key("cpu"), {legacy: time.time()})
    scratch_redis.sadd("aethercore:dead-queues", "cpu")
    dead = DeadLetters(scratch_redis, RETENTION_S, 1000)
    assert [e["replayable"] for e in dead.list()] == [False]
    with pytest.raises(NotReplayable, match="older version"):
        Submission.from_entry(dead.get(legacy))


def test_a_new_key_past_its_owners_most_is_refused_and_a_replay_never(scratch_redis):
    store = store_with(scratch_redis, max_keys=2)

    def create(key: str, fingerprint: str = "fp") -> dict:
        record = idempotency_key("key:k", key)
        return store.records.create(
            kind="inference", model_id="m", device="cpu", idempotency=(record, fingerprint, 60, "key:k")
        )

    first, _second = create("a"), create("b")
    with pytest.raises(QuotaExceeded) as refused:
        create("c")
    assert refused.value.reason == "owner_count" and not scratch_redis.exists(idempotency_key("key:k", "c"))
    with pytest.raises(IdempotencyConflict) as same:
        create("a")  # a replay of a key it holds: never refused
    assert same.value.job_id == first["job_id"]
    assert held(scratch_redis, "key:k", IDEMPOTENCY)[0] == 2
    store.records.release_key(idempotency_key("key:k", "a"), first["job_id"], "key:k")  # freed: it leaves the account
    assert held(scratch_redis, "key:k", IDEMPOTENCY)[0] == 1
    assert create("c")["job_id"]
    expires = scratch_redis.zscore(f"aethercore:holdings:key:k:{IDEMPOTENCY}", idempotency_key("key:k", "c"))
    assert abs(expires - (time.time() + 60)) < 5  # with its record's retention
