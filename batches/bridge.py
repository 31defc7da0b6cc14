"""What the batch driver still takes from the API package, in one place. A batch line is submitted through the one
submission use case (submission/submitter.py) as its owner, in the `low` lane, exactly as the same /v1 request is;
the Submitter, the stores and the owner's current standing (a revoked key) are built by the API's app factory, so
the driver builds that app once (`submission_app`) and serves no request with it. This is the one module of
batches/ that imports api or flask (the import contract names this one edge); the rest of the driver (driver.py,
validation.py, lines.py, outputs.py) sees only `ApiBridge`. What is left to move: the services' container below
HTTP, so the driver builds its Submitter without the app.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask, g

from access.principal import SERVE, Principal
from api.services import Services
from batches.files import FileStore
from batches.lanes import batch_line_room
from batches.store import BatchStore
from config.settings import Settings
from protocols.errors import ApiError, refused_error
from protocols.openai import Prepared
from protocols.results import ended_error
from submission.admission import BATCH_LANE
from submission.errors import Refused
from submission.request import SubmitRequest
from tasks.jobs import Jobs


def submission_app(settings: Settings) -> Flask:
    """The Flask app whose services a batch line is submitted through (the /v1 path: `submit_line`, `prepare`, the
    owner's principal in a request context). The driver serves no request with it; it is built here only until the
    submission use case lives below HTTP (the next issue), as the in-API driver thread used its process's app."""
    from api import create_app

    return create_app(settings)


class ApiBridge:
    """The API app's services as the driver uses them: its settings, job store and the batches' stores; a batch's
    owner as the authenticator sees them now; a line's room and its submission as its owner."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.svc: Services = app.extensions["aethercore"]
        self.settings: Settings = self.svc.settings
        self.jobs: Jobs = self.svc.jobs
        ext = app.extensions["aethercore_batches"]
        self.batches: BatchStore = ext["batches"]
        self.files: FileStore = ext["files"]

    @contextmanager
    def as_owner(self, batch: dict[str, Any]) -> Iterator[None]:
        """The batch's work runs as a request of its owner would: their principal (role: autoload), their rate
        limit's caller (their address when unauthenticated), /v1's error shape."""
        environ = {"REMOTE_ADDR": batch.get("address") or "127.0.0.1"}
        with self.app.test_request_context("/v1/batches", environ_base=environ):
            g.principal = Principal(batch["owner"], batch["role"])
            g.request_id = batch["id"]
            yield

    def serving_role(self, owner: str, role: str) -> str | None:
        """The owner's role now if they may still run batches (a SERVE role), None if revoked."""
        who: Principal | None = self.app.extensions["aethercore_auth"].current(owner, role)
        return who.role if who is not None and who.role in SERVE else None

    def line_room(self, batch: dict[str, Any]) -> int:
        """How many of the batch's lines may be in flight now (batches/lanes.py)."""
        return batch_line_room(self.svc.submitter, batch)

    def submit_line(self, batch: dict[str, Any], line: int, prepared: Prepared, timeout: float) -> dict[str, Any]:
        """One line submitted as its owner (from a submitting thread): its job."""
        owner = Principal(batch["owner"], batch["role"])
        request = SubmitRequest(
            prepared.spec.id,
            **prepared.payload,
            checked=True,  # by `prepare`, as the /v1 view checks it
            lane=BATCH_LANE,  # a backlog never delays interactive callers; it rises only by aging
            timeout_s=timeout,
            default_webhook=False,  # the batch has its own webhook, at its end
            caller=owner,
            caller_key=owner.id if owner.id != "anonymous" else batch.get("address") or "127.0.0.1",
            request_id=f"{batch['id']}.{line}",
        )
        try:
            return self.svc.submitter.submit(request)
        except Refused as exc:
            raise refused_error(exc) from None

    def ended_error(self, job: dict[str, Any]) -> ApiError:
        """What /v1 answers for a job that ended without a result."""
        return ended_error(job)
