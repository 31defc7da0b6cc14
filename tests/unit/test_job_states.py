"""The job state machine in the Lua scripts (tasks/jobs/), run against a real redis-server: what each
transition allows, that a job ends once, what a waiting API process is told, and what a follower's stream gets."""

import json

import numpy as np
import pytest

from tasks.errors import CANCELLED as CANCELLED_CODE
from tasks.errors import INTERNAL_ERROR
from tasks.jobs import Jobs
from tasks.jobs.events import CHUNK_APPENDED, CHUNK_CANCELLED, CHUNK_NOT_RUNNING, CHUNK_SKIPPED
from tasks.jobs.inflight import requeue_payload
from tasks.jobs.lifecycle import JobEnd
from tasks.names import INFER, job_events_key, job_key, queued_key, worker_key
from tasks.results import compact, expand
from tasks.states import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED


@pytest.fixture()
def jobs(scratch_redis):
    return Jobs(scratch_redis, ttl_s=120)


def new(jobs, **kwargs):
    return jobs.records.create(kind="inference", model_id="m", device="cpu", **kwargs)["job_id"]


def run(jobs, job_id, worker="w"):
    jobs.redis.set(worker_key(worker), "{}", ex=30)
    return jobs.lifecycle.mark_running(job_id, worker, requeue_payload(INFER, "cpu", {"model_id": "m", "jobs": []}))


def end(jobs, job_id, status, code=None, **end):
    [ended] = jobs.lifecycle.end_jobs([JobEnd(job_id, status, code, **end)])
    return ended


def events(jobs, job_id):
    return [e for _id, e in jobs.redis.xrange(job_events_key(job_id))]


def test_queued_then_running_then_ended_once(jobs):
    job_id = new(jobs)
    assert jobs.records.get(job_id)["status"] == QUEUED and jobs.redis.zscore(queued_key("cpu"), job_id) is not None
    assert run(jobs, job_id) == 1
    job = jobs.records.get(job_id)
    assert job["status"] == RUNNING and job["worker"] == "w" and job["attempts"] == 1
    assert end(jobs, job_id, SUCCEEDED, result={"output": 1}) is True
    assert end(jobs, job_id, FAILED, INTERNAL_ERROR, message="a second end") is False
    assert run(jobs, job_id, "other") == 0  # an ended job is never started again
    job = jobs.records.get(job_id)
    assert job["status"] == SUCCEEDED and job["result"] == {"output": 1} and job["error"] is None
    assert 0 < jobs.redis.ttl(job_key(job_id)) <= 120


def test_a_job_nobody_follows_has_no_stream_and_a_followed_one_gets_one_done(jobs):
    quiet, followed = new(jobs), new(jobs)
    assert jobs.events.follow(followed) == (QUEUED, False)
    for job_id in (quiet, followed):
        run(jobs, job_id)
        end(jobs, job_id, SUCCEEDED, result={"output": 1})
    assert not jobs.redis.exists(job_events_key(quiet))
    assert [e["type"] for e in events(jobs, followed)] == ["done"]
    assert jobs.events.follow("0" * 32) is None


def test_chunks_are_appended_once_in_order_and_refused_once_cancelled_or_ended(jobs):
    job_id = new(jobs)
    assert jobs.events.append_chunks([(job_id, 0, {"text": "a"})]) == [CHUNK_NOT_RUNNING]  # not started yet
    run(jobs, job_id)
    assert jobs.events.append_chunks([(job_id, 0, {"text": "a"}), (job_id, 1, {"text": "b"})]) == [CHUNK_APPENDED] * 2
    assert jobs.events.append_chunks([(job_id, 0, {"text": "a"})]) == [
        CHUNK_SKIPPED
    ]  # a retry publishing chunk 0 again
    assert jobs.lifecycle.request_cancel(job_id) is True
    assert jobs.events.append_chunks([(job_id, 2, {"text": "c"})]) == [CHUNK_CANCELLED]
    end(jobs, job_id, CANCELLED, CANCELLED_CODE, message="stopped")
    assert [e.get("index") for e in events(jobs, job_id)] == ["0", "1", None]
    assert jobs.records.get(job_id)["chunks"] == 2


def test_cancelling_a_queued_job_ends_it_at_once_and_it_never_runs(jobs):
    job_id = new(jobs)
    assert jobs.lifecycle.request_cancel(job_id) is True
    assert jobs.records.get(job_id)["status"] == CANCELLED
    assert run(jobs, job_id) == 0
    assert jobs.redis.zscore(queued_key("cpu"), job_id) is None  # out of the queue's index


def test_a_waiting_api_process_is_told_the_end_with_the_result_in_the_same_step(jobs):
    job_id = new(jobs)
    pubsub = jobs.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("reply-channel")
    assert jobs.events.watch(job_id, "reply-channel")["status"] == QUEUED
    run(jobs, job_id)
    end(jobs, job_id, SUCCEEDED, result={"output": [1, 2]})
    message = None
    for _ in range(20):  # the first read may only consume the subscription's confirmation
        message = message or pubsub.get_message(timeout=0.1)
    [note] = json.loads(message["data"])  # the notes of the jobs one call ends: one array per channel
    assert note["job_id"] == job_id and note["status"] == SUCCEEDED and note["result"] == {"output": [1, 2]}
    assert jobs.events.watch(job_id, "reply-channel")["status"] == SUCCEEDED  # ended: nothing more to watch


def test_a_job_keeps_its_own_retention_but_not_before_it_ends(jobs):
    job_id = new(jobs, ttl=5)
    assert jobs.redis.ttl(job_key(job_id)) > 5  # queued: kept however short its retention
    run(jobs, job_id)
    assert jobs.redis.ttl(job_key(job_id)) > 5
    end(jobs, job_id, SUCCEEDED, result={"output": 1})
    assert 0 < jobs.redis.ttl(job_key(job_id)) <= 5


def test_results_keep_float_arrays_as_float32_bytes():
    body = {"output": {"embedding": np.linspace(-1, 1, 384, dtype=np.float32), "label": "x", "n": [1, 2]}}
    stored = compact(body)
    assert isinstance(stored["output"]["embedding"], dict) and len(json.dumps(stored)) < 2200
    back = expand(json.loads(json.dumps(stored)))
    assert back["output"]["label"] == "x" and back["output"]["n"] == [1, 2]
    np.testing.assert_array_equal(back["output"]["embedding"], body["output"]["embedding"])
