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

Every record is charged to its caller (tasks/holdings.py IDEMPOTENCY) in the step that takes it, and leaves the
account when it is freed or expires: a NEW key that would take the caller past AETHERCORE_IDEMPOTENCY_MAX_KEYS is
refused with 429 `quota_exceeded`; a replay of a key the caller holds is never refused.

One request's wait is never everyone's: a request with a key that stops waiting (api/submitting.py `run_to_end`, a
stream whose client left) leaves the job to its deadline, since a duplicate or the client's retry may be waiting for
the same job (`keyed`), and the key answers the job's real end.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from functools import wraps
from typing import Any

import orjson
from flask import Response, after_this_request, current_app, g, request

from api.callers import caller_id
from api.errors import quota_error, refused_error
from protocols.errors import ApiError
from submission.errors import key_reused
from tasks.holdings import IDEMPOTENCY, OWNER_COUNT, Held, Quota, QuotaExceeded, with_holdings
from tasks.jobs.scripts import KEY_OVERHEAD
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
    """This request's Idempotency-Key: its Redis record, fingerprint, retention and the caller it is charged to;
    `replayed` once it was found."""

    record: str
    fingerprint: str
    ttl_s: int
    owner: str
    replayed: bool = False

    def as_lua(self) -> tuple[str, str, int, str]:
        return self.record, self.fingerprint, self.ttl_s, self.owner

    def mark_replayed(self) -> None:
        if not self.replayed:
            self.replayed = True

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
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    ttl = current_app.extensions["aethercore"].settings.idempotency_ttl
    caller = caller_id()
    return Claim(idempotency_key(caller, digest), fingerprint(), ttl, caller)


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
    return refused_error(key_reused(job_id))


# -- resources (files, batches): the answer is stored ---------------------------------------------------------
def _charging(script: str) -> str:
    return with_holdings(script.replace("IDEMPOTENCY_KIND", IDEMPOTENCY).replace("KEY_OVERHEAD", str(KEY_OVERHEAD)))


# The claim, the stored answer and the release, each one atomic step with the record's charge (tasks/holdings.py).
# _CLAIM: KEYS record; ARGV pending value (with this request's token), PENDING_S, owner, now, most keys.
# -> {1} claimed, {0, what is held}, {-1, holdings refusal}. The charge lasts as long as the pending claim.
_CLAIM = _charging("""
local held = redis.call('GET', KEYS[1])
if held then return {0, held} end
local now, size = tonumber(ARGV[4]), KEY_OVERHEAD + #KEYS[1] + #ARGV[1]
local charged = hold_put(ARGV[3], 'IDEMPOTENCY_KIND', KEYS[1], size, now + tonumber(ARGV[2]), now, 0, ARGV[5], 0, false)
if charged < 0 then return {-1, charged} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return {1}
""")
# _STORE: KEYS record; ARGV this request's pending value, the answer, retention, owner, now. Only over its own claim.
_STORE = _charging("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
local now, size = tonumber(ARGV[5]), KEY_OVERHEAD + #KEYS[1] + #ARGV[2]
hold_put(ARGV[4], 'IDEMPOTENCY_KIND', KEYS[1], size, now + tonumber(ARGV[3]), now, 0, 0, 0, true)
return 1
""")
# _RELEASE: KEYS record; ARGV this request's pending value, owner. Only its own claim.
_RELEASE = _charging("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
hold_drop(ARGV[2], 'IDEMPOTENCY_KIND', KEYS[1])
return 1
""")


class StoredAnswers:
    """The scripts of stored-answer claims on one Redis (one per app)."""

    def __init__(self, client: Any, max_keys: int) -> None:
        self.max_keys = max_keys
        self._claim, self._store, self._release = (client.register_script(s) for s in (_CLAIM, _STORE, _RELEASE))

    def claim(self, claim: Claim, pending: bytes) -> tuple[bool, Any]:
        """(True, None) claimed; (False, what the key holds); QuotaExceeded for a new key past the caller's most."""
        reply = self._claim(keys=[claim.record], args=[pending, PENDING_S, claim.owner, time.time(), self.max_keys])
        if int(reply[0]) < 0:
            quota = Quota(0, self.max_keys, "", "AETHERCORE_IDEMPOTENCY_MAX_KEYS")
            raise QuotaExceeded(IDEMPOTENCY, OWNER_COUNT, quota, Held(0, self.max_keys), len(pending), 0)
        return int(reply[0]) == 1, (reply[1] if len(reply) > 1 else None)

    def store(self, claim: Claim, pending: bytes, answer: bytes) -> bool:
        args = [pending, answer, claim.ttl_s, claim.owner, time.time()]
        return bool(self._store(keys=[claim.record], args=args))

    def release(self, claim: Claim, pending: bytes) -> bool:
        return bool(self._release(keys=[claim.record], args=[pending, claim.owner]))


def _run_storing(claim: Claim, func: Callable, args: tuple, kwargs: dict) -> Any:
    answers = _stored_answers()
    deadline = time.monotonic() + PENDING_WAIT_S
    pending = orjson.dumps({"fp": claim.fingerprint, "state": "pending", "token": secrets.token_hex(16)})
    while True:
        claimed, held = answers.claim(claim, pending)
        if claimed:
            break
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
        answers.release(claim, pending)
        raise
    if 200 <= response.status_code < 300 and not response.is_streamed:
        body = response.get_data(as_text=True)
        try:
            created = orjson.loads(body).get("id")
        except (orjson.JSONDecodeError, AttributeError):
            created = None
        keep = {k: v for k, v in response.headers.items() if k in ("Location",)}
        done = {"fp": claim.fingerprint, "state": "done", "status": response.status_code, "body": body, "id": created}
        answers.store(claim, pending, orjson.dumps({**done, "headers": keep}))
    else:
        answers.release(claim, pending)
    return response


def _parse(held: Any) -> dict[str, Any]:
    try:
        value = orjson.loads(held)
    except orjson.JSONDecodeError:
        return {"fp": None, "id": str(held).rpartition(" ")[2]}  # a job's key (`<fingerprint> <job id>`)
    return value if isinstance(value, dict) else {"fp": None}


def _stored_answers() -> StoredAnswers:
    extensions = current_app.extensions
    if "aethercore_stored_answers" not in extensions:
        svc = extensions["aethercore"]
        extensions["aethercore_stored_answers"] = StoredAnswers(svc.jobs.redis, svc.settings.idempotency_max_keys)
    return extensions["aethercore_stored_answers"]
