"""Flat-combined publishing on its own (a recording stand-in for Celery's send_task), and the jobs of a group
created with their message in one Lua step (against the test's Redis)."""

import base64
import json
import threading
import time

import pytest

from submission.dispatch import InferenceDispatcher
from tasks.jobs.records import RateLimited, Records
from tasks.names import job_key, lane_list, queued_key, rate_limit_key


class RecordingCelery:
    def __init__(self, delay: float = 0.0) -> None:
        self.messages = []
        self.delay = delay

    def send_task(self, name, kwargs, queue, task_id, kwargsrepr, priority=0, headers=None):
        time.sleep(self.delay)
        self.messages.append((queue, [j["job_id"] for j in kwargs["jobs"]], task_id))


def publish_concurrently(dispatcher, count):
    threads = [
        threading.Thread(target=dispatcher.publish, args=("m", "cpu", {"job_id": f"j{i}"})) for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)


def test_a_lone_submission_leaves_at_once_from_its_own_thread():
    celery = RecordingCelery()
    dispatcher = InferenceDispatcher(celery, linger_ms=1000, in_flight=lambda: 1)
    started = time.monotonic()
    dispatcher.publish("m", "cpu", {"job_id": "only"})
    assert time.monotonic() - started < 0.5  # no linger at low load
    assert celery.messages == [("cpu", ["only"], "only")]  # one job: the message carries its id


def test_under_load_submissions_leave_together():
    celery = RecordingCelery()
    dispatcher = InferenceDispatcher(celery, linger_ms=200, in_flight=lambda: 16)
    publish_concurrently(dispatcher, 12)
    sent = [job for _queue, jobs, _id in celery.messages for job in jobs]
    assert sorted(sent) == sorted(f"j{i}" for i in range(12))  # every job exactly once
    assert len(celery.messages) <= 3


def test_submissions_queue_behind_a_slow_publish_even_without_linger():
    celery = RecordingCelery(delay=0.1)
    dispatcher = InferenceDispatcher(celery, linger_ms=0)
    publish_concurrently(dispatcher, 8)
    assert sorted(j for _q, jobs, _i in celery.messages for j in jobs) == sorted(f"j{i}" for i in range(8))
    assert len(celery.messages) < 8


def test_each_lane_leaves_in_its_own_message_on_its_own_list(scratch_redis):
    dispatcher = InferenceDispatcher(RecordingCelery(), jobs=Records(scratch_redis, 60))
    for lane in ("low", "high", "normal"):
        dispatcher.publish("m", "cpu", {"job_id": lane}, lane=lane)
    for lane in ("high", "normal", "low"):
        (message,) = scratch_redis.lrange(lane_list("cpu", lane), 0, -1)
        assert f'"task":"aethercore.infer","id":"{lane}"' in message


def message_job_ids(raw):
    body = json.loads(base64.b64decode(json.loads(raw)["body"]))
    return [job["job_id"] for job in body[1]["jobs"]]


def entry(job_id, limits=()):
    return {
        "kind": "inference",
        "model_id": "m",
        "device": "cpu",
        "job_id": job_id,
        "now": time.time(),
        "ttl": None,
        "limits": list(limits),
    }


def submit_concurrently(dispatcher, job_ids, limits=()):
    outcome = {}

    def one(job_id):
        try:
            outcome[job_id] = dispatcher.publish("m", "cpu", {"job_id": job_id}, record=entry(job_id, limits))
        except RateLimited as exc:
            outcome[job_id] = exc

    threads = [threading.Thread(target=one, args=(job_id,)) for job_id in job_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    return outcome


def test_a_group_is_created_and_queued_in_one_step(scratch_redis):
    dispatcher = InferenceDispatcher(
        RecordingCelery(), linger_ms=200, in_flight=lambda: 16, jobs=Records(scratch_redis, 60)
    )
    ids = [f"g{i}" for i in range(10)]
    outcome = submit_concurrently(dispatcher, ids)
    assert all(outcome[job_id][0]["job_id"] == job_id and outcome[job_id][0]["status"] == "queued" for job_id in ids)
    messages = scratch_redis.lrange(lane_list("cpu", "normal"), 0, -1)
    assert len(messages) < 10  # lingering under load: they left together
    assert sorted(j for raw in messages for j in message_job_ids(raw)) == sorted(ids)  # each once
    for job_id in ids:  # and each record exists, indexed as unstarted on its device
        assert scratch_redis.hget(job_key(job_id), "status") == "queued"
        assert scratch_redis.zscore(queued_key("cpu"), job_id) is not None


def test_a_job_over_its_rate_limit_is_neither_created_nor_queued(scratch_redis):
    dispatcher = InferenceDispatcher(
        RecordingCelery(), linger_ms=200, in_flight=lambda: 16, jobs=Records(scratch_redis, 60)
    )
    counter = rate_limit_key("caller", 6, 60)
    ids = [f"r{i}" for i in range(9)]
    outcome = submit_concurrently(dispatcher, ids, limits=[(counter, 6, 60)])
    created = [job_id for job_id in ids if not isinstance(outcome[job_id], RateLimited)]
    refused = [job_id for job_id in ids if isinstance(outcome[job_id], RateLimited)]
    assert len(created) == 6 and len(refused) == 3
    assert sorted(used for job_id in created for used in outcome[job_id][1]) == [1, 2, 3, 4, 5, 6]
    assert all(outcome[job_id].retry_after_s >= 1 for job_id in refused)
    queued = [j for raw in scratch_redis.lrange(lane_list("cpu", "normal"), 0, -1) for j in message_job_ids(raw)]
    assert sorted(queued) == sorted(created)
    assert not any(scratch_redis.exists(job_key(job_id)) for job_id in refused)
    assert int(scratch_redis.get(counter)) == 6


def test_a_job_created_before_shares_the_message_of_those_created_with_it(scratch_redis):
    store = Records(scratch_redis, 60)
    store.create(kind="inference", model_id="m", device="cpu", job_id="early")
    outcome = store.create_and_push(
        "cpu",
        lane_list("cpu", "normal"),
        [entry("late")],
        lambda live: json.dumps({"ids": ["early"] + [["late"][at] for at in live]}),
    )
    assert outcome[0][0]["job_id"] == "late"
    assert scratch_redis.lrange(lane_list("cpu", "normal"), 0, -1) == ['{"ids": ["early", "late"]}']


@pytest.mark.parametrize("limit", [0, 1])
def test_every_job_refused_leaves_nothing_behind(scratch_redis, limit):
    store = Records(scratch_redis, 60)
    counter = rate_limit_key("caller", limit or 1, 60)
    if limit:
        scratch_redis.set(counter, 1, ex=60)  # its window already used up
    entries = [entry("only", [(counter, 1, 60)])] if limit else []
    outcome = store.create_and_push("cpu", "cpu", entries, lambda live: None if not live else b"message")
    assert [type(o) for o in outcome] == ([RateLimited] if limit else [])
    assert scratch_redis.llen("cpu") == 0 and not scratch_redis.exists(job_key("only"))
