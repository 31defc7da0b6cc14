"""The OpenAI Files and Batch APIs under /v1: `client.files.create/list/retrieve/content/delete` and
`client.batches.create/retrieve/list/cancel` of the stock `openai` package work unchanged. A batch's lines run as
ordinary inference jobs of its owner (batches/driver.py); its state and its files are in Redis (batches/store.py,
batches/files.py). Owners see only their own files and batches (admins and operators see all, as with jobs). Errors
take OpenAI's shape (the /v1 dialect of api/blueprints/openai_compat.py). What is served: docs/PROTOCOLS.md.
"""

from __future__ import annotations

import time
from typing import Any

import marshmallow as ma
import orjson
from flask import Response, current_app, request, stream_with_context
from flask.views import MethodView
from marshmallow import validate
from werkzeug.exceptions import RequestEntityTooLarge

from access.principal import JOBS, SERVE
from api.auth import principal, requires
from api.errors import error_response, http_exception_response, quota_error
from api.idempotency import idempotent
from api.json_provider import Blueprint
from api.services import services
from batches.files import PURPOSE_BATCH, FileStore, file_object, new_file_id
from batches.objects import batch_object
from batches.store import (
    CANCELLED,
    CANCELLING,
    COMPLETION_WINDOWS,
    FINALIZING,
    IN_PROGRESS,
    NO_FILE,
    STATUSES,
    STOP_CANCEL,
    TOO_MANY_ACTIVE,
    VALIDATING,
    BatchStore,
    new_batch_id,
)
from batches.uploads import FileTooLarge, InvalidFile, UploadLimits, YieldingInput, read_chunks, upload_limit
from protocols.errors import ApiError
from protocols.openai import BATCH_ENDPOINTS
from tasks.holdings import QuotaExceeded

blp = Blueprint(
    "openai_batches",
    __name__,
    url_prefix="/v1",
    description="OpenAI-compatible Files and Batch APIs (batches of /v1 requests run as ordinary jobs)",
)

UPLOAD_PATH = "/v1/files"
MAX_FILENAME = 256


def stores() -> tuple[FileStore, BatchStore]:
    ext = current_app.extensions["aethercore_batches"]
    return ext["files"], ext["batches"]


@blp.before_request
def _size_uploads() -> None:
    """An upload may be as large as AETHERCORE_FILES_MAX_BYTES plus its multipart framing (set on the request by
    api/security.py), and one that says it is larger is refused before it is read."""
    if request.method == "POST" and request.path == UPLOAD_PATH:
        limit = services().settings.files_max_bytes
        if request.content_length is not None and request.content_length > upload_limit(limit):
            raise _too_large(limit)
        request.environ["wsgi.input"] = YieldingInput(request.environ["wsgi.input"])


@blp.errorhandler(RequestEntityTooLarge)
def _upload_too_large(exc: RequestEntityTooLarge):
    """A body past the upload's limit found while it is read (no Content-Length, or one that lied): on the upload
    route, the file's own 413 rather than the JSON bodies' one."""
    if request.path != UPLOAD_PATH:
        return http_exception_response(exc)
    refusal = _too_large(services().settings.files_max_bytes)
    return error_response(refusal.status, refusal.code, refusal.message)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, "file_too_large", f"the file is larger than {limit} bytes (AETHERCORE_FILES_MAX_BYTES); split it"
    )


def _visible(fields: dict[str, Any] | None) -> dict[str, Any] | None:
    """The object if the caller may see it (its owner, or an admin or operator): someone else's is not there."""
    who = principal()
    if fields is None or (not who.sees_all_jobs and fields.get("owner") != who.id):
        return None
    return fields


def _owned(store: Any, noun: str, object_id: str) -> dict[str, Any]:
    """The caller's file or batch `object_id`, or 404 `<noun>_not_found` (someone else's is not there)."""
    fields = _visible(store.get(object_id))
    if fields is None:
        raise ApiError(
            404,
            f"{noun}_not_found",
            f"no {noun} {object_id[:64]!r}: it does not exist, expired, or is not yours",
            {f"{noun}_id": object_id[:64]},
        )
    return fields


def _file(file_id: str) -> dict[str, Any]:
    return _owned(stores()[0], "file", file_id)


def _batch(batch_id: str) -> dict[str, Any]:
    return _owned(stores()[1], "batch", batch_id)


def _owner_filter() -> str | None:
    who = principal()
    return None if who.sees_all_jobs else who.id


# -- schemas (validation and the OpenAPI document) -----------------------------------------------------------------
class FileObjectSchema(ma.Schema):
    id = ma.fields.String(metadata={"example": "file-0123456789abcdef0123456789abcdef"})
    object = ma.fields.String(metadata={"example": "file"})
    bytes = ma.fields.Integer()
    created_at = ma.fields.Integer()
    expires_at = ma.fields.Integer(allow_none=True)
    filename = ma.fields.String()
    purpose = ma.fields.String(metadata={"description": "batch (uploaded), batch_output (a batch's output or errors)"})
    status = ma.fields.String()
    status_details = ma.fields.String(allow_none=True)


