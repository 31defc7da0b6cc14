"""When a job that lost its model process or its worker is tried again, and when it is poison: written once.

Every place a job can lose what runs it asks this policy (the batcher and the generation path after a model
process crash or hang, the reaper after a worker death or an abandoned job, the task handler at delivery):

* A crash charges a job only if it was **alone** in the forward pass (or decoding batch) that went down: the
  others were bystanders. Every job of a lost pass is tried again **alone**, so the next crash names the
  culprit. After `max_attempts` charges it fails as `poison_job`.
* A model process that cannot be started again, or a model that is going away (unload, eviction), is not a
  crash of the job: it ends with the model's reason (`model_process_died`, `model_unloaded`, `model_evicted`).
* A job started by `takeovers_per_attempt` × `max_attempts` workers that all died under it is not started
  again, even if it was never alone (it may take its worker down while others are always beside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from tasks.errors import MODEL_PROCESS_DIED, POISON_JOB, error_body
from workers.model_process import ModelGone

# A job started by this many workers per allowed attempt, each of which died under it, is not started again.
TAKEOVERS_PER_ATTEMPT = 4


class Revivable(Protocol):
    """What a crashed job's model offers (RemoteRuntime): restart one or every process; why it is going away."""

    @property
    def gone(self) -> ModelGone | None: ...

    def revive(self, index: int) -> bool: ...

    def revive_all(self) -> bool: ...


@dataclass(frozen=True)
class Verdict:
    """What becomes of a job after it lost what was running it."""

    retry: bool  # run it again, alone (`exclusive`)
    crashes: int  # crashes charged to it so far
    error: dict[str, str] | None = None  # its end, when it is not tried again


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    takeovers_per_attempt: int = TAKEOVERS_PER_ATTEMPT

    @staticmethod
    def restart(model: Revivable, model_id: str, cause: BaseException, index: int | None = None) -> ModelGone | None:
        """A forward pass lost its model process (it died, or hung and was killed): start it again (`index`, or
        every process of the model). None when it runs again; else why the model's jobs end instead: it is
        going away (unload, eviction), or the restart failed (`model_process_died`: the caller unloads the model
        and marks it failed)."""
        revived = model.revive(index) if index is not None else model.revive_all()
        if revived:
            return None
        return getattr(model, "gone", None) or ModelGone(
            MODEL_PROCESS_DIED, f"the process of model {model_id!r} died ({cause}) and could not be started again"
        )

    @staticmethod
    def cannot_restart(gone: ModelGone) -> bool:
        """The model's process could not be started again (not taken away on purpose): unload it, mark it failed."""
        return gone.code == MODEL_PROCESS_DIED

    def charge(self, model_id: str, cause: Any, crashes: int) -> Verdict:
        """After a crash (restarted) or a lost worker: `crashes` charged so far, this one included (a crash is
        charged only to a job that was alone in what went down). Poison once they reach max_attempts, else the
        job runs again, alone."""
        if crashes >= self.max_attempts:
            return Verdict(False, crashes, self.poison(model_id, crashes, cause))
        return Verdict(True, crashes)

    def poison(self, model_id: str, crashes: int, cause: Any) -> dict[str, str]:
        return error_body(
            POISON_JOB,
            f"the job was running alone {crashes} times when what ran it went down (model {model_id!r}, last: "
            f"{cause}); it is not retried again (AETHERCORE_MAX_ATTEMPTS)",
        )

    def refuse_delivery(self, deliveries: int) -> dict[str, str] | None:
        """The job's error if it may not start again: too many workers died (or dropped it) under it."""
        if deliveries <= self.takeovers_per_attempt * self.max_attempts:
            return None
        return error_body(
            POISON_JOB,
            f"the job was started by {deliveries} workers and none of them ended it (each died or lost it); "
            "it is not retried again (AETHERCORE_MAX_ATTEMPTS)",
        )
