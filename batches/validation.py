"""A batch's validation: its input file read page by page, every line checked exactly as /v1 checks the same request
(the same schemas and translation: protocols/openai.py BATCH_ENDPOINTS, `prepare`), the line's own fields
(custom_id once per batch, method, url, one model), every problem an errors.data[] entry with its line number. The
batch then ends `failed` with its errors, or moves to `in_progress` with its total and model. A mixin of the batch
driver (batches/driver.py `BatchDriver`), whose store, files, settings and lease it uses.
May import config/, tasks/, protocols/ and batches/; never api or flask.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import marshmallow as ma
import orjson
from loguru import logger

from batches.files import FileStore
from batches.outputs import add_error, clip, error_entry
from batches.store import EXPIRED, FAILED, IN_PROGRESS, VALIDATING, BatchStore
from batches.uploads import is_request_line
from config.settings import Settings
from protocols.errors import ApiError
from protocols.json import JsonBodyError, loads_bounded
from protocols.openai import BATCH_ENDPOINTS, Catalog, Prepared, openai_error

if TYPE_CHECKING:
    from batches.services import DriverServices

LEASE_MS = 10_000  # a driver that died stops holding its batches after this
VALIDATE_PAGE = 1000  # input lines read per round trip while validating
MAX_CUSTOM_ID = 512
LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})

# The line errors a batch's validation reports (errors.data[].code), besides /v1's own for a line's body
# (validation_error, model_not_found, model_not_supported, too_many_inputs).
INVALID_JSON_LINE = "invalid_json_line"
INVALID_REQUEST = "invalid_request"
DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
MISMATCHED_URL = "mismatched_url"
MISMATCHED_MODEL = "mismatched_model"
REQUEST_TOO_LARGE = "request_too_large"
EMPTY_FILE = "empty_file"
TOO_MANY_REQUESTS = "too_many_requests"
TOO_MANY_ERRORS = "too_many_errors"
FILE_NOT_FOUND = "file_not_found"
BATCH_EXPIRED = "batch_expired"  # its window ended before its input was validated (or its lines ended)

_SCHEMAS: dict[str, ma.Schema] = {}  # one instance per endpoint's request schema (loading keeps no state in it)


def prepare(endpoint: str, body: Any, catalog: Catalog) -> Prepared:
    """A line's body checked and translated as its endpoint's /v1 view does (ValidationError or ApiError if not)."""
    schema_class, translate = BATCH_ENDPOINTS[endpoint]
    if isinstance(body, dict) and body.get("stream"):
        raise ApiError(422, "validation_error", "stream is not supported in a batch", {"stream": ["not in a batch"]})
    schema = _SCHEMAS.get(endpoint)
    if schema is None:
        schema = _SCHEMAS[endpoint] = schema_class()
    return translate(schema.load(body), catalog)


def api_error(exc: Exception) -> ApiError:
    """A line's refusal as the /v1 route would answer it."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ma.ValidationError):
        details = exc.messages if isinstance(exc.messages, dict) else {"body": exc.messages}
        return ApiError(422, "validation_error", "the request is invalid; see details for each field", details)
    return ApiError(500, "internal_error", "internal error; the incident was logged")