class FileListSchema(ma.Schema):
    object = ma.fields.String()
    data = ma.fields.List(ma.fields.Nested(FileObjectSchema))
    first_id = ma.fields.String(allow_none=True)
    last_id = ma.fields.String(allow_none=True)
    has_more = ma.fields.Boolean()


class FileDeletedSchema(ma.Schema):
    id = ma.fields.String()
    object = ma.fields.String()
    deleted = ma.fields.Boolean()


class FileListQuery(ma.Schema):
    class Meta:
        unknown = ma.RAISE

    purpose = ma.fields.String()  # absent: every purpose
    limit = ma.fields.Integer(load_default=10_000, validate=validate.Range(min=1, max=10_000))
    order = ma.fields.String(load_default="desc", validate=validate.OneOf(("asc", "desc")))
    after = ma.fields.String(validate=validate.Length(min=1, max=64))  # absent: from the start


class UploadForm(ma.Schema):
    """The multipart form's fields besides `file`."""

    class Meta:
        unknown = ma.RAISE

    purpose = ma.fields.String(
        required=True, validate=validate.OneOf((PURPOSE_BATCH,), error="only purpose=batch is supported")
    )
    expires_after_anchor = ma.fields.String(
        data_key="expires_after[anchor]", validate=validate.OneOf(("created_at",)), load_default=None
    )
    expires_after_seconds = ma.fields.Integer(
        data_key="expires_after[seconds]", validate=validate.Range(min=3600, max=2_592_000), load_default=None
    )


UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "additionalProperties": False,
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "JSONL (UTF-8): one request a line"},
                    "purpose": {"type": "string", "enum": [PURPOSE_BATCH]},
                    "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                    "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2_592_000},
                },
            }
        }
    },
}


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


