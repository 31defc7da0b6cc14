"""What the batch driver works with, built once per driver process (`open_services`): the settings, the job store,
the batch product's stores, the one submission use case (submission/wiring.py, as an API process builds it) and the
credentials that say who a batch's owner is now. A batch line is submitted through that Submitter as its owner, in
the `low` lane, exactly as the same /v1 request is; the driver serves no HTTP and builds no app.

May import: config/, tasks/, access/, protocols/, submission/, batches/; never api, flask or workers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from loguru import logger

from access.keys import Credentials, KeyStore
from access.principal import SERVE, Principal
from batches.files import FileStore
from batches.lanes import batch_line_room
from batches.store import BatchStore
from batches.stores import open_stores
from config.models import load_models
from config.settings import Settings
from protocols.errors import ApiError, refused_error
from protocols.openai import Prepared
from protocols.results import ended_error
from submission.admission import BATCH_LANE
from submission.errors import Refused
from submission.request import SubmitRequest
from submission.submitter import Submitter
from submission.wiring import connect, wire
from tasks.jobs import Jobs


class DriverServices:
    """The driver's view of the service: a line's room and its submission as its owner, the owner's standing now,
    what /v1 answers for a job that ended without a result."""

    def __init__(
        self,
        settings: Settings,
        jobs: Jobs,
        submitter: Submitter,
        batches: BatchStore,
        files: FileStore,
        credentials: Credentials,
    ) -> None:
        self.settings, self.jobs, self.submitter = settings, jobs, submitter
        self.batches, self.files, self.credentials = batches, files, credentials

    @property
    def catalog(self) -> Submitter:
        """What a line's /v1 translation looks up (protocols/openai.py `Catalog`): the models, the bounds."""
        return self.submitter

    @contextmanager
    def as_owner(self, batch: dict[str, Any]) -> Iterator[None]:
        """The batch's work, logged under its id (its lines under their own request ids: `submit_line`)."""
        with logger.contextualize(request_id=batch["id"]):
            yield

    def serving_role(self, owner: str, role: str) -> str | None:
        """The owner's role now if they may still run batches (a SERVE role), None if revoked."""
        who = self.credentials.current(owner, role)
        return who.role if who is not None and who.role in SERVE else None

    def line_room(self, batch: dict[str, Any]) -> int:
        """How many of the batch's lines may be in flight now (batches/lanes.py)."""
        return batch_line_room(self.submitter, batch)

    def submit_line(self, batch: dict[str, Any], line: int, prepared: Prepared, timeout: float) -> dict[str, Any]:
        """One line submitted as its owner (from a submitting thread): its job, or ApiError as /v1 would answer."""
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
            traceparent=batch.get("traceparent") or None,  # the line's job is traced below its batch's creation
            tracestate=batch.get("tracestate") or None,
        )
        try:
            return self.submitter.submit(request)
        except Refused as exc:
            raise refused_error(exc) from None

    def ended_error(self, job: dict[str, Any]) -> ApiError:
        """What /v1 answers for a job that ended without a result."""
        return ended_error(job)


def open_services(settings: Settings) -> DriverServices:
    """The driver process's services: its connections, the submission over them, the batch stores, the credentials."""
    connections = connect(settings)
    models = load_models(settings.models_file)
    wired = wire(settings, models, connections.jobs, connections.cluster, connections.celery, connections.dispatcher)
    files, batches = open_stores(settings, connections.redis, wired.holdings)
    credentials = Credentials(settings.auth, settings.api_keys, settings.jwt_secret, KeyStore(connections.redis))
    return DriverServices(settings, connections.jobs, wired.submitter, batches, files, credentials)
