"""The OpenAI Batch API under /v1: `client.batches.create/retrieve/list/cancel` of the stock `openai` package work
unchanged; its routes are added to the Files API's blueprint (api/blueprints/files.py, one OpenAPI tag for both). A
batch's lines run as ordinary inference jobs of its owner (batches/driver.py); its state and its files are in Redis
(batches/store.py, batches/files.py); creating one is batches/creation.py. Owners see only their own batches (admins
and operators see all, as with jobs). Errors take OpenAI's shape. What is served: docs/PROTOCOLS.md.
"""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask import request
from flask.views import MethodView
from marshmallow import validate

from access.principal import JOBS, SERVE
from api.auth import principal, requires
from api.blueprints.files import blp, listing, owned, owned_file, owner_filter, stores
from api.errors import quota_error
from api.idempotency import idempotent
from api.services import services
from api.tracing import current_trace
from batches.creation import Creator, check_input_file, create_batch
from batches.objects import batch_object
from batches.store import (
    CANCELLED,
    CANCELLING,
    COMPLETION_WINDOWS,
    FINALIZING,
    IN_PROGRESS,
    STATUSES,
    STOP_CANCEL,
    VALIDATING,
)
from protocols.errors import ApiError
from protocols.openai import BATCH_ENDPOINTS
from submission.webhooks import with_trace
from tasks.holdings import QuotaExceeded

__all__ = ["blp"]


def _batch(batch_id: str) -> dict[str, Any]:
    return owned(stores()[1], "batch", batch_id)


class RequestCountsSchema(ma.Schema):
    total = ma.fields.Integer()
    completed = ma.fields.Integer()
    failed = ma.fields.Integer()


class BatchErrorSchema(ma.Schema):
    code = ma.fields.String()
    message = ma.fields.String()
    param = ma.fields.String(allow_none=True)
    line = ma.fields.Integer(allow_none=True)


class BatchErrorsSchema(ma.Schema):
    object = ma.fields.String()
    data = ma.fields.List(ma.fields.Nested(BatchErrorSchema))


class BatchSchema(ma.Schema):
    id = ma.fields.String(metadata={"example": "batch_0123456789abcdef0123456789abcdef"})
    object = ma.fields.String(metadata={"example": "batch"})
    endpoint = ma.fields.String()
    model = ma.fields.String(allow_none=True)
    errors = ma.fields.Nested(BatchErrorsSchema, allow_none=True)
    input_file_id = ma.fields.String()
    completion_window = ma.fields.String()
    status = ma.fields.String(validate=validate.OneOf(STATUSES))
    output_file_id = ma.fields.String(allow_none=True)
    error_file_id = ma.fields.String(allow_none=True)
    created_at = ma.fields.Integer()
    in_progress_at = ma.fields.Integer(allow_none=True)
    expires_at = ma.fields.Integer(allow_none=True)
    finalizing_at = ma.fields.Integer(allow_none=True)
    completed_at = ma.fields.Integer(allow_none=True)
    failed_at = ma.fields.Integer(allow_none=True)
    expired_at = ma.fields.Integer(allow_none=True)
    cancelling_at = ma.fields.Integer(allow_none=True)
    cancelled_at = ma.fields.Integer(allow_none=True)
    request_counts = ma.fields.Nested(RequestCountsSchema)
    usage = ma.fields.Dict(metadata={"description": "input_tokens, output_tokens, total_tokens (and their details)"})
    metadata = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.String(), allow_none=True)


class BatchListSchema(ma.Schema):
    object = ma.fields.String()
    data = ma.fields.List(ma.fields.Nested(BatchSchema))
    first_id = ma.fields.String(allow_none=True)
    last_id = ma.fields.String(allow_none=True)
    has_more = ma.fields.Boolean()


class BatchCreateRequest(ma.Schema):
    class Meta:
        unknown = ma.RAISE  # an unknown field is a 422 naming it, never silently ignored

    input_file_id = ma.fields.String(required=True, validate=validate.Length(min=1, max=64))
    endpoint = ma.fields.String(required=True, validate=validate.OneOf(tuple(BATCH_ENDPOINTS)))
    completion_window = ma.fields.String(required=True, validate=validate.OneOf(tuple(COMPLETION_WINDOWS)))
    metadata = ma.fields.Dict(
        keys=ma.fields.String(validate=validate.Length(max=64)),
        values=ma.fields.String(validate=validate.Length(max=512)),
        allow_none=True,
        validate=validate.Length(max=16, error="at most 16 keys"),
        metadata={"description": "Up to 16 pairs: keys of at most 64 characters, values of at most 512"},
    )


