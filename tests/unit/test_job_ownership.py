"""The in-flight bookkeeping in the job scripts (tasks/jobs/), run against a real redis-server: who holds a
running job, what the reaper takes over when that worker is gone, and who is charged for the death."""

import time

import orjson
import pytest
import redis

from config.lanes import LANES
from tasks.errors import INTERNAL_ERROR
from tasks.jobs import Jobs
from tasks.jobs.inflight import requeue_payload
from tasks.jobs.lifecycle import JobEnd
from tasks.names import INFER, inflight_key, job_key, lane_list, queued_key, worker_key
from tasks.redis_client import send_now_read_later
from tasks.states import FAILED
from tests.conftest import DB_SCRATCH


@pytest.fixture()
def jobs(scratch_redis):
    return Jobs(scratch_redis, ttl_s=60)


def alive(jobs, *names):
    for name in names:
        jobs.redis.set(worker_key(name), "{}", ex=30)


def start(jobs, worker, job_id):
    payload = requeue_payload(INFER, "cpu", {"model_id": "m", "jobs": [{"job_id": job_id}]})
    return jobs.lifecycle.mark_running(job_id, worker, payload)


def test_a_running_job_is_in_its_workers_inflight_hash_until_it_ends(jobs):
    job = jobs.records.create(kind="inference", model_id="m", device="cpu")
    alive(jobs, "a")
    assert start(jobs, "a", job["job_id"]) == 1
    assert orjson.loads(jobs.inflight.held_by("a")[job["job_id"]])["kwargs"]["jobs"][0]["job_id"] == job["job_id"]
    assert jobs.inflight.holders() == ["a"]
    assert jobs.lifecycle.end_jobs([JobEnd(job["job_id"], FAILED, INTERNAL_ERROR, "y")]) == [True]
    assert jobs.inflight.held_by("a") == {}
    assert not jobs.redis.exists(inflight_key("a"))


def test_a_second_copy_of_a_job_running_on_a_live_worker_is_not_started(jobs):
    job_id = jobs.records.create(kind="inference", model_id="m", device="cpu")["job_id"]
    alive(jobs, "a", "b")
    assert start(jobs, "a", job_id) == 1
    assert start(jobs, "b", job_id) == 0  # a lives: the broker's redelivery is a duplicate
    assert jobs.records.get(job_id)["attempts"] == 1 and jobs.inflight.held_by("b") == {}
    jobs.redis.delete(worker_key("a"))  # a is gone: the next copy takes the job over, and a's entry goes
    assert start(jobs, "b", job_id) == 2
    assert jobs.inflight.held_by("a") == {} and job_id in jobs.inflight.held_by("b")


def test_the_reaper_takes_a_dead_workers_jobs_and_charges_only_a_job_alone_in_its_pass(jobs):
    ids = [jobs.records.create(kind="inference", model_id="m", device="cpu")["job_id"] for _ in range(4)]
    alive(jobs, "dead")
    for job_id in ids:
        start(jobs, "dead", job_id)
    assert jobs.redis.zcard(queued_key("cpu")) == 0  # started: out of the queue's index
    jobs.inflight.mark_forward(ids[:2], alone=False)  # two in a shared pass, one alone, one waiting for the model
    jobs.inflight.mark_forward(ids[2:3], alone=True)
    assert jobs.inflight.reap("dead") == []  # still alive: nothing taken
    jobs.redis.delete(worker_key("dead"))
    taken = {job_id: crashes for job_id, _payload, crashes in jobs.inflight.reap("dead")}
    assert taken == {ids[0]: 0, ids[1]: 0, ids[2]: 1, ids[3]: 0}
    assert jobs.inflight.reap("dead") == []  # once only
    assert jobs.inflight.holders() == [] and not jobs.redis.exists(inflight_key("dead"))
    for job_id in ids:
        fields = jobs.redis.hgetall(job_key(job_id))
        assert fields["status"] == "queued" and "holder" not in fields and "pass" not in fields
        assert orjson.loads(fields["payload"])["kwargs"]["jobs"][0]["job_id"] == job_id
    assert set(jobs.redis.zrange(queued_key("cpu"), 0, -1)) == set(ids)  # found again if the requeue is lost
    alive(jobs, "c")
    assert start(jobs, "c", ids[0]) == 2
    assert "payload" not in jobs.redis.hgetall(job_key(ids[0])) and ids[0] in jobs.inflight.held_by("c")


def test_a_job_that_ended_meanwhile_is_not_taken_over(jobs):
    job_id = jobs.records.create(kind="inference", model_id="m", device="cpu")["job_id"]
    start(jobs, "dead", job_id)
    jobs.redis.hset(job_key(job_id), "status", "succeeded")  # ended, e.g. by a duplicate on another worker
    assert jobs.inflight.reap("dead") == []
    assert not jobs.redis.exists(inflight_key("dead"))


def test_queued_jobs_whose_message_is_lost_are_found_once_the_queue_is_empty(jobs):
    payload = requeue_payload(INFER, "cpu", {"model_id": "m", "jobs": []})
    old = jobs.records.create(kind="inference", model_id="m", device="cpu", payload=payload, now=time.time() - 60)[
        "job_id"
    ]
    fresh = jobs.records.create(kind="inference", model_id="m", device="cpu", payload=payload)["job_id"]
    ended = jobs.records.create(kind="inference", model_id="m", device="cpu", payload=payload, now=time.time() - 60)[
        "job_id"
    ]
    jobs.lifecycle.end_jobs([JobEnd(ended, FAILED, INTERNAL_ERROR, "y")])
    for lane in LANES:  # a lane of the queue still holds messages: nothing can be called lost
        jobs.redis.rpush(lane_list("cpu", lane), "a message")
        assert jobs.inflight.sweep_queued("cpu", stale_s=10) == []
        jobs.redis.delete(lane_list("cpu", lane))
    assert jobs.inflight.sweep_queued("cpu", stale_s=10) == [(old, payload)]
    assert jobs.inflight.sweep_queued("cpu", stale_s=10) == []  # claimed for another 10 s: sent once
    assert set(jobs.redis.zrange(queued_key("cpu"), 0, -1)) == {old, fresh}


def test_a_forward_note_is_in_redis_before_its_answer_is_read(jobs, redis_server):
    """The batcher's note (tasks/jobs/inflight.py `note_forward`) goes out ahead of the pass without waiting: Redis
    has it while the pass would run, its answer is read after, and the connection then serves other commands."""
    ids = [jobs.records.create(kind="inference", model_id="m", device="cpu")["job_id"] for _ in range(2)]
    alive(jobs, "w")
    for job_id in ids:
        start(jobs, "w", job_id)
    read = jobs.inflight.note_forward(ids, alone=False)
    other = redis.Redis.from_url(redis_server.url(DB_SCRATCH), decode_responses=True)  # a connection of its own
    deadline = time.monotonic() + 2
    while [other.hget(job_key(i), "pass") for i in ids] != ["shared", "shared"]:
        assert time.monotonic() < deadline, "the note did not reach Redis before its answer was read"
        time.sleep(0.001)
    assert read() == [1, 1]
    assert jobs.redis.ping() and jobs.records.get(ids[0])["status"] == "running"


def test_an_error_reply_to_a_note_is_raised_and_its_connection_not_reused(scratch_redis):
    scratch_redis.set("not-a-hash", "x")
    read = send_now_read_later(scratch_redis, [("HSET", "not-a-hash", "pass", "alone"), ("PING",)])
    with pytest.raises(redis.ResponseError):
        read()
    assert scratch_redis.get("not-a-hash") == "x"  # not PING's unread answer: that connection was dropped
