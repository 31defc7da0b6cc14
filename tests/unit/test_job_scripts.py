"""Each Lua script of the job store (tasks/jobs/lua/*.lua, as tasks/jobs/scripts.py renders it) run directly against
the real Redis with its KEYS and ARGV, and its writes read back: what creates a job, what moves it, what ends it.
The scripts the reaper and a job's readers run are in test_job_scripts_reaper.py."""

from __future__ import annotations

import time

import orjson
import pytest
import redis

from tasks.deadletters import POISON, limits_arg
from tasks.errors import INTERNAL_ERROR, error_body
from tasks.holdings import DEAD_LETTERS, DELIVERIES, IDEMPOTENCY, Holdings, Quota
from tasks.jobs import scripts
from tasks.names import (
    INFLIGHT_HOLDERS,
    RECENT_JOBS,
    WEBHOOKS_DUE,
    dead_entry_key,
    dead_letter_key,
    idempotency_key,
    inflight_key,
    job_events_key,
    job_key,
    queued_key,
    rate_limit_key,
    webhook_delivery_key,
    worker_key,
)
from tasks.states import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED

OWNER = "key:owner"


def job(client: redis.Redis, job_id: str, status: str = QUEUED, **fields: str) -> str:
    """A job's hash as create_limited.lua writes it (the queued ones in their queue's index, with a payload)."""
    client.hset(job_key(job_id), mapping={"job_id": job_id, "status": status, "device": "cpu", **fields})
    if status == QUEUED:
        client.hset(job_key(job_id), "payload", "queue me")
        client.zadd(queued_key("cpu"), {job_id: time.time()})
    return job_id


def held(client: redis.Redis, owner: str, kind: str) -> int:
    return Holdings(client, {}).usage(owner)[kind].count


# -- create_limited.lua ---------------------------------------------------------------------------------------
def create_limited(client, job_id, limits=(), idempotency=None, max_keys=0):
    """KEYS: job, recent, queue index, counters, [key]; ARGV: ttl, now, id, n, limits, idempotency, fields."""
    script = client.register_script(scripts.CREATE_LIMITED)
    keys = [job_key(job_id), RECENT_JOBS, queued_key("cpu"), *(key for key, _a, _w in limits)]
    args = [60, repr(time.time()), job_id, len(limits)] + [v for _k, amount, window in limits for v in (amount, window)]
    if idempotency:
        keys.append(idempotency[0])
        args += [idempotency[1], 600, OWNER, max_keys]
    else:
        args += ["", "", "", ""]
    return script(keys=keys, args=args + ["job_id", job_id, "status", QUEUED, "device", "cpu"])


def test_create_limited_counts_the_limits_and_writes_the_job_until_a_limit_is_reached(scratch_redis):
    counter = rate_limit_key("caller", 2, 60)
    assert create_limited(scratch_redis, "a", [(counter, 2, 60)]) == [1, 1]
    assert scratch_redis.hgetall(job_key("a")) == {"job_id": "a", "status": QUEUED, "device": "cpu"}
    assert scratch_redis.ttl(job_key("a")) > 60  # kept KEEP_UNFINISHED_S until it ends, whatever its retention
    assert scratch_redis.zscore(RECENT_JOBS, "a") and scratch_redis.zscore(queued_key("cpu"), "a")
    assert create_limited(scratch_redis, "b", [(counter, 2, 60)]) == [1, 2]
    refused = create_limited(scratch_redis, "c", [(counter, 2, 60)])
    assert refused[:2] == [0, 1] and 0 < refused[2] <= 60_000  # the limit's index, ms until its window ends
    assert not scratch_redis.exists(job_key("c")) and scratch_redis.get(counter) == "2"
    assert 0 < scratch_redis.ttl(counter) <= 60


def test_create_limited_takes_an_idempotency_key_with_the_job_and_charges_it(scratch_redis):
    record = idempotency_key(OWNER, "k")
    assert create_limited(scratch_redis, "a", idempotency=(record, "fp")) == [1]
    assert scratch_redis.get(record) == "fp a" and 0 < scratch_redis.ttl(record) <= 600
    assert held(scratch_redis, OWNER, IDEMPOTENCY) == 1
    assert create_limited(scratch_redis, "b", idempotency=(record, "fp")) == [2, "a"]  # the same request: its job
    assert create_limited(scratch_redis, "b", idempotency=(record, "other")) == [3, "a"]  # another request
    assert not scratch_redis.exists(job_key("b"))
    scratch_redis.delete(job_key("a"))  # its job's retention ended: the key is free again
    assert create_limited(scratch_redis, "b", idempotency=(record, "fp")) == [1]
    assert scratch_redis.get(record) == "fp b"
    refused = create_limited(scratch_redis, "c", idempotency=(idempotency_key(OWNER, "new"), "fp"), max_keys=1)
    assert refused[0] == 4 and refused[1] < 0  # past the owner's most keys: nothing taken, nothing created
    assert not scratch_redis.exists(job_key("c")) and not scratch_redis.exists(idempotency_key(OWNER, "new"))


