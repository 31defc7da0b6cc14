"""The worker's Celery handlers with stand-ins for Redis and the models: every job they mark running ends."""

import threading
from types import SimpleNamespace

import redis

from tasks.metrics import LocalMetrics
from tasks.states import FAILED, SUCCEEDED
from workers import handlers
from workers.batch_requests import BatchOutcome, Request
from workers.completion import Completion, JobContext
from workers.model_errors import ModelGone
from workers.reaper import ActiveJobs
from workers.service import WorkerService


class RecordingLifecycle:
    def __init__(self):
        self.ended = []

    def mark_running(self, job_id, worker, payload):
        return 1

    def end_jobs(self, ends):
        self.ended += [{"job_id": e.job_id, "status": e.status, "error": {"code": e.code}} for e in ends]
        return [True] * len(ends)


def fake_service():
    jobs = RecordingLifecycle()
    svc = SimpleNamespace(
        name="w1",
        queue="cpu",
        device="cpu",
        jobs=SimpleNamespace(lifecycle=jobs),
        active=ActiveJobs(),
        models={"m": SimpleNamespace(id="m", task="feature-extraction")},
        completion=Completion(jobs, LocalMetrics(), "w1", "cpu", threading.Event()),
    )
    return svc, jobs


def broken_cluster():
    def down(*args, **kwargs):
        raise redis.ConnectionError("redis went away")

    return SimpleNamespace(desire=down, undesire=down, notify=down)


def test_a_load_job_that_hits_an_unexpected_error_ends_failed():
    svc, jobs = fake_service()
    svc.cluster = broken_cluster()
    handlers.bind_service(svc)
    handlers.run_load("j1", "m", "cpu")
    assert [(e["job_id"], e["status"], e["error"]["code"]) for e in jobs.ended] == [("j1", FAILED, "internal_error")]
    assert svc.active.snapshot()[1] == []


def test_an_unload_job_that_hits_an_unexpected_error_ends_failed():
    svc, jobs = fake_service()
    svc.cluster = broken_cluster()
    handlers.bind_service(svc)
    handlers.run_unload("j2", "m", "cpu")
    assert [(e["job_id"], e["status"], e["error"]["code"]) for e in jobs.ended] == [("j2", FAILED, "internal_error")]


def test_one_output_that_cannot_be_encoded_fails_only_its_own_job():
    svc, jobs = fake_service()
    service = WorkerService.__new__(WorkerService)
    service.completion = svc.completion
    spec = SimpleNamespace(id="m", task="feature-extraction")
    batch = []
    for job_id, output in (("good", {"x": 1}), ("bad", {"x": object()})):
        request = Request({"text": job_id}, {}, "{}", 4, JobContext({"job_id": job_id}, 1, 0.0))
        request.outcome = BatchOutcome(output, 2, 0.0, 1.0)
        batch.append(request)
    service._complete_batch(spec, batch)
    ended = {e["job_id"]: e for e in jobs.ended}
    assert ended["good"]["status"] == SUCCEEDED
    assert ended["bad"]["status"] == FAILED and ended["bad"]["error"]["code"] == "internal_error"


def test_a_dead_model_is_handled_once_per_runtime():
    dead_runtime, fresh_runtime = SimpleNamespace(), SimpleNamespace()
    calls = []
    resident = {"m": dead_runtime}
    service = WorkerService.__new__(WorkerService)
    service._died_lock = threading.Lock()
    service.cache = SimpleNamespace(
        get=resident.get, unload=lambda model_id: calls.append(("unload", model_id)) or resident.pop(model_id)
    )
    service.residency = SimpleNamespace(model_failed=lambda model_id, message, code: calls.append(("failed", model_id)))
    gone = ModelGone("model_process_died", "the model process died")
    service.model_died("m", dead_runtime, gone)
    service.model_died("m", dead_runtime, gone)  # another of its crashed requests
    resident["m"] = fresh_runtime  # reloaded meanwhile: a late report of the old one leaves it alone
    service.model_died("m", dead_runtime, gone)
    assert calls == [("unload", "m"), ("failed", "m")]
    assert resident["m"] is fresh_runtime


def test_inference_messages_send_flower_events_only_when_asked():
    from celery import Celery

    from tasks.names import INFER, LOAD_MODEL, UNLOAD_MODEL

    for setting, infer_events in (("control", False), ("all", True)):
        app = Celery("t", set_as_current=False)
        handlers.register(app, setting)
        assert app.tasks[INFER].send_events is infer_events
        assert app.tasks[LOAD_MODEL].send_events and app.tasks[UNLOAD_MODEL].send_events