class Validation:
    """The driver's validating step (see the module's docstring)."""

    store: BatchStore
    files: FileStore
    settings: Settings
    holder: str
    services: DriverServices
    _stopping: threading.Event

    def _validate(self, batch: dict[str, Any]) -> None:
        settings = self.settings
        errors: list[dict[str, Any]] = []
        more = 0
        total = 0
        first_model: dict[str, Any] = {}  # the first line's model (and its line): the batch's
        meta = self.files.get(batch["input_file_id"])
        if meta is None:
            errors.append(error_entry(FILE_NOT_FOUND, "the input file no longer exists", "input_file_id"))
        elif int(meta["lines"]) > settings.batch_max_lines:
            errors.append(
                error_entry(
                    TOO_MANY_REQUESTS,
                    f"the input file has {meta['lines']} lines; a batch takes at most {settings.batch_max_lines} "
                    "(AETHERCORE_BATCH_MAX_LINES): split it",
                    None,
                )
            )
        else:
            count = int(meta["lines"])
            seen: dict[str, int] = {}
            blank: list[int] = []  # blank lines so far: errors if a request follows them, else the file's end
            for start in range(0, count, VALIDATE_PAGE):
                indexes = list(range(start, min(count, start + VALIDATE_PAGE)))
                for index, text in zip(indexes, self.files.lines(meta["id"], indexes)):
                    line = index + 1
                    if text is None or not is_request_line(text):
                        blank.append(line)
                        continue
                    for empty in blank:
                        message = "this line is empty; every line is one request"
                        more += add_error(errors, error_entry(INVALID_JSON_LINE, message, None, empty))
                    blank = []
                    total = line
                    for problem in self._check_line(text, line, batch["endpoint"], seen, first_model):
                        more += add_error(errors, problem)
                if not self._still_validating(batch):
                    return
            if total == 0:
                errors.append(error_entry(EMPTY_FILE, "the input file holds no request", None))
        if more:
            errors.append(
                error_entry(TOO_MANY_ERRORS, f"{more} more errors not listed; fix the ones above first", None)
            )
        log = logger.bind(batch_id=batch["id"])
        if errors:
            outcome = self.store.end(batch, (VALIDATING,), FAILED, final=True, errors=orjson.dumps(errors).decode())
            if outcome == "":
                log.info("batch {}: the input file failed validation ({} errors)", batch["id"], len(errors))
            return
        model = first_model.get("model", "")
        outcome = self.store.transition(batch["id"], (VALIDATING,), IN_PROGRESS, total=total, model=model, next_line=0)
        if outcome == "":
            log.info("batch {}: {} requests for {}, in progress", batch["id"], total, model)

    def _still_validating(self, batch: dict[str, Any]) -> bool:
        """Between pages of a long input file: the batch kept (its lease), and whether its validation goes on (not
        cancelled meanwhile, its window not ended: then it ends `expired` here; this driver not stopping: the next
        driver validates it from the start)."""
        if self._stopping.is_set():
            return False
        self.store.lease(batch["id"], self.holder, LEASE_MS)
        current = self.store.get(batch["id"])
        if current is None or current["status"] != VALIDATING:
            return False  # cancelled (or its owner revoked): the stop path ends it
        if time.time() >= float(current["expires_at"]):
            self._expire_validation(batch)
            return False
        return True

    def _expire_validation(self, batch: dict[str, Any]) -> bool:
        message = "the completion window ended before the input file was validated; no request was run"
        errors = orjson.dumps([error_entry(BATCH_EXPIRED, message, None)]).decode()
        if self.store.end(batch, (VALIDATING,), EXPIRED, final=True, errors=errors) != "":
            return False
        logger.bind(batch_id=batch["id"]).info("batch {}: its window ended while validating", batch["id"])
        return True

    def _check_line(
        self, text: bytes, line: int, endpoint: str, seen: dict[str, int], first_model: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """A line's problems, as errors.data[] entries (none: it runs as the same /v1 request would). A value of the
        caller's is never echoed whole (`_clip`): the errors are kept, listed and sent in the batch's webhook."""
        settings = self.settings
        size = len(text)
        if size > settings.max_request_bytes:
            limit = settings.max_request_bytes
            message = f"this request is {size} bytes; at most {limit} (AETHERCORE_MAX_REQUEST_BYTES)"
            return [error_entry(REQUEST_TOO_LARGE, message, None, line)]
        try:
            request = loads_bounded(text, settings.max_json_depth)
        except JsonBodyError as exc:
            return [error_entry(INVALID_JSON_LINE, f"this line is {exc}", None, line)]
        if not isinstance(request, dict):
            return [error_entry(INVALID_JSON_LINE, "this line is not a JSON object", None, line)]
        problems = []
        unknown = sorted(set(request) - LINE_KEYS)
        if unknown:
            named = ", ".join(clip(key) for key in unknown[:3]) + (
                f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            )
            message = f"unknown field(s) {named}; a line holds custom_id, method, url and body"
            problems.append(error_entry(INVALID_REQUEST, message, unknown[0], line))
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            message = f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters"
            problems.append(error_entry(INVALID_REQUEST, message, "custom_id", line))
        elif custom_id in seen:
            message = f"custom_id {clip(custom_id)} is also on line {seen[custom_id]}; each request needs its own"
            problems.append(error_entry(DUPLICATE_CUSTOM_ID, message, "custom_id", line))
        else:
            seen[custom_id] = line
        if request.get("method") != "POST":
            problems.append(error_entry(INVALID_REQUEST, "method must be POST", "method", line))
        url = request.get("url")
        if url != endpoint:
            message = (
                f"url {clip(url)} is not the batch's endpoint {endpoint}: every line of a batch calls its endpoint"
            )
            problems.append(error_entry(MISMATCHED_URL, message, "url", line))
        body = request.get("body")
        if not isinstance(body, dict):
            problems.append(
                error_entry(INVALID_REQUEST, "body must be a JSON object: the endpoint's request", "body", line)
            )
            return problems
        model = body.get("model")
        if isinstance(model, str):
            first, first_line = first_model.setdefault("model", model), first_model.setdefault("line", line)
            if model != first:
                message = f"model {clip(model)} differs from {clip(first)} (line {first_line}): a batch runs one model"
                problems.append(error_entry(MISMATCHED_MODEL, message, "model", line))
        if url == endpoint:
            try:
                prepare(endpoint, body, self.services.catalog)
            except (ApiError, ma.ValidationError) as exc:
                refusal = api_error(exc)
                error = openai_error(refusal.status, refusal.code, refusal.message, refusal.details)["error"]
                problems.append(error_entry(error["code"], error["message"], error["param"], line))
        return problems
