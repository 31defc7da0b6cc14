"""Flat-combined publishing on its own (a recording stand-in for Celery's send_task)."""

import threading
import time

from api.dispatch import InferenceDispatcher


class RecordingCelery:
    def __init__(self, delay: float = 0.0) -> None:
        self.messages = []
        self.delay = delay

    def send_task(self, name, kwargs, queue, task_id, kwargsrepr, priority=0):
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
    from api.dispatch import InferenceDispatcher
    from tasks.names import lane_list

    dispatcher = InferenceDispatcher(RecordingCelery(), broker_redis=scratch_redis)
    for lane in ("low", "high", "normal"):
        dispatcher.publish("m", "cpu", {"job_id": lane}, lane=lane)
    for lane in ("high", "normal", "low"):
        (message,) = scratch_redis.lrange(lane_list("cpu", lane), 0, -1)
        assert f'"task":"aethercore.infer","id":"{lane}"' in message
