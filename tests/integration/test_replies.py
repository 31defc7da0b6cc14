"""The API process's reply listener, against the real Redis: woken by the job's end, and never stuck when
the wake-up message is lost."""

import threading
import time

import orjson
import redis

from submission.replies import ReplyListener
from tasks.errors import CANCELLED as CANCELLED_CODE
from tasks.jobs import Jobs
from tasks.jobs.lifecycle import JobEnd
from tasks.names import reply_channel
from tasks.states import CANCELLED, SUCCEEDED
from tests.conftest import DB_MISC


def store(redis_server) -> Jobs:
    return Jobs(redis.Redis.from_url(redis_server.url(DB_MISC), decode_responses=True), 60)


def test_the_end_of_a_job_wakes_its_waiter_with_the_published_result(redis_server):
    jobs = store(redis_server)
    listener = ReplyListener(jobs.redis, jobs.records)
    job = jobs.records.create(kind="inference", model_id="m", device="cpu", job_id="a" * 32, notify=listener.channel)
    waiter = listener.expect(job["job_id"])
    threading.Timer(
        0.2, lambda: jobs.lifecycle.end_jobs([JobEnd(job["job_id"], SUCCEEDED, result={"output": {"x": 1}})])
    ).start()
    started = time.monotonic()
    ended = listener.wait(waiter, job, 10)
    assert ended["status"] == "succeeded" and ended["result"] == {"output": {"x": 1}}
    assert ended["created_at"] == job["created_at"]  # what the API knew, merged with the ending fields
    assert time.monotonic() - started < 1.0  # woken by the message, not by the once-a-second re-read


def test_a_batch_that_ends_together_wakes_all_its_waiters_with_one_message(redis_server):
    jobs = store(redis_server)
    listener = ReplyListener(jobs.redis, jobs.records)
    created = [
        jobs.records.create(kind="inference", model_id="m", device="cpu", job_id=f"{i}" * 32, notify=listener.channel)
        for i in range(3)
    ]
    waiters = [listener.expect(job["job_id"]) for job in created]
    outcomes = [
        JobEnd(
            job["job_id"],
            SUCCEEDED,
            result={"output": {"x": i}},
            note=orjson.dumps({"job_id": job["job_id"], "status": SUCCEEDED, "finished_at": time.time()}),
        )
        for i, job in enumerate(created)
    ]
    threading.Timer(0.2, lambda: jobs.lifecycle.end_jobs(outcomes)).start()
    started = time.monotonic()
    ended = [listener.wait(waiter, job, 10) for waiter, job in zip(waiters, created, strict=True)]
    assert [job["result"] for job in ended] == [{"output": {"x": i}} for i in range(3)]
    assert time.monotonic() - started < 1.0  # all woken by the one message, none by the re-read


def test_a_lost_wake_up_costs_at_most_the_recheck_interval(redis_server):
    jobs = store(redis_server)
    listener = ReplyListener(jobs.redis, jobs.records)
    # The job names no reply channel, so its end publishes nothing: as if the message had been lost.
    job = jobs.records.create(kind="inference", model_id="m", device="cpu", job_id="b" * 32)
    waiter = listener.expect(job["job_id"])
    threading.Timer(
        0.2, lambda: jobs.lifecycle.end_jobs([JobEnd(job["job_id"], CANCELLED, CANCELLED_CODE, "x")])
    ).start()
    started = time.monotonic()
    ended = listener.wait(waiter, job, 10)
    assert ended["status"] == "cancelled" and ended["error"]["code"] == "cancelled"
    assert time.monotonic() - started < 3.0


def test_a_waiter_on_a_job_submitted_elsewhere_is_woken_through_watch(redis_server):
    jobs = store(redis_server)
    listener = ReplyListener(jobs.redis, jobs.records)
    job = jobs.records.create(
        kind="inference", model_id="m", device="cpu", job_id="c" * 32, notify=reply_channel("other")
    )
    waiter = listener.expect(job["job_id"])
    current = jobs.events.watch(job["job_id"], listener.channel)  # what GET /jobs/{id}?wait does
    assert current["status"] == "queued"
    threading.Timer(
        0.2, lambda: jobs.lifecycle.end_jobs([JobEnd(job["job_id"], SUCCEEDED, result={"output": 2})])
    ).start()
    started = time.monotonic()
    assert listener.wait(waiter, current, 10)["result"] == {"output": 2}
    assert time.monotonic() - started < 1.0
