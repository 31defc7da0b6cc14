"""`Idempotency-Key` on every endpoint that creates something (IETF httpapi draft-ietf-httpapi-idempotency-key-header),
written once: the `@idempotent` decorator.

A request carrying `Idempotency-Key: <key>` (1 to 255 visible ASCII characters; the draft's quoted form is taken too)
is identified by its caller (api/ratelimit.py `caller_id`: the API key, JWT subject, or address) and the key, and
fingerprinted by its method, path, query (but `wait`) and body. Within AETHERCORE_IDEMPOTENCY_TTL:

* the same key and fingerprint: what the first request created, answered again (the same job id, the same status
  family), with `Idempotency-Replayed: true`; a request whose first is still running gets the same job too (it waits
  for it as the first does, where the endpoint waits), never a second job;
* the same key and another fingerprint: 422 `idempotency_key_reused`;
* another caller's identical key: a different key.

Two strategies, one decorator:

* endpoints that create a **job** (`@idempotent()`): the key is taken by the Lua step that creates the job
  (tasks/jobs.py `_CREATE_LIMITED`: SET of key -> fingerprint and job id, in the same atomic step), so concurrent
  duplicates create exactly one job and nothing is stored but the job id; a replay reads the job as it stands now.
  A request refused before the job exists (validation, rate limit) leaves the key free, and so does a job that
  could not be queued (api/services.py frees the key); a key whose job's record expired is free again.
* endpoints that create another **resource** (files, batches: `@idempotent(store_response=True)`): the key is
  claimed (SET NX, `pending`) before the view runs, the view's 2xx answer is stored under it, anything else frees
  it; a duplicate arriving while the first is pending waits for it (up to PENDING_WAIT_S, then 409).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from functools import wraps
from typing import Any

import orjson
from flask import Response, after_this_request, current_app, g, request

from api.errors import ApiError
from api.ratelimit import caller_id
from tasks.names import idempotency_key

HEADER = "Idempotency-Key"
REPLAYED = "Idempotency-Replayed"
# The header's documented form: 1 to 255 visible ASCII characters, optionally in the draft's quotes.
_KEY = re.compile(r'^"?[\x21-\x7e]{1,255}"?$')
# A resource request claims its key this long at most before its answer is stored (then a duplicate may run again).
PENDING_S = 120
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


@dataclass
class Claim:
    """This request's Idempotency-Key: its Redis record, fingerprint and retention; `replayed` once it was found."""

    record: str
    fingerprint: str
    ttl_s: int
    replayed: bool = False

    def as_lua(self) -> tuple[str, str, int]:
        return self.record, self.fingerprint, self.ttl_s

    def mark_replayed(self) -> None:
        if not self.replayed:
            self.replayed = True

            @after_this_request
            def _header(response: Response) -> Response:
                response.headers[REPLAYED] = "true"
                return response


def current_claim() -> Claim | None:
    """The Idempotency-Key of the request being served, for the job's creation (api/services.py `submit`); taken
    once, so a second job a view might create is not tied to it."""
    claim = g.get("idempotency")
    if claim is not None:
        g.idempotency = None
    return claim


def idempotent(view: Callable | None = None, *, store_response: bool = False) -> Callable:
    """The decorator (put it on top of the view's decorators): see the module's docstring."""

    def decorator(func: Callable) -> Callable:
        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            claim = _claim()
            if claim is None:
                return func(*args, **kwargs)
            if store_response:
                return _run_storing(claim, func, args, kwargs)
            g.idempotency = claim
            return func(*args, **kwargs)

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
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    ttl = current_app.extensions["aethercore"].settings.idempotency_ttl
    return Claim(idempotency_key(caller_id(), digest), fingerprint(), ttl)


def fingerprint() -> str:
    """What makes two requests the same: method, path, query (but `wait`), and body (a form's fields and its
    files' contents, not its boundary)."""
    digest = hashlib.sha256()
    digest.update(f"{request.method} {request.path}\n".encode())
    for name, value in sorted(request.args.items(multi=True)):
        if name not in _IGNORED_QUERY:
            digest.update(f"{name}={value}\n".encode())
    if request.mimetype == "multipart/form-data":
        for name, value in sorted(request.form.items(multi=True)):
            digest.update(f"form {name}={value}\n".encode())
        for name, upload in sorted(request.files.items(multi=True), key=lambda item: item[0]):
            content = hashlib.sha256()
            stream = upload.stream
            while block := stream.read(1 << 20):  # the spooled file, a block at a time: never all of it in memory
                content.update(block)
                time.sleep(0)  # under gevent, the process's other requests run between blocks
            stream.seek(0)
            digest.update(f"file {name}={upload.filename} {content.hexdigest()}\n".encode())
    else:
        digest.update(request.get_data(cache=True))
    return digest.hexdigest()


def replayed_conflict(job_id: str) -> ApiError:
    return ApiError(
        422,
        "idempotency_key_reused",
        f"this {HEADER} was already used for a different request (it created {job_id or 'something else'}); "
        "use a new key for a new request",
        {HEADER: ["already used with another request"]},
    )


# -- resources (files, batches): the answer is stored ---------------------------------------------------------
def _run_storing(claim: Claim, func: Callable, args: tuple, kwargs: dict) -> Any:
    redis = _redis()
    deadline = time.monotonic() + PENDING_WAIT_S
    pending = orjson.dumps({"fp": claim.fingerprint, "state": "pending"})
    while not redis.set(claim.record, pending, nx=True, ex=PENDING_S):
        held = redis.get(claim.record)
        if held is None:
            continue  # freed meanwhile: claim it
        stored = _parse(held)
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
        _release(redis, claim, pending)
        raise
    if 200 <= response.status_code < 300 and not response.is_streamed:
        body = response.get_data(as_text=True)
        try:
            created = orjson.loads(body).get("id")
        except (orjson.JSONDecodeError, AttributeError):
            created = None
        keep = {k: v for k, v in response.headers.items() if k in ("Location",)}
        done = {"fp": claim.fingerprint, "state": "done", "status": response.status_code, "body": body, "id": created}
        redis.set(claim.record, orjson.dumps({**done, "headers": keep}), ex=claim.ttl_s)
    else:
        _release(redis, claim, pending)
    return response


def _release(redis: Any, claim: Claim, pending: bytes) -> None:
    """Free the key only if it is still this request's pending claim."""
    with redis.pipeline() as pipe:
        try:
            pipe.watch(claim.record)
            if pipe.get(claim.record) in (pending, pending.decode()):
                pipe.multi()
                pipe.delete(claim.record)
                pipe.execute()
        except Exception:  # noqa: BLE001 (another request took it meanwhile: it is theirs)
            pass


def _parse(held: Any) -> dict[str, Any]:
    try:
        value = orjson.loads(held)
    except orjson.JSONDecodeError:
        return {"fp": None, "id": str(held).rpartition(" ")[2]}  # a job's key (`<fingerprint> <job id>`)
    return value if isinstance(value, dict) else {"fp": None}


def _redis() -> Any:
    return current_app.extensions["aethercore"].jobs.redis