# -- create_many_push.lua -------------------------------------------------------------------------------------
def create_many_push(client, job_ids, amount):
    """KEYS: recent, queue index, broker list, per job its key and counter; ARGV: message, count, per job its own."""
    script = client.register_script(scripts.CREATE_MANY_PUSH)
    counter = rate_limit_key("caller", amount, 60)
    keys, args = [RECENT_JOBS, queued_key("cpu"), "broker-list"], ["the message", len(job_ids)]
    for job_id in job_ids:
        keys += [job_key(job_id), counter]
        args += [job_id, repr(time.time()), 60, 1, amount, 60, 2, "job_id", job_id, "status", QUEUED]
    return script(keys=keys, args=args), counter


def test_create_many_push_writes_nothing_when_one_job_is_over_its_limit(scratch_redis):
    (created, verdicts), counter = create_many_push(scratch_redis, ["a", "b"], amount=1)
    assert created == 0 and verdicts[0] == [] and verdicts[1][0] == 1  # the first counts against the second
    assert not scratch_redis.exists(job_key("a"), job_key("b"), counter, "broker-list")


def test_create_many_push_creates_every_job_and_pushes_their_one_message(scratch_redis):
    (created, used), counter = create_many_push(scratch_redis, ["a", "b"], amount=2)
    assert created == 1 and used == [[1], [2]]
    assert [scratch_redis.hget(job_key(j), "status") for j in "ab"] == [QUEUED, QUEUED]
    assert scratch_redis.lrange("broker-list", 0, -1) == ["the message"]
    assert scratch_redis.zcard(RECENT_JOBS) == scratch_redis.zcard(queued_key("cpu")) == 2
    assert scratch_redis.get(counter) == "2" and scratch_redis.ttl(counter) > 0


# -- release_key.lua ------------------------------------------------------------------------------------------
def test_release_key_frees_only_a_key_that_still_names_the_job(scratch_redis):
    record = idempotency_key(OWNER, "k")
    create_limited(scratch_redis, "a", idempotency=(record, "fp"))
    release = scratch_redis.register_script(scripts.RELEASE_KEY)
    assert release(keys=[record], args=["someone-else", OWNER]) == 0
    assert scratch_redis.exists(record) and held(scratch_redis, OWNER, IDEMPOTENCY) == 1
    assert release(keys=[record], args=["a", OWNER]) == 1
    assert not scratch_redis.exists(record) and held(scratch_redis, OWNER, IDEMPOTENCY) == 0


# -- transition.lua -------------------------------------------------------------------------------------------
def transition(client, *calls):
    """KEYS: each job's hash and stream; ARGV: the number of jobs, then per job its count and arguments."""
    script = client.register_script(scripts.TRANSITION)
    keys, args = [], [len(calls)]
    for job_id, job_args in calls:
        keys += [job_key(job_id), job_events_key(job_id)]
        args += [len(job_args), *job_args]
    return script(keys=keys, args=args)


def running(worker):
    return [RUNNING, 60, "status", "", worker, "how to queue it", "started_at", repr(time.time()), "worker", worker]


def done(status, note="", dead="", **fields):
    spec = limits_arg(600, 100, Quota()) if dead else ""
    return [status, 60, "done", note, dead, spec, *(v for pair in fields.items() for v in pair)]


def test_running_takes_a_queued_job_into_its_workers_inflight_hash(scratch_redis):
    job(scratch_redis, "a")
    scratch_redis.set(worker_key("w1"), "{}")
    assert transition(scratch_redis, ("a", running("w1")), ("gone", running("w1"))) == [1, -1]
    fields = scratch_redis.hgetall(job_key("a"))
    assert fields["status"] == RUNNING and fields["holder"] == "w1" and fields["attempts"] == "1"
    assert "payload" not in fields and scratch_redis.zscore(queued_key("cpu"), "a") is None
    assert scratch_redis.hgetall(inflight_key("w1")) == {"a": "how to queue it"}
    assert scratch_redis.smembers(INFLIGHT_HOLDERS) == {"w1"}
    assert transition(scratch_redis, ("a", running("w2"))) == [0]  # w1 lives: a duplicate is not started
    scratch_redis.delete(worker_key("w1"))
    assert transition(scratch_redis, ("a", running("w2"))) == [2]  # w1 is gone: w2 takes it over
    assert scratch_redis.hgetall(inflight_key("w1")) == {} and "a" in scratch_redis.hgetall(inflight_key("w2"))


