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

One instance per worker, built by the worker service from its settings (AETHERCORE_MAX_ATTEMPTS) and handed to
each user, so no two of them can count to different limits. What a lost model process means for the jobs it held
is decided once (`crashed`); the batcher and the generation path only say how they end or resend a job
(`CrashSite`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tasks.errors import MODEL_PROCESS_DIED, POISON_JOB, error_body
from workers.model_errors import ModelGone

# A job started by this many workers per allowed attempt, each of which died under it, is not started again.
TAKEOVERS_PER_ATTEMPT = 4


class Revivable(Protocol):
    """What a crashed job's model offers (RemoteRuntime): restart one or every process; why it is going away."""

    @property
    def gone(self) -> ModelGone | None: ...

    def revive(self, index: int) -> bool: ...

    def revive_all(self) -> bool: ...


class Lost(Protocol):
    """A job (or one item of a batch job) that was in what went down."""

    crashes: int  # crashes charged to it so far


JobT = TypeVar("JobT", bound=Lost)
OutcomeT = TypeVar("OutcomeT")
JobT_contra = TypeVar("JobT_contra", bound=Lost, contravariant=True)


class CrashSite(Protocol[JobT_contra, OutcomeT]):
    """How one path carries out `RetryPolicy.crashed`'s decisions: the batcher for the jobs of a forward pass, the
    generation path for a request of the running batch. Each returns that path's outcome for the job."""

    def model_gone(self, lost: Sequence[JobT_contra], gone: ModelGone, dead: bool) -> list[OutcomeT]:
        """The model is not running again: the jobs end with `gone`; `dead`: it could not be restarted (the
        model is to be unloaded and marked failed)."""
        ...

    def poisoned(self, work: JobT_contra, error: dict[str, str]) -> OutcomeT:
        """The job crashed its model alone `max_attempts` times: it ends with `error` (poison_job)."""
        ...

    def run_alone(self, work: JobT_contra, cause: BaseException, charged: bool) -> OutcomeT:
        """The job runs again on the restarted process, alone; `charged`: this crash counted against it."""
        ...


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

    def crashed(
        self,
        model: Revivable,
        model_id: str,
        site: CrashSite[JobT, OutcomeT],
        lost: Sequence[JobT],
        cause: BaseException,
        *,
        alone: bool,
        index: int | None = None,
    ) -> list[OutcomeT]:
        """What ran `lost` (a forward pass on process `index`, or a decoding batch) lost its model process: start
        it again, then every lost job runs again alone, charged a crash only if it was `alone` in what went down,
        and poison once its charges reach max_attempts. A model that does not run again ends them all."""
        gone = self.restart(model, model_id, cause, index)
        if gone is not None:
            return site.model_gone(lost, gone, self.cannot_restart(gone))
        outcomes: list[OutcomeT] = []
        for work in lost:
            if alone:
                verdict = self.charge(model_id, cause, work.crashes + 1)
                work.crashes = verdict.crashes
                if verdict.error is not None:
                    outcomes.append(site.poisoned(work, verdict.error))
                    continue
            outcomes.append(site.run_alone(work, cause, alone))
        return outcomes

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
