"""The crash/retry/poison policy (workers/retry.py), written once for the batcher, the generation path, the reaper
and the task handler."""

from __future__ import annotations

from tasks.errors import MODEL_PROCESS_DIED, MODEL_UNLOADED, POISON_JOB
from workers.model_errors import ModelGone
from workers.retry import TAKEOVERS_PER_ATTEMPT, RetryPolicy


class Model:
    def __init__(self, revives: bool = True, gone: ModelGone | None = None) -> None:
        self.revives, self.gone, self.calls = revives, gone, []

    def revive(self, index: int) -> bool:
        self.calls.append(index)
        return self.revives

    def revive_all(self) -> bool:
        self.calls.append("all")
        return self.revives


def test_a_job_is_tried_again_until_its_charges_reach_max_attempts():
    policy = RetryPolicy(max_attempts=3)
    assert policy.charge("m", "died", 1).retry
    assert policy.charge("m", "died", 2).retry
    verdict = policy.charge("m", "died", 3)
    assert not verdict.retry and verdict.crashes == 3
    assert verdict.error["code"] == POISON_JOB and "3 times" in verdict.error["message"]


def test_a_restarted_process_lets_the_jobs_run_again():
    model = Model()
    assert RetryPolicy(3).restart(model, "m", RuntimeError("x"), index=1) is None
    assert RetryPolicy(3).restart(model, "m", RuntimeError("x")) is None
    assert model.calls == [1, "all"]


def test_a_process_that_cannot_restart_ends_the_jobs_and_the_model():
    gone = RetryPolicy(3).restart(Model(revives=False), "m", RuntimeError("segfault"))
    assert gone is not None and gone.code == MODEL_PROCESS_DIED and "segfault" in str(gone)
    assert RetryPolicy.cannot_restart(gone)


def test_a_model_going_away_ends_the_jobs_with_its_reason_not_a_crash():
    reason = ModelGone(MODEL_UNLOADED, "unloaded")
    gone = RetryPolicy(3).restart(Model(revives=False, gone=reason), "m", RuntimeError("x"))
    assert gone is reason and not RetryPolicy.cannot_restart(gone)


def test_a_job_started_by_too_many_dying_workers_is_not_started_again():
    policy = RetryPolicy(max_attempts=2)
    assert policy.refuse_delivery(TAKEOVERS_PER_ATTEMPT * 2) is None
    error = policy.refuse_delivery(TAKEOVERS_PER_ATTEMPT * 2 + 1)
    assert error is not None and error["code"] == POISON_JOB
