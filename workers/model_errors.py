"""How a call to a model process fails, as the worker sees it: the process failed it (`ModelProcessError`, and
its crash and timeout kinds), the model went away under it (`ModelGone`: unloaded, evicted), or it was cancelled or
ran past its deadline. Each failure that ends a job carries its code from tasks/errors.py.

Imports tasks/ only."""

from __future__ import annotations

from tasks.errors import INTERNAL_ERROR, MODEL_EVICTED, MODEL_PROCESS_DIED, MODEL_TIMEOUT, MODEL_UNLOADED


class ModelProcessError(RuntimeError):
    """The model process failed the call (a bug or a crash inside the model, not the caller's input)."""

    code = INTERNAL_ERROR


class ModelProcessDied(ModelProcessError):
    """The process died under the call (crash, OOM kill): the call may be tried again on a restarted one."""

    code = MODEL_PROCESS_DIED


class ModelTimeout(ModelProcessError):
    code = MODEL_TIMEOUT


class ModelGone(RuntimeError):
    """The model was taken away while the call waited or ran: unloaded, evicted, or its process could not be
    started again. Final: the call is not tried again on this worker; its job ends with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def unloaded(model_id: str, why: str = "it was unloaded (POST /models/{id}/unload)") -> ModelGone:
    return ModelGone(MODEL_UNLOADED, f"model {model_id!r} went away while the job ran: {why.format(id=model_id)}")


def evicted(model_id: str) -> ModelGone:
    return ModelGone(
        MODEL_EVICTED,
        f"model {model_id!r} was evicted (least recently used) to make room for another model while the job "
        "ran; send it again (AETHERCORE_MODEL_CACHE_SIZE bounds the models a worker keeps)",
    )


class CallCancelled(Exception):
    pass


class DeadlineExceeded(Exception):
    """A generation ran past its job's deadline and was dropped from the batch."""
