"""The OpenAI Files API under /v1 (`client.files.create/list/retrieve/content/delete` of the stock `openai` package)
and the blueprint it shares with the Batch API (api/blueprints/batches.py adds the batch routes to `blp`, so both keep
one OpenAPI tag). Files live in Redis (batches/files.py); an upload is read and charged by batches/uploads.py and
FileStore.upload. Owners see only their own files and batches (admins and operators see all, as with jobs); the
helpers for that (`owned`, `owner_filter`) and for lists (`listing`) are shared with the batch routes. Errors take
OpenAI's shape (the /v1 dialect of api/blueprints/openai_compat.py). What is served: docs/PROTOCOLS.md.
"""

from __future__ import annotations

from typing import Any

import marshmallow as ma
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
from batches.files import PURPOSE_BATCH, FileStore, file_object
from batches.store import BatchStore
from batches.uploads import FileTooLarge, InvalidFile, UploadLimits, YieldingInput, read_chunks, upload_limit
from protocols.errors import ApiError
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


def owned(store: Any, noun: str, object_id: str) -> dict[str, Any]:
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


def owned_file(file_id: str) -> dict[str, Any]:
    return owned(stores()[0], "file", file_id)


def owner_filter() -> str | None:
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


def listing(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
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
            owner_filter(), query.get("purpose"), query.get("after"), query["limit"], query["order"] == "desc"
        )
        return listing([file_object(f) for f in items], more)


@blp.route("/files/<string:file_id>")
class FileItem(MethodView):
    @blp.response(200, FileObjectSchema)
    @blp.alt_response(404, description="No such file (or not yours)")
    @requires(*JOBS)
    def get(self, file_id: str):
        return file_object(owned_file(file_id))

    @blp.response(200, FileDeletedSchema)
    @blp.alt_response(404, description="No such file (or not yours)")
    @blp.alt_response(409, description="An unfinished batch reads it")
    @requires(*SERVE)
    def delete(self, file_id: str):
        fields = owned_file(file_id)
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
        fields = owned_file(file_id)
        chunks = stores()[0].content(fields)
        return Response(
            stream_with_context(chunks),
            mimetype="application/octet-stream",
            headers={"Content-Length": str(int(fields.get("bytes") or 0))},
        )
