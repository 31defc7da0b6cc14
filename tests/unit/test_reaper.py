"""The reaper's backstop (workers/reaper.py), against a real redis-server: a job that its live holder keeps in its
in-flight hash but no longer works on is taken back and sent again, and never a job that is being worked on."""

from __future__ import annotations

import time

import orjson
import pytest

from tasks.jobs import Jobs
from tasks.jobs.inflight import requeue_payload
from tasks.names import INFER, active_jobs_key, job_key, worker_key
from tasks.states import FAILED, INFERENCE, QUEUED, RUNNING
from workers.reaper import ActiveJobs, Reaper
from workers.retry import RetryPolicy


@pytest.fixture()
def jobs(scratch_redis):
    return Jobs(scratch_redis, ttl_s=60)


class Sent:
    def __init__(self) -> None:
        self.sent, self.ended = [], []

    def send(self, task, queue, kwargs, job_id):
        self.sent.append((task, queue, job_id, kwargs))

    def finish(self, kind, model_id, endings):
        self.ended += endings


def reaper_for(jobs, sink: Sent, grace_s: float = 0.0, max_attempts: int = 3) -> Reaper:
    return Reaper(
        jobs,
        "reaper",
        "cpu",
        sink.send,
        sink.finish,
        policy=RetryPolicy(max_attempts),
        interval_s=1,
        worker_ttl_s=5,
        grace_s=grace_s,
    )


def start(jobs, holder: str) -> str:
    job = jobs.records.create(kind=INFERENCE, model_id="m", device="cpu")
    work = {"job_id": job["job_id"], "inputs": {"text": "x"}}
    jobs.redis.set(worker_key(holder), "{}", ex=30)  # alive
    assert jobs.lifecycle.mark_running(
        job["job_id"], holder, requeue_payload(INFER, "cpu", {"model_id": "m", "jobs": [work]})
    )
    return job["job_id"]


def publish(jobs, holder: str, active: ActiveJobs) -> None:
    time.sleep(0.01)  # each set is taken strictly after the job started, and each at its own time
    active.publish(jobs.redis, holder, 30)


def test_a_dropped_job_is_reclaimed_after_two_published_sets_miss_it(jobs):
    sink = Sent()
    reaper = reaper_for(jobs, sink)
    job_id = start(jobs, "holder")
    dropped = ActiveJobs()  # the holder's task threads hold nothing
    publish(jobs, "holder", dropped)
    assert reaper.reclaim_dropped(["holder"]) == 0  # one set missing it is not enough
    publish(jobs, "holder", dropped)
    assert reaper.reclaim_dropped(["holder"]) == 1
    record = jobs.redis.hgetall(job_key(job_id))
    assert record["status"] == QUEUED and record["crashes"] == "1" and "holder" not in record
    assert jobs.inflight.held_by("holder") == {}
    ((task, queue, sent_id, kwargs),) = sink.sent
    assert (task, queue, sent_id) == (INFER, "cpu", job_id) and kwargs["jobs"][0]["job_id"] == job_id


def test_a_job_its_holder_works_on_is_never_reclaimed(jobs):
    sink = Sent()
    reaper = reaper_for(jobs, sink)
    active = ActiveJobs()
    with active.holding(["pending"]):
        job_id = start(jobs, "holder")
        with active.holding([job_id]):  # (added before it is marked running in the real worker)
            for _ in range(4):
                publish(jobs, "holder", active)
                assert reaper.reclaim_dropped(["holder"]) == 0
    assert jobs.records.get(job_id)["status"] == RUNNING and sink.sent == []


def test_a_set_taken_before_the_job_started_does_not_count(jobs):
    sink = Sent()
    reaper = reaper_for(jobs, sink)
    empty = ActiveJobs()
    publish(jobs, "holder", empty)
    publish(jobs, "holder", empty)
    start(jobs, "holder")  # started after both sets were taken
    assert reaper.reclaim_dropped(["holder"]) == 0
    assert reaper.reclaim_dropped(["holder"]) == 0  # the same set twice is one set


def test_the_grace_period_holds_a_young_job(jobs):
    sink = Sent()
    reaper = reaper_for(jobs, sink, grace_s=60)
    start(jobs, "holder")
    for _ in range(3):
        publish(jobs, "holder", ActiveJobs())
        assert reaper.reclaim_dropped(["holder"]) == 0


def test_a_holder_that_publishes_no_active_set_is_not_judged(jobs):
    reaper = reaper_for(jobs, Sent())
    start(jobs, "old-version")
    assert jobs.redis.get(active_jobs_key("old-version")) is None
    assert reaper.reclaim_dropped(["old-version"]) == 0


def test_a_job_dropped_again_and_again_ends_as_poison(jobs):
    sink = Sent()
    reaper = reaper_for(jobs, sink, max_attempts=2)
    job_id = start(jobs, "holder")
    for attempt in range(2):
        if attempt:
            payload = orjson.loads(jobs.redis.hget(job_key(job_id), "payload"))
            assert jobs.lifecycle.mark_running(job_id, "holder", orjson.dumps(payload))
        publish(jobs, "holder", ActiveJobs())
        reaper.reclaim_dropped(["holder"])
        publish(jobs, "holder", ActiveJobs())
        reaper.reclaim_dropped(["holder"])
    assert len(sink.sent) == 1
    (ending,) = sink.ended
    assert ending.job_id == job_id and ending.status == FAILED and ending.code == "poison_job"


def test_active_jobs_counts_two_holders_of_one_job():
    active = ActiveJobs()
    with active.holding(["a"]):
        with active.holding(["a", "b"]):
            assert sorted(active.snapshot()[1]) == ["a", "b"]
        assert active.snapshot()[1] == ["a"]
    assert active.snapshot()[1] == []


def test_a_miss_from_an_earlier_run_of_the_job_does_not_count(jobs):
    reaper = reaper_for(jobs, Sent())
    job_id = start(jobs, "holder")
    dropped = ActiveJobs()
    publish(jobs, "holder", dropped)
    assert reaper.reclaim_dropped(["holder"]) == 0  # one miss of this run
    jobs.redis.hset(job_key(job_id), "started_at", repr(time.time()))  # it runs again (a new try)
    publish(jobs, "holder", dropped)
    assert reaper.reclaim_dropped(["holder"]) == 0  # the new run's first miss only
    publish(jobs, "holder", dropped)
    assert reaper.reclaim_dropped(["holder"]) == 1


def test_a_malformed_active_set_does_not_stop_the_pass(jobs):
    reaper = reaper_for(jobs, Sent())
    start(jobs, "broken")
    jobs.redis.set(active_jobs_key("broken"), b"not json", ex=30)
    start(jobs, "holder")
    dropped = ActiveJobs()
    publish(jobs, "holder", dropped)
    assert reaper.reclaim_dropped(["broken", "holder"]) == 0
    publish(jobs, "holder", dropped)
    assert reaper.reclaim_dropped(["broken", "holder"]) == 1
