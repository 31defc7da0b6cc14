"""How a job ends (workers/completion.py), against a real redis-server: the typed job context, each kind of end,
the wake note for the waiting API process, the metrics, and how an exception becomes a job's error."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from tasks.errors import INTERNAL_ERROR, INVALID_INPUT, MODEL_EVICTED, MODEL_UNLOADED, error_body
from tasks.jobs import Jobs
from tasks.jobs.inflight import requeue_payload
from tasks.metrics import LocalMetrics
from tasks.names import INFER, inflight_key, job_key
from tasks.states import EXPIRED, FAILED, INFERENCE, SUCCEEDED
from workers.completion import RESULT_WRITE_RETRY_S, Completion, JobContext, classify
from workers.model_errors import ModelGone, evicted, unloaded
from workers.runtimes.base import InvalidInput

SPEC = SimpleNamespace(id="m", task="feature-extraction")


@pytest.fixture()
def jobs(scratch_redis):
    return Jobs(scratch_redis, ttl_s=60)


@pytest.fixture()
def completion(jobs):
    return Completion(jobs.lifecycle, LocalMetrics(), "worker-a", "cpu", threading.Event())


def running(jobs, **job) -> JobContext:
    record = jobs.records.create(kind=INFERENCE, model_id="m", device="cpu", notify="chan")
    work = {"job_id": record["job_id"], "submitted_at": time.time() - 0.5, **job}
    attempts = jobs.lifecycle.mark_running(
        record["job_id"], "worker-a", requeue_payload(INFER, "cpu", {"model_id": "m", "jobs": [work]})
    )
    return JobContext(work, attempts, time.time())


def test_a_success_is_written_once_with_its_result_timings_and_metrics(jobs, completion, scratch_redis):
    ctx = running(jobs)
    ctx.load_ms = 12.5
    pubsub = scratch_redis.pubsub()
    pubsub.subscribe("chan")
    pubsub.get_message(timeout=1)
    ending = completion.succeeded(SPEC, ctx, {"output": {"embedding": np.ones(2, "f4")}}, {"inference_ms": 3.0})
    completion.finish(INFERENCE, "m", [ending])
    job = jobs.records.get(ctx.job_id)
    assert job["status"] == SUCCEEDED and list(job["result"]["output"]["embedding"]) == [1.0, 1.0]
    assert job["result"]["timings"]["load_ms"] == 12.5 and job["result"]["timings"]["queue_ms"] >= 0
    assert not scratch_redis.exists(inflight_key("worker-a"))
    [note] = orjson.loads(pubsub.get_message(timeout=2)["data"])  # a batch's notes go out as one array
    assert note["status"] == SUCCEEDED and note["attempts"] == 1 and note["worker"] == "worker-a"
    taken = completion.metrics.take()
    assert taken  # counted in memory, flushed with the heartbeat
    completion.finish(INFERENCE, "m", [completion.failed(ctx, error_body(INTERNAL_ERROR, "late"))])
    assert jobs.records.get(ctx.job_id)["status"] == SUCCEEDED  # a job ends once


def test_the_jobs_of_a_batch_wake_each_waiting_api_process_with_one_message(jobs, completion, scratch_redis):
    first, second = running(jobs), running(jobs)
    elsewhere = jobs.records.create(kind=INFERENCE, model_id="m", device="cpu", notify="other")
    work = {"job_id": elsewhere["job_id"], "submitted_at": time.time()}
    attempts = jobs.lifecycle.mark_running(
        elsewhere["job_id"], "worker-a", requeue_payload(INFER, "cpu", {"model_id": "m", "jobs": [work]})
    )
    third = JobContext(work, attempts, time.time())
    pubsub = scratch_redis.pubsub()
    pubsub.subscribe("chan", "other")
    for _ in range(2):
        pubsub.get_message(timeout=1)
    output = {"output": {"embedding": np.ones(2, "f4")}}
    endings = [completion.succeeded(SPEC, ctx, output, {"inference_ms": 1.0}) for ctx in (first, second, third)]
    completion.finish(INFERENCE, "m", endings)
    messages = {}
    while (message := pubsub.get_message(timeout=1)) is not None:
        messages.setdefault(message["channel"], []).append(orjson.loads(message["data"]))
    assert [[note["job_id"] for note in notes] for notes in messages["chan"]] == [[first.job_id, second.job_id]]
    assert [[note["job_id"] for note in notes] for notes in messages["other"]] == [[third.job_id]]
    assert all(note["status"] == SUCCEEDED for notes in messages.values() for note in notes[0])


def test_a_failure_and_an_expiry_carry_their_code(jobs, completion):
    failed, late = running(jobs), running(jobs)
    completion.finish(
        INFERENCE,
        "m",
        [
            completion.failed(failed, classify(unloaded("m"))),
            completion.expired(late, error_body("deadline_exceeded", "too late")),
        ],
    )
    assert jobs.records.get(failed.job_id)["status"] == FAILED
    assert jobs.records.get(failed.job_id)["error"]["code"] == MODEL_UNLOADED
    assert jobs.records.get(late.job_id)["status"] == EXPIRED


def test_a_batch_of_ends_is_one_call_and_each_job_ends():
    class Lifecycle:
        calls = []

        def end_jobs(self, ends):
            self.calls.append([end.job_id for end in ends])
            return [True] * len(ends)

    store = Lifecycle()
    completion = Completion(store, LocalMetrics(), "w", "cpu", threading.Event())
    contexts = [JobContext({"job_id": f"j{i}"}, 1, time.time()) for i in range(3)]
    completion.finish(INFERENCE, "m", [completion.failed(c, error_body(INVALID_INPUT, "x")) for c in contexts])
    assert store.calls == [["j0", "j1", "j2"]]


def test_a_damaged_job_record_costs_only_its_own_job_not_its_batch(jobs, completion, scratch_redis):
    """A job whose record breaks the batch's script (here overwritten with a string: WRONGTYPE at its first read)
    would stop it, and every retry of it, for all the jobs after it: the other jobs still end, at once, in the
    same call, and the completion thread goes on."""
    first, broken, last = running(jobs), running(jobs), running(jobs)
    scratch_redis.delete(job_key(broken.job_id))
    scratch_redis.set(job_key(broken.job_id), "not a job record")
    pubsub = scratch_redis.pubsub()
    pubsub.subscribe("chan")
    pubsub.get_message(timeout=1)
    output = {"output": {"embedding": np.ones(2, "f4")}}
    endings = [completion.succeeded(SPEC, ctx, output, {"inference_ms": 1.0}) for ctx in (first, broken, last)]
    started = time.monotonic()
    completion.finish(INFERENCE, "m", endings)
    assert time.monotonic() - started < RESULT_WRITE_RETRY_S / 10  # not held in the retry loop
    assert (
        jobs.records.get(first.job_id)["status"] == SUCCEEDED and jobs.records.get(last.job_id)["status"] == SUCCEEDED
    )
    notes = orjson.loads(pubsub.get_message(timeout=2)["data"])  # still one message for the batch
    assert [note["job_id"] for note in notes] == [first.job_id, last.job_id]


def test_a_damaged_job_record_does_not_stop_the_rest_of_its_message_from_starting(jobs, scratch_redis):
    """Marking a message's jobs running is one script too: the job whose record breaks it is skipped (not
    run, logged), the others start."""
    ids = [jobs.records.create(kind=INFERENCE, model_id="m", device="cpu")["job_id"] for _ in range(3)]
    scratch_redis.delete(job_key(ids[1]))
    scratch_redis.set(job_key(ids[1]), "not a job record")
    payload = requeue_payload(INFER, "cpu", {"model_id": "m", "jobs": []})
    assert jobs.lifecycle.mark_running_many([(job_id, payload) for job_id in ids], "worker-a") == [1, 0, 1]
    assert [jobs.records.get(ids[0])["status"], jobs.records.get(ids[2])["status"]] == ["running", "running"]


def test_the_job_context_reads_its_job():
    ctx = JobContext({"job_id": "j", "batch": True, "isolate": True, "parameters": None}, 2, 1.0)
    assert ctx.job_id == "j" and ctx.is_batch and ctx.isolate and ctx.parameters == {}
    assert not ctx.autoload  # a job without the field may not load a model
    assert JobContext({"job_id": "k", "autoload": True}, 1, 1.0).autoload


def test_an_exception_becomes_the_jobs_error():
    assert classify(InvalidInput("too long"))["code"] == INVALID_INPUT
    assert classify(evicted("m"))["code"] == MODEL_EVICTED
    assert classify(ModelGone(MODEL_UNLOADED, "gone")) == {"code": MODEL_UNLOADED, "message": "gone"}

    class Foreign(Exception):
        code = "ECONNRESET"  # a code of someone else's: not ours to answer with

    assert classify(Foreign("x"))["code"] == INTERNAL_ERROR
    assert classify(ValueError("bug"))["code"] == INTERNAL_ERROR


def test_base64_encoding_reaches_arrays_inside_lists():
    import base64

    completion = Completion(None, LocalMetrics(), "w1", "cpu", threading.Event())
    spec = SimpleNamespace(id="m", task="feature-extraction")
    array = np.array([1.0, 2.0], dtype=np.float32)
    job = {"job_id": "j", "encoding_format": "base64"}
    body = orjson.loads(completion.result_for(spec, job, {"outputs": [{"output": array}, [array]]}, {}))
    encoded = base64.b64encode(array.astype("<f4").tobytes()).decode("ascii")
    assert body["outputs"] == [{"output": encoded}, [encoded]]
