"""Idempotency-Key records below HTTP: the store half of `@idempotent` (api/idempotency.py is the HTTP half: the
header, the decorator, the replayed answer).

A key is identified by its caller and a digest of the key (`record_for`); a request by its fingerprint
(`fingerprint`: method, path, query but `wait`, and body, a form's fields and its files' contents). The record of
this request's key is a `Claim`. Endpoints that create a job have the key taken by the Lua step that creates the
job (tasks/jobs/lua/create_limited.lua); endpoints that create another resource (files, batches) claim it first
(`StoredAnswers.claim`, `pending` with a token of the request's own), store their 2xx answer under it
(`StoredAnswers.store`) or free it (`StoredAnswers.release`), each one atomic step with the record's charge to its
caller (tasks/holdings.py IDEMPOTENCY), and each only over the request's own claim (compare-and-set in Lua): a
request that outlived its claim (PENDING_S) cannot free or overwrite a later one's.

May import: config/, tasks/ and third-party libraries (redis, orjson). Never api/, flask, flask_smorest or workers/.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

import orjson

from tasks.holdings import IDEMPOTENCY, OWNER_COUNT, Held, Quota, QuotaExceeded, with_holdings
from tasks.jobs.scripts import KEY_OVERHEAD
from tasks.names import idempotency_key

# A resource request claims its key this long at most before its answer is stored (then a duplicate may run again).
PENDING_S = 120


@dataclass
class Claim:
    """This request's Idempotency-Key: its Redis record, fingerprint, retention and the caller it is charged to;
    `replayed` once it was found (`on_replay`, if any, is called then, once: the HTTP layer's replayed header)."""

    record: str
    fingerprint: str
    ttl_s: int
    owner: str
    replayed: bool = False
    on_replay: Callable[[], None] | None = None

    def as_lua(self) -> tuple[str, str, int, str]:
        return self.record, self.fingerprint, self.ttl_s, self.owner

    def mark_replayed(self) -> None:
        if not self.replayed:
            self.replayed = True
            if self.on_replay is not None:
                self.on_replay()


def record_for(caller: str, key: str) -> str:
    """The Redis record of `caller`'s Idempotency-Key `key` (already checked and unquoted)."""
    return idempotency_key(caller, hashlib.sha256(key.encode()).hexdigest()[:40])


def fingerprint(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    body: bytes,
    form: Iterable[tuple[str, str]] | None = None,
    files: Iterable[tuple[str, str | None, IO[bytes]]] | None = None,
) -> str:
    """What makes two requests the same: method, path, query (sorted, as given: the caller leaves out what does
    not count), and body; a multipart form (`form` and `files` given) by its fields and its files' contents (name,
    filename, stream, each stream read a block at a time and rewound), not its boundary."""
    digest = hashlib.sha256()
    digest.update(f"{method} {path}\n".encode())
    for name, value in sorted(query):
        digest.update(f"{name}={value}\n".encode())
    if form is not None:
        for name, value in sorted(form):
            digest.update(f"form {name}={value}\n".encode())
        for name, filename, stream in sorted(files or (), key=lambda item: item[0]):
            content = hashlib.sha256()
            while block := stream.read(1 << 20):  # the spooled file, a block at a time: never all of it in memory
                content.update(block)
                time.sleep(0)  # under gevent, the process's other requests run between blocks
            stream.seek(0)
            digest.update(f"file {name}={filename} {content.hexdigest()}\n".encode())
    else:
        digest.update(body)
    return digest.hexdigest()


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


def pending_value(claim: Claim) -> bytes:
    """What a claimed key holds while its request runs: its fingerprint and a token of the request's own."""
    return orjson.dumps({"fp": claim.fingerprint, "state": "pending", "token": secrets.token_hex(16)})


def done_value(claim: Claim, status: int, body: str, headers: dict[str, str]) -> bytes:
    """What a key holds once its request's 2xx answer is stored: the answer, and the id of what it created."""
    try:
        created = orjson.loads(body).get("id")
    except (orjson.JSONDecodeError, AttributeError):
        created = None
    done = {"fp": claim.fingerprint, "state": "done", "status": status, "body": body, "id": created}
    return orjson.dumps({**done, "headers": headers})


def parse_held(held: Any) -> dict[str, Any]:
    """What a key holds, read: a resource's claim or stored answer (JSON), or a job's key (its job id)."""
    try:
        value = orjson.loads(held)
    except orjson.JSONDecodeError:
        return {"fp": None, "id": str(held).rpartition(" ")[2]}  # a job's key (`<fingerprint> <job id>`)
    return value if isinstance(value, dict) else {"fp": None}