def _listing(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


# -- files -----------------------------------------------------------------------------------------------------------
@blp.route("/files")
class Files(MethodView):
    @idempotent(store_response=True)
    @blp.doc(requestBody=UPLOAD_BODY)
    @blp.response(200, FileObjectSchema, description="The file, stored (in Redis) until it expires or is deleted")
    @blp.alt_response(400, description="More lines than a batch may hold, or a line longer than any request")
    @blp.alt_response(413, description="Over AETHERCORE_FILES_MAX_BYTES, or beyond the owner's AETHERCORE_FILES_QUOTA")
    @blp.alt_response(415, description="Not multipart/form-data")
    @blp.alt_response(422, description="No `file`, or a form field missing or invalid: named in error.param")
    @blp.alt_response(429, description="The owner keeps AETHERCORE_FILES_MAX_COUNT files already")
    @blp.alt_response(503, description="Redis is nearly full, or stored objects take their whole share of it")
    @requires(*SERVE)
    def post(self):
        svc = services()
        settings = svc.settings
        if request.mimetype != "multipart/form-data":
            raise ApiError(415, "unsupported_media_type", "upload the file as multipart/form-data (file, purpose)")
        repeated = {name: ["given more than once"] for name, values in request.form.lists() if len(values) > 1}
        if len(request.files.getlist("file")) > 1:
            repeated["file"] = ["given more than once: one file per upload"]
        if repeated:  # never silently one of them
            raise ApiError(422, "validation_error", "the request is invalid; see details for each field", repeated)
        try:
            form = UploadForm().load(request.form.to_dict())
        except ma.ValidationError as exc:
            raise ApiError(422, "validation_error", "the request is invalid; see details for each field", exc.messages)
        upload = request.files.get("file")
        if upload is None:
            message = "send the file as the multipart field `file`"
            raise ApiError(422, "validation_error", message, {"file": ["missing"]})
        svc.check_redis_memory()  # 503 redis_full before Redis refuses writes, as for new jobs
        # a file may ask to expire sooner than the operator's retention, never later
        ttl = min(form.get("expires_after_seconds") or settings.files_ttl, settings.files_ttl)
        filename = (upload.filename or "upload.jsonl")[:MAX_FILENAME]
        limits = UploadLimits(settings.files_max_bytes, settings.batch_max_lines, settings.max_request_bytes)
        chunks = read_chunks(upload.stream)
        try:
            fields = stores()[0].upload(principal().id, filename, form["purpose"], chunks, ttl, limits)
        except FileTooLarge:
            raise _too_large(settings.files_max_bytes) from None
        except InvalidFile as exc:
            raise ApiError(400, "invalid_file", str(exc)) from None
        except QuotaExceeded as exc:
            raise quota_error(exc) from None
        return file_object(fields)

    @blp.arguments(FileListQuery, location="query")
    @blp.response(200, FileListSchema, description="Your files (newest first unless order=asc)")
    @blp.alt_response(422, description="A query parameter out of range: named in error.param")
    @requires(*JOBS)
    def get(self, query: dict[str, Any]):
        items, more = stores()[0].listing(
            _owner_filter(), query.get("purpose"), query.get("after"), query["limit"], query["order"] == "desc"
        )
        return _listing([file_object(f) for f in items], more)


@blp.route("/files/<string:file_id>")
class FileItem(MethodView):
    @blp.response(200, FileObjectSchema)
    @blp.alt_response(404, description="No such file (or not yours)")
    @requires(*JOBS)
    def get(self, file_id: str):
        return file_object(_file(file_id))

    @blp.response(200, FileDeletedSchema)
    @blp.alt_response(404, description="No such file (or not yours)")
    @blp.alt_response(409, description="An unfinished batch reads it")
    @requires(*SERVE)
    def delete(self, file_id: str):
        fields = _file(file_id)
        outcome = stores()[0].delete(fields["id"], fields["owner"])
        if outcome == -1:
            raise ApiError(
                409, "file_in_use", f"file {file_id} is the input of a batch that has not ended; cancel it first"
            )
        return {"id": fields["id"], "object": "file", "deleted": outcome == 1}


@blp.route("/files/<string:file_id>/content")
class FileContent(MethodView):
    @blp.response(200, description="The file's bytes (JSONL)", content_type="application/octet-stream")
    @blp.alt_response(404, description="No such file (or not yours)")
    @requires(*JOBS)
    def get(self, file_id: str):
        fields = _file(file_id)
        chunks = stores()[0].content(fields)
        return Response(
            stream_with_context(chunks),
            mimetype="application/octet-stream",
            headers={"Content-Length": str(int(fields.get("bytes") or 0))},
        )


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
        settings = svc.settings
        svc.check_redis_memory()  # 503 redis_full before Redis refuses writes, as for new jobs
        source = _file(body["input_file_id"])
        if source.get("purpose") != PURPOSE_BATCH:
            purpose = source.get("purpose")
            problem = f"file {source['id']} has purpose {purpose!r}: a batch reads one uploaded with purpose=batch"
            raise ApiError(400, "invalid_input_file", problem, {"input_file_id": [problem]})
        who = principal()
        now = int(time.time())
        fields: dict[str, Any] = {
            "id": new_batch_id(),
            "endpoint": body["endpoint"],
            "input_file_id": source["id"],
            "completion_window": body["completion_window"],
            "status": VALIDATING,
            "created_at": now,
            "expires_at": now + COMPLETION_WINDOWS[body["completion_window"]],
            "owner": who.id,
            "role": who.role,
            "address": request.remote_addr or "",
            "output_file": new_file_id(),  # reserved: the answers are written there as lines end
            "error_file": new_file_id(),
            "total": 0,
            "completed": 0,
            "failed": 0,
            "next_line": 0,
        }
        if body.get("metadata"):
            fields["metadata"] = orjson.dumps(body["metadata"]).decode()
        # metadata.webhook_url, else the caller's default endpoint
        webhook = svc.webhooks.batch_webhook(who.id, body.get("metadata"))
        if webhook:
            fields["webhook"] = webhook
        try:
            outcome = batches.create(fields, source["id"], settings.batch_max_active)
        except QuotaExceeded as exc:
            raise quota_error(exc) from None
        if outcome == NO_FILE:
            raise ApiError(404, "file_not_found", f"file {source['id']} expired or was deleted meanwhile")
        if outcome == TOO_MANY_ACTIVE:
            raise ApiError(
                429,
                "too_many_batches",
                f"you have {settings.batch_max_active} unfinished batches (AETHERCORE_BATCH_MAX_ACTIVE); wait for "
                "one to end or cancel one",
                headers={"Retry-After": "30"},
            )
        # the input is kept through the window (its keys extended by the step above), and so is its owner's charge
        files.keep_until(source["id"], source["owner"], int(fields["expires_at"]) + 3600)
        batches.wake()  # an idle batch driver starts it now (batches/driver.py)
        return batch_object(batches.get(fields["id"]) or {k: str(v) for k, v in fields.items()})

    @blp.arguments(BatchListQuery, location="query")
    @blp.response(200, BatchListSchema, description="Your batches, newest first")
    @blp.alt_response(422, description="A query parameter out of range: named in error.param")
    @requires(*JOBS)
    def get(self, query: dict[str, Any]):
        items, more = stores()[1].listing(_owner_filter(), query.get("after"), query["limit"])
        return _listing([batch_object(b) for b in items], more)


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