def test_done_ends_a_job_once_leaves_its_holder_and_wakes_its_waiters_with_one_array(scratch_redis):
    job(scratch_redis, "a", RUNNING, holder="w1", notify="chan-1,chan-2", followed="1", ttl="30")
    job(scratch_redis, "b", RUNNING, holder="w1", notify="chan-1")
    scratch_redis.hset(inflight_key("w1"), mapping={"a": "p", "b": "p"})
    pubsub = scratch_redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("chan-1", "chan-2")
    error = orjson.dumps(error_body(INTERNAL_ERROR, "x")).decode()
    note = orjson.dumps({"job_id": "a", "status": SUCCEEDED}).decode()
    ends = [("a", done(SUCCEEDED, note, result='{"output":1}')), ("b", done(FAILED, '{"job_id":"b"}', error=error))]
    assert transition(scratch_redis, *ends) == [1, 1]
    fields = scratch_redis.hgetall(job_key("a"))
    assert fields["status"] == SUCCEEDED and fields["result"] == '{"output":1}' and "holder" not in fields
    assert scratch_redis.hgetall(inflight_key("w1")) == {}
    assert 0 < scratch_redis.ttl(job_key("a")) <= 30  # its own retention; b the call's
    assert [e["type"] for _id, e in scratch_redis.xrange(job_events_key("a"))] == ["done"]  # followed
    assert not scratch_redis.exists(job_events_key("b"))  # nobody followed it and it streamed nothing
    messages = {}
    for _ in range(40):
        message = pubsub.get_message(timeout=0.05)
        if message:
            messages[message["channel"]] = orjson.loads(message["data"])
    assert [n["job_id"] for n in messages["chan-1"]] == ["a", "b"]  # one message per channel, every note in it
    assert messages["chan-2"] == [{"job_id": "a", "status": SUCCEEDED, "result": {"output": 1}, "error": None}]
    assert messages["chan-1"][1]["error"] == error_body(INTERNAL_ERROR, "x")
    assert transition(scratch_redis, ("a", done(FAILED, error=error))) == [0]  # ended once
    assert scratch_redis.hget(job_key("a"), "status") == SUCCEEDED


def test_done_makes_a_webhook_delivery_due_and_charges_the_hooks_owner(scratch_redis):
    hook = orjson.dumps({"url": "https://example.com/h", "owner": "key:hooker"}).decode()
    job(scratch_redis, "a", RUNNING, webhook=hook, owner=OWNER)
    assert transition(scratch_redis, ("a", done(SUCCEEDED))) == [1]
    delivery = scratch_redis.hgetall(webhook_delivery_key("msg_a"))
    assert delivery == {"kind": "job", "ref": "a", "webhook": hook, "event": SUCCEEDED, "queue": "cpu"}
    assert scratch_redis.zrange(WEBHOOKS_DUE, 0, -1, withscores=True) == [("msg_a", 0.0)]
    assert held(scratch_redis, "key:hooker", DELIVERIES) == 1 and held(scratch_redis, OWNER, DELIVERIES) == 0


def test_done_with_a_reason_writes_the_dead_letter_with_the_jobs_payload(scratch_redis):
    job(scratch_redis, "a", RUNNING, holder="w1", owner=OWNER, kind="inference", model_id="m")
    work = {"job_id": "a", "inputs": {"text": "x"}}
    payload = orjson.dumps({"task": "t", "queue": "cpu", "kwargs": {"model_id": "m", "jobs": [work]}}).decode()
    scratch_redis.hset(inflight_key("w1"), "a", payload)
    error = orjson.dumps(error_body(INTERNAL_ERROR, "killed")).decode()
    assert transition(scratch_redis, ("a", done(FAILED, dead=POISON, error=error))) == [1]
    entry = scratch_redis.hgetall(dead_entry_key("a"))
    assert entry["reason"] == POISON and entry["owner"] == OWNER and orjson.loads(entry["request"]) == work
    assert scratch_redis.zscore(dead_letter_key("cpu"), "a") is not None
    assert held(scratch_redis, OWNER, DEAD_LETTERS) == 1


def test_a_broken_record_is_its_own_jobs_outcome_and_a_refused_write_fails_the_call(scratch_redis):
    job(scratch_redis, "a", RUNNING)
    scratch_redis.set(job_key("broken"), "not a hash")
    broken, ended = transition(scratch_redis, ("broken", done(SUCCEEDED)), ("a", done(SUCCEEDED)))
    assert broken[0] == scripts.BROKEN and "WRONGTYPE" in broken[1] and ended == 1
    job(scratch_redis, "b", RUNNING)
    scratch_redis.config_set("maxmemory", 1)  # Redis refuses writes (OOM): the call fails, the caller retries it
    try:
        with pytest.raises(redis.ResponseError, match="OOM"):
            transition(scratch_redis, ("b", done(SUCCEEDED)))
    finally:
        scratch_redis.config_set("maxmemory", 0)
    assert scratch_redis.hget(job_key("b"), "status") == RUNNING


# -- request_cancel.lua ---------------------------------------------------------------------------------------
def test_request_cancel_ends_queued_jobs_asks_running_ones_and_leaves_ended_ones(scratch_redis):
    cancel = scratch_redis.register_script(scripts.REQUEST_CANCEL)
    job(scratch_redis, "queued")
    job(scratch_redis, "running", RUNNING)
    job(scratch_redis, "ended", CANCELLED)
    outcomes = [cancel(keys=[job_key(j)]) for j in ("queued", "running", "ended", "gone")]
    assert outcomes == [2, 1, 0, -1]
    assert scratch_redis.hget(job_key("running"), "cancel_requested") == "1"
    assert scratch_redis.hget(job_key("queued"), "status") == QUEUED  # the caller ends it (Lifecycle.end_jobs)