class BatchListQuery(ma.Schema):
    class Meta:
        unknown = ma.RAISE

    after = ma.fields.String(validate=validate.Length(min=1, max=64))  # absent: from the start
    limit = ma.fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))


# -- batches ---------------------------------------------------------------------------------------------------------
@blp.route("/batches")
class Batches(MethodView):
    @idempotent(store_response=True)
    @blp.arguments(BatchCreateRequest)
    @blp.response(200, BatchSchema, description="The batch, `validating`: poll it until it ends")
    @blp.alt_response(400, description="The input file was not uploaded with purpose=batch")
    @blp.alt_response(404, description="No such input file (or not yours)")
    @blp.alt_response(422, description="Invalid body: the field is named in error.param")
    @blp.alt_response(
        429,
        description="AETHERCORE_BATCH_MAX_ACTIVE unfinished batches already (`too_many_batches`), or "
        "AETHERCORE_BATCHES_MAX_KEPT batches kept (`quota_exceeded`)",
    )
    @blp.alt_response(409, description="metadata.webhook_url, and the caller has no webhook signing secret")
    @blp.alt_response(
        503, description="Redis is nearly full (`redis_full`), or held objects fill their share (`storage_full`)"
    )
    @requires(*SERVE)
    def post(self, body: dict[str, Any]):
        files, batches = stores()
        svc = services()
        svc.check_redis_memory()  # 503 redis_full before Redis refuses writes, as for new jobs
        source = owned_file(body["input_file_id"])
        check_input_file(source)
        who = principal()
        # metadata.webhook_url, else the caller's default endpoint
        webhook = svc.webhooks.batch_webhook(who.id, body.get("metadata")) or ""
        traceparent, tracestate = current_trace()  # every line's job joins this request's trace
        if webhook and traceparent:
            webhook = with_trace(webhook, traceparent, tracestate)
        creator = Creator(who.id, who.role, request.remote_addr or "", webhook, traceparent or "", tracestate or "")
        try:
            fields = create_batch(files, batches, body, source, creator, svc.settings.batch_max_active)
        except QuotaExceeded as exc:
            raise quota_error(exc) from None
        return batch_object(fields)

    @blp.arguments(BatchListQuery, location="query")
    @blp.response(200, BatchListSchema, description="Your batches, newest first")
    @blp.alt_response(422, description="A query parameter out of range: named in error.param")
    @requires(*JOBS)
    def get(self, query: dict[str, Any]):
        items, more = stores()[1].listing(owner_filter(), query.get("after"), query["limit"])
        return listing([batch_object(b) for b in items], more)


@blp.route("/batches/<string:batch_id>")
class BatchItem(MethodView):
    @blp.response(200, BatchSchema)
    @blp.alt_response(404, description="No such batch (or not yours)")
    @requires(*JOBS)
    def get(self, batch_id: str):
        return batch_object(_batch(batch_id))


@blp.route("/batches/<string:batch_id>/cancel")
class BatchCancel(MethodView):
    @blp.response(200, BatchSchema, description="`cancelling`: lines not started never run, finished ones are kept")
    @blp.alt_response(404, description="No such batch (or not yours)")
    @blp.alt_response(409, description="The batch is finalizing or has ended")
    @requires(*SERVE)
    def post(self, batch_id: str):
        _files, batches = stores()
        fields = _batch(batch_id)
        outcome = batches.transition(fields["id"], (VALIDATING, IN_PROGRESS), CANCELLING, stopping=STOP_CANCEL)
        if outcome not in ("", CANCELLING, CANCELLED):
            raise ApiError(
                409,
                "batch_finalizing" if outcome == FINALIZING else "batch_ended",
                f"batch {fields['id']} is {outcome}; only a validating or in-progress batch can be cancelled",
                {"status": outcome},
            )
        if outcome == "":
            batches.wake()  # an idle batch driver stops it now (batches/driver.py)
        return batch_object(batches.get(fields["id"]) or fields)
