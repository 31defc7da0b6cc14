"""How many batch lines a device takes: the driver (batches/driver.py) keeps at most `batch_line_room` lines of a
batch in flight, so a batch backlog never fills a device's queue and interactive callers never pay for it.

Every line of every batch is a `low` job. On one device, the batches running there share a watermark evenly
(AETHERCORE_BATCH_QUEUE_WATERMARK, by default WATERMARK_PASSES x the model's max_batch_size: one pass running, the
next ready, room for the driver's round trips): three owners with 16 batches each keep at most a watermark of lines
on the device, not 48 x AETHERCORE_BATCH_MAX_IN_FLIGHT. Each step reads the device's batches afresh: a batch that
took more while it ran alone keeps what it has and takes no more until the others have had their share. No line is
submitted while the device's `low` lane already holds a watermark of messages (its `/serve` callers' `low` jobs
count too). Interactive submissions count only the interactive lanes against AETHERCORE_MAX_QUEUE_DEPTH
(submission/admission.py `Admission.check`), so neither can refuse them.
"""

from __future__ import annotations

from typing import Any

from batches.store import IN_PROGRESS
from config.models import ModelSpec
from submission.admission import BATCH_LANE
from submission.errors import Refused
from submission.submitter import Submitter
from tasks.names import BATCHES_ACTIVE, batch_jobs_key, batch_key

WATERMARK_PASSES = 4


def watermark(svc: Submitter, spec: ModelSpec) -> int:
    """Batch lines in flight on `spec`'s device at most."""
    return svc.settings.batch_queue_watermark or WATERMARK_PASSES * spec.max_batch_size


def batch_line_room(svc: Submitter, batch: dict[str, Any]) -> int:
    """How many of `batch`'s lines may be in flight now (taken and not answered): its even share of its device's
    watermark, no more than the watermark leaves beside the other batches' lines there, none while the device's
    `low` lane holds the watermark, never more than AETHERCORE_BATCH_MAX_IN_FLIGHT."""
    spec = svc.models.get(batch.get("model") or "")
    if spec is None:  # its lines fail as /v1 would fail them: let the driver answer them
        return svc.settings.batch_max_in_flight
    try:
        device = svc.device_for(spec, svc.desired(spec.id))
    except Refused:  # no device: the submission says so, and the batch holds
        return svc.settings.batch_max_in_flight
    mark = watermark(svc, spec)
    if svc.admission.queued_ahead(device, BATCH_LANE) >= mark:
        return 0
    running, in_flight = _on_device(svc, device)
    own = int(svc.jobs.redis.hlen(batch_jobs_key(batch["id"])))
    share = max(1, mark // max(1, running))
    return max(0, min(svc.settings.batch_max_in_flight, share, own + mark - in_flight))


def _on_device(svc: Submitter, device: str) -> tuple[int, int]:
    """The batches running on `device` and their lines in flight (read afresh: two round trips)."""
    client = svc.jobs.redis
    ids = list(client.smembers(BATCHES_ACTIVE))
    if not ids:
        return 0, 0
    pipe = client.pipeline(transaction=False)
    for batch_id in ids:
        pipe.hmget(batch_key(batch_id), "model", "status", "stopping")
        pipe.hlen(batch_jobs_key(batch_id))
    replies = pipe.execute()
    running = in_flight = 0
    for (model, status, stopping), lines in zip(replies[::2], replies[1::2]):
        spec = svc.models.get(model or "")
        if spec is None or status != IN_PROGRESS or stopping:
            continue
        try:
            if svc.device_for(spec, svc.desired(spec.id)) != device:
                continue
        except Refused:
            continue
        running += 1
        in_flight += int(lines)
    return running, in_flight
