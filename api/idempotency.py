"""`Idempotency-Key` on every endpoint that creates something (IETF httpapi draft-ietf-httpapi-idempotency-key-header),
written once: the `@idempotent` decorator.

A request carrying `Idempotency-Key: <key>` (1 to 255 visible ASCII characters; the draft's quoted form is taken too)
is identified by its caller (api/callers.py `caller_id`: the API key, JWT subject, or address) and the key, and
fingerprinted by its method, path, query (but `wait`) and body. Within AETHERCORE_IDEMPOTENCY_TTL:

* the same key and fingerprint: what the first request created, answered again (the same job id, the same status
  family), with `Idempotency-Replayed: true`; a request whose first is still running gets the same job too (it waits
  for it as the first does, where the endpoint waits), never a second job;
* the same key and another fingerprint: 422 `idempotency_key_reused`;
* another caller's identical key: a different key.

Two strategies, one decorator:

* endpoints that create a **job** (`@idempotent()`): the key is taken by the Lua step that creates the job
  (tasks/jobs/lua/create_limited.lua: SET of key -> fingerprint and job id, in the same atomic step), so concurrent
  duplicates create exactly one job and nothing is stored but the job id; a replay reads the job as it stands now.
  A request refused before the job exists (validation, rate limit) leaves the key free, and so does a job that
  could not be queued (submission/submitter.py frees the key); a key whose job's record expired is free again.
* endpoints that create another **resource** (files, batches: `@idempotent(store_response=True)`): the key is
  claimed (`pending`, with a token of this request's own) before the view runs, the view's 2xx answer is stored
  under it, anything else frees it; a duplicate arriving while the first is pending waits for it (up to
  PENDING_WAIT_S, then 409). The answer is stored, and the claim freed, only while the claim is still this request's
  (compare-and-set in Lua): a request that outlived its claim (PENDING_S) cannot free or overwrite a later one's.

The store half (the record, the fingerprint, the claim and its Lua) is submission/idempotency.py; here is the HTTP
half: the header, the decorator, the replayed answer.

Every record is charged to its caller (tasks/holdings.py IDEMPOTENCY) in the step that takes it, and leaves the
account when it is freed or expires: a NEW key that would take the caller past AETHERCORE_IDEMPOTENCY_MAX_KEYS is
refused with 429 `quota_exceeded`; a replay of a key the caller holds is never refused.

One request's wait is never everyone's: a request with a key that stops waiting (api/submitting.py `run_to_end`, a
stream whose client left) leaves the job to its deadline, since a duplicate or the client's retry may be waiting for
the same job (`keyed`), and the key answers the job's real end.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from copy import deepcopy
from functools import wraps
from typing import Any

from flask import Response, after_this_request, current_app, g, request

from api.callers import caller_id
from api.errors import quota_error, refused_error
from protocols.errors import ApiError
from submission.errors import key_reused
from submission.idempotency import (
    Claim,
    StoredAnswers,
    done_value,
    parse_held,
    pending_value,
    record_for,
)
from submission.idempotency import fingerprint as fingerprint_of
from tasks.holdings import IDEMPOTENCY, QuotaExceeded

HEADER = "Idempotency-Key"
REPLAYED = "Idempotency-Replayed"
# The header's documented form: 1 to 255 visible ASCII characters, optionally in the draft's quotes.
_KEY = re.compile(r'^"?[\x21-\x7e]{1,255}"?$')
# How long a duplicate waits for the first request's answer before 409.
PENDING_WAIT_S = 30.0
# Query parameters that do not change what a request creates (only how long it waits for it).
_IGNORED_QUERY = frozenset({"wait"})

HEADER_DOC = {
    "in": "header",
    "name": HEADER,
    "required": False,
    "description": "Makes a retry safe: the same key with the same request within AETHERCORE_IDEMPOTENCY_TTL "
    "returns what the first created (same id, `Idempotency-Replayed: true`); with another request, 422.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 257, "pattern": _KEY.pattern},
}


def _replayed_header() -> None:
    """The answer to this request says it was replayed (`Idempotency-Replayed: true`)."""

    @after_this_request
    def _header(response: Response) -> Response:
        response.headers[REPLAYED] = "true"
        return response


def current_claim() -> Claim | None:
    """The Idempotency-Key of the request being served, for the job's creation (api/submitting.py `request_for`);
    taken once, so a second job a view might create is not tied to it."""
    claim = g.get("idempotency")
    if claim is not None:
        g.idempotency = None
    return claim


def keyed() -> bool:
    """Whether the request being served carries an Idempotency-Key: others (a duplicate, the client's retry) may
    wait for the job it makes, so giving up on it must not cancel it."""
    return bool(g.get("idempotency_keyed"))


def idempotent(view: Callable | None = None, *, store_response: bool = False) -> Callable:
    """The decorator (put it on top of the view's decorators): see the module's docstring."""

    def decorator(func: Callable) -> Callable:
        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            claim = _claim()
            if claim is None:
                return func(*args, **kwargs)
            g.idempotency_keyed = True
            try:
                if store_response:
                    return _run_storing(claim, func, args, kwargs)
                g.idempotency = claim
                return func(*args, **kwargs)
            except QuotaExceeded as exc:
                if exc.kind != IDEMPOTENCY:
                    raise
                raise quota_error(exc) from None

        doc = deepcopy(getattr(func, "_apidoc", {}))
        doc.setdefault("arguments", {}).setdefault("parameters", []).append(dict(HEADER_DOC))
        responses = doc.setdefault("manual_doc", {}).setdefault("responses", {})
        responses.setdefault("400", {"description": "Malformed Idempotency-Key"})
        responses.setdefault("422", {"description": "Invalid body, or an Idempotency-Key used with another request"})
        if store_response:
            responses.setdefault("409", {"description": "A request with this Idempotency-Key is still in progress"})
        wrapper._apidoc = doc
        return wrapper

    return decorator(view) if view is not None else decorator


def _claim() -> Claim | None:
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    key = raw.strip()
    if not _KEY.fullmatch(key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"{HEADER} must be 1 to 255 visible ASCII characters (a UUID is a good choice)",
            {HEADER: ["must be 1 to 255 visible ASCII characters"]},
        )
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]  # the draft's structured-field string: "abc" is the key abc
    ttl = current_app.extensions["aethercore"].settings.idempotency_ttl
    caller = caller_id()
    return Claim(record_for(caller, key), fingerprint(), ttl, caller, on_replay=_replayed_header)


def fingerprint() -> str:
    """What makes two requests the same (submission/idempotency.py `fingerprint`): method, path, query (but `wait`),
    and body (a form's fields and its files' contents, not its boundary)."""
    query = [(name, value) for name, value in request.args.items(multi=True) if name not in _IGNORED_QUERY]
    if request.mimetype == "multipart/form-data":
        files = [(name, upload.filename, upload.stream) for name, upload in request.files.items(multi=True)]
        form = list(request.form.items(multi=True))
        return fingerprint_of(request.method, request.path, query, b"", form, files)
    return fingerprint_of(request.method, request.path, query, request.get_data(cache=True))


def replayed_conflict(job_id: str) -> ApiError:
    return refused_error(key_reused(job_id))


# -- resources (files, batches): the answer is stored ---------------------------------------------------------
def _run_storing(claim: Claim, func: Callable, args: tuple, kwargs: dict) -> Any:
    answers = _stored_answers()
    deadline = time.monotonic() + PENDING_WAIT_S
    pending = pending_value(claim)
    while True:
        claimed, held = answers.claim(claim, pending)
        if claimed:
            break
        stored = parse_held(held)
        if stored.get("fp") != claim.fingerprint:
            raise replayed_conflict(str(stored.get("id") or ""))
        if stored.get("state") == "done":
            claim.mark_replayed()
            response = current_app.response_class(stored["body"], status=stored["status"], mimetype="application/json")
            for name, value in stored.get("headers", {}).items():
                response.headers[name] = value
            return response
        if time.monotonic() > deadline:
            raise ApiError(
                409,
                "idempotency_key_in_progress",
                f"a request with this {HEADER} is still in progress; retry once it has been answered",
            )
        time.sleep(0.05)
    try:
        response = current_app.make_response(func(*args, **kwargs))
    except BaseException:
        answers.release(claim, pending)
        raise
    if 200 <= response.status_code < 300 and not response.is_streamed:
        keep = {k: v for k, v in response.headers.items() if k in ("Location",)}
        answers.store(claim, pending, done_value(claim, response.status_code, response.get_data(as_text=True), keep))
    else:
        answers.release(claim, pending)
    return response


def _stored_answers() -> StoredAnswers:
    extensions = current_app.extensions
    if "aethercore_stored_answers" not in extensions:
        svc = extensions["aethercore"]
        extensions["aethercore_stored_answers"] = StoredAnswers(svc.jobs.redis, svc.settings.idempotency_max_keys)
    return extensions["aethercore_stored_answers"]
