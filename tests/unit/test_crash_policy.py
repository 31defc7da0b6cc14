"""One crash policy per worker (workers/retry.py): the worker service builds it from its settings and hands that
one instance to the batcher, the generation path, the reaper and the task threads; a lost model process is judged
by it the same way on both serving paths, and a batch job's items are gathered by one collector on both.

The worker service is real; a stand-in model (every pass and every generation loses its process, every restart
works) and a recording job store stand in for the model processes and Redis."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import orjson
import pytest

from config.settings import Settings
from tasks.errors import POISON_JOB
from tasks.jobs.lifecycle import JobEnd
from tasks.metrics import LocalMetrics
from tasks.states import FAILED, SUCCEEDED
from workers import handlers
from workers.batch_requests import PoisonInput
from workers.completion import Completion, JobContext
from workers.generation import _Run, run_generation_jobs
from workers.model_errors import ModelProcessDied
from workers.remote_runtime import GenerationCall
from workers.retry import TAKEOVERS_PER_ATTEMPT
from workers.service import WorkerService


class CrashingModel:
    """Stands in for RemoteRuntime: every forward pass and every generation loses its model process."""

    gone = None

    def __init__(self) -> None:
        self.instances = [object()]
        self.passes: list[int] = []  # the size of each forward pass
        self.generations: list[bool] = []  # each generation's `exclusive`
        self.revived = 0

    def check_open(self) -> None:
        pass

    def run_batch_on(self, index, inputs, parameters):
        self.passes.append(len(inputs))
        raise ModelProcessDied("the model process was killed")

    def generate(self, inputs, parameters, stream=None, *, exclusive=False, **options):
        self.generations.append(exclusive)
        future: Future = Future()
        future.set_exception(ModelProcessDied("the model process was killed"))
        return GenerationCall(None, future, exclusive)

    def revive(self, index):
        self.revived += 1
        return True

    def revive_all(self):
        self.revived += 1
        return True


class RecordingInflight:
    def mark_forward(self, job_ids, alone):
        pass

    def note_forward(self, job_ids, alone):
        return lambda: None


class RecordingJobs:
    """Stands in for tasks/jobs.Jobs: records every end written through the one end function."""

    def __init__(self) -> None:
        self.ended: list[JobEnd] = []
        self.inflight = RecordingInflight()
        self.lifecycle = self

    def end_jobs(self, ends):
        self.ended += ends
        return [True] * len(ends)


def worker(max_attempts: int) -> tuple[WorkerService, RecordingJobs]:
    svc = WorkerService(Settings.from_env({}, max_attempts=max_attempts), "w1")
    jobs = RecordingJobs()
    svc.jobs = jobs
    svc.completion = Completion(jobs.lifecycle, LocalMetrics(), "w1", "cpu", threading.Event())
    return svc, jobs


def job(job_id: str, inputs, **fields) -> JobContext:
    return JobContext({"job_id": job_id, "inputs": inputs, "submitted_at": time.time(), **fields}, 1, time.time())


def test_the_worker_service_hands_its_one_policy_to_every_user():
    svc, _ = worker(max_attempts=5)
    assert svc.policy.max_attempts == 5
    model = CrashingModel()
    users = {
        "batcher": svc._batcher(svc.models["minilm"], model).policy,
        "generation": _Run(svc, svc.models["tiny-gpt2"], model).policy,
        "reaper": svc.make_reaper(lambda task, queue, kwargs, job_id: None).policy,
    }
    assert all(policy is svc.policy for policy in users.values()), users
    svc.retire("minilm", model, "model_unloaded", 0)


@pytest.mark.parametrize("max_attempts", [2, 4])
def test_the_settings_limit_holds_on_both_serving_paths(max_attempts):
    svc, jobs = worker(max_attempts)
    model = CrashingModel()

    # The batcher: a job alone in its pass is charged every crash; poison at the settings' limit.
    with pytest.raises(PoisonInput, match=f"{max_attempts} times"):
        svc.submit(svc.models["minilm"], model, {"text": "killer"}, {}).result(10)
    assert model.passes == [1] * max_attempts

    # The generation path: a request with company in the running batch is not charged; alone it is.
    run_generation_jobs(svc, svc.models["tiny-gpt2"], model, [job("g1", {"text": "killer"})])
    assert model.generations == [False] + [True] * max_attempts
    [ended] = jobs.ended
    assert ended.status == FAILED and ended.code == POISON_JOB
    assert f"{max_attempts} times" in ended.message

    # The task threads refuse a job that too many workers died under, by the same limit.
    assert svc.policy.refuse_delivery(TAKEOVERS_PER_ATTEMPT * max_attempts) is None
    assert svc.policy.refuse_delivery(TAKEOVERS_PER_ATTEMPT * max_attempts + 1)["code"] == POISON_JOB
    svc.retire("minilm", model, "model_unloaded", 0)


def test_a_batch_jobs_items_are_gathered_alike_on_both_paths():
    svc, jobs = worker(max_attempts=1)
    model = CrashingModel()
    items = [{"text": "a"}, {"text": "b"}]
    ending = handlers._run_batch_request(svc, svc.models["minilm"], model, job("b1", items, batch=True))
    svc.completion.finish("inference", "minilm", [ending])
    run_generation_jobs(svc, svc.models["tiny-gpt2"], model, [job("b2", items, batch=True)])
    assert [e.job_id for e in jobs.ended] == ["b1", "b2"]
    for ended in jobs.ended:  # the job succeeds; each item carries its own end
        assert ended.status == SUCCEEDED
        outputs = orjson.loads(ended.result)["outputs"]
        assert [o["error"]["code"] for o in outputs] == [POISON_JOB, POISON_JOB]
    svc.retire("minilm", model, "model_unloaded", 0)
