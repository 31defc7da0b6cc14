"""How a batch ends: once every line is answered its output and error files are published and it takes its final
status (completed, cancelled, expired); past its deadline (FINISH_GRACE_S after its window's end or its cancel) it
ends without the lines still running; and a batch whose steps keep failing (MAX_STEP_FAILURES in a row) ends
`failed`, so none of its owner's AETHERCORE_BATCH_MAX_ACTIVE slots is held for good. A mixin of the batch driver
(batches/driver.py `BatchDriver`), whose store, files and owner's context it uses.
May import config/, tasks/, protocols/ and batches/; never api or flask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from loguru import logger

from batches.files import FileStore
from batches.lines import INTERNAL_ERROR
from batches.outputs import STOPPED, all_answered, batch_errors, error_entry, publish
from batches.store import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    ENDED,
    EXPIRED,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    NOT_SUBMITTED,
    STOP_CANCEL,
    VALIDATING,
    BatchStore,
)
from batches.validation import BATCH_EXPIRED

if TYPE_CHECKING:
    from batches.services import DriverServices

MAX_STEP_FAILURES = 5  # unexpected exceptions of a batch's steps in a row before it ends failed
# Lines still running at a batch's deadline (its window's end, or its cancel) have this long to end and be
# collected; then the batch ends without them and its slot is free.
FINISH_GRACE_S = 600


class Ending:
    """The driver's ends (see the module's docstring)."""

    store: BatchStore
    files: FileStore
    services: DriverServices

    def _cancel_jobs(self, job_ids: list[str], why: str) -> None:  # batches/lines.py
        raise NotImplementedError

    def _finish(self, batch_id: str) -> bool:
        """End a batch whose every line is answered: its files published, its final status. Whether it ended."""
        batch = self.store.get(batch_id)
        if batch is None or not all_answered(batch) or self.store.taken(batch_id):
            return False
        status = batch["status"]
        if status == IN_PROGRESS and not batch.get("stopping"):
            if self.store.end(batch, (IN_PROGRESS,), FINALIZING, final=False) != "":
                return False
            status = FINALIZING
        target = {FINALIZING: COMPLETED, CANCELLING: CANCELLED, IN_PROGRESS: EXPIRED}.get(status)
        if target is None:
            return False
        fields = publish(self.files, batch)
        if self.store.end(batch, (status,), target, final=True, **fields) != "":
            return False
        logger.bind(batch_id=batch_id).info(
            "batch {}: {} ({} completed, {} failed)", batch_id, target, batch.get("completed"), batch.get("failed")
        )
        return True

    def _late(self, batch: dict[str, Any]) -> tuple[str, str, str]:
        """Where a batch past its deadline ends, and why (its errors entry: code, message)."""
        unanswered = int(batch.get("total") or 0) - int(batch.get("completed") or 0) - int(batch.get("failed") or 0)
        after = "its cancel" if batch["status"] == CANCELLING else "its completion window ended"
        message = (
            f"{max(unanswered, 0)} requests were still unanswered {FINISH_GRACE_S} s after {after}: the batch "
            "ended without them (their jobs were asked to stop)"
        )
        if batch["status"] == CANCELLING:
            return CANCELLED, STOPPED[STOP_CANCEL][0], message
        return EXPIRED, BATCH_EXPIRED, message

    def _step_failed(self, batch_id: str, exc: Exception) -> None:
        """A step raised unexpectedly (logged here): counted in the batch's record; MAX_STEP_FAILURES in a row end
        the batch `failed`, so a bug never holds one of its owner's slots for good."""
        failures = self.store.failed(batch_id, "step_failures")
        logger.bind(batch_id=batch_id).opt(exception=exc).error(
            "batch {}: step failed ({} of {} in a row)", batch_id, failures, MAX_STEP_FAILURES
        )
        if failures < MAX_STEP_FAILURES:
            return
        batch = self.store.get(batch_id)
        if batch is None or batch["status"] in ENDED:
            return
        what = "validating its input file" if batch["status"] == VALIDATING else "running it"
        message = f"{what} failed unexpectedly {failures} times in a row (the incident was logged); the batch ended"
        with self.services.as_owner(batch):
            self._abandon(batch, FAILED, INTERNAL_ERROR, message)

    def _abandon(self, batch: dict[str, Any], to: str, code: str, message: str) -> bool:
        """End a batch now, whatever is unanswered (its deadline passed, or its steps keep failing): jobs still
        running asked to stop, the files of what was answered published, `message` added to its errors, its slot
        free. Whether it ended here."""
        running = [job for job in self.store.taken(batch["id"]).values() if job != NOT_SUBMITTED]
        self._cancel_jobs(running, f"its batch ended: {message}")
        try:
            fields = publish(self.files, batch)
        except (ValueError, TypeError, KeyError):  # its record is what broke the steps: end it without its files
            logger.bind(batch_id=batch["id"]).exception("batch {}: its files could not be published", batch["id"])
            fields = {}
        errors = batch_errors(batch) + [error_entry(code, message, None)]
        fields["errors"] = orjson.dumps(errors).decode()
        outcome = self.store.end(batch, (batch["status"],), to, final=True, force=True, **fields)
        if outcome == "":
            logger.bind(batch_id=batch["id"]).warning("batch {}: ended {}: {}", batch["id"], to, message)
        return outcome == ""


def deadline_of(batch: dict[str, Any]) -> float:
    """When the batch ends at the latest, whatever its lines: FINISH_GRACE_S after its window's end or its cancel."""
    end = float(batch["expires_at"])
    if batch.get("cancelling_at"):
        end = min(end, float(batch["cancelling_at"]))
    return end + FINISH_GRACE_S
