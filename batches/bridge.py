"""What the batch driver still takes from the API package, in one place: a batch line is submitted exactly as the same
/v1 request is (its owner's principal and role deciding autoload, their rate limit counted with the job's creation,
backpressure, the lane's room, the dispatcher), and that path lives in the API's services, used inside a request
context of the batch's owner. The driver serves no request: it builds the Flask app only for this
(`submission_app`). This is the one module of batches/ that imports api or flask; it goes when the submission use
case lives below HTTP (issue 35: submission/), and the rest of the driver (driver.py, validation.py, lines.py,
outputs.py) sees only `ApiBridge`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask, g

from access.principal import SERVE, Principal
from api.inference import ended_error, route
from api.services import BATCH_LANE, Services, services
from batches.files import FileStore
from batches.lanes import batch_line_room
from batches.store import BatchStore
from config.models import ModelSpec
from config.settings import Settings
from protocols.errors import ApiError
from protocols.openai import Prepared
from tasks.jobs import Jobs
from tasks.states import INFERENCE


def submit_line(svc: Services, spec: ModelSpec, payload: dict[str, Any]) -> dict[str, Any]:
    """Submit one batch line as an ordinary inference job of its owner, exactly as the same /v1 request would be:
    routed to the model's device queue, counted in the owner's rate limit (with the job's creation), checked
    against the queue's depth, published through the dispatcher — in the `low` priority lane, so a backlog of batch
    work never delays interactive callers (and moves up only by aging, AETHERCORE_LANE_AGING_S)."""
    return svc.submit(INFERENCE, spec, route(svc, spec), {**payload, "priority": BATCH_LANE})


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
        return batch_line_room(self.svc, batch)

    def submit_line(self, batch: dict[str, Any], line: int, prepared: Prepared, timeout: float) -> dict[str, Any]:
        """One line submitted as its owner (from a submitting thread): its job."""
        with self.as_owner(batch):
            g.request_id = f"{batch['id']}.{line}"
            return submit_line(services(), prepared.spec, {**prepared.payload, "timeout": timeout})

    def ended_error(self, job: dict[str, Any]) -> ApiError:
        """What /v1 answers for a job that ended without a result."""
        return ended_error(job)
