"""The OpenAI Files API's storage: every file lives in Redis, line by line.

A file is two keys: its fields (`file_key`: the OpenAI File object's, plus its owner, its number of lines, how many
pieces hold its bytes, and how many unfinished batches read it) and its pieces (`file_lines_key`: index -> bytes), so
a batch reads any line of its input in one HGET and the file's content is the pieces joined in order, byte for byte
what was uploaded. The first `lines` pieces are the lines a batch reads (each with its newline; `is_request_line`
says which are requests); the pieces after them are the blank tail, which is no line (an upload's last blank lines,
then its blank bytes past AETHERCORE_BATCH_MAX_LINES lines in chunks). A batch's output and error files are written
the same way, one line per answered request, as its requests end (batches/store.py); their fields are added when the
batch ends, which is when they appear in listings.

An upload is read as a stream (`FileStore.upload`): its bytes and lines are counted as they arrive and written to
Redis in pages as they are read, the limits refuse as soon as they are passed, and the file is charged to its owner
(tasks/holdings.py, FILES) in the Lua step that makes it visible, so concurrent uploads cannot pass the quota
together; a refused upload leaves nothing behind.

Why Redis and not a volume: every API process and replica sees the same files without a shared filesystem
(compose and Kubernetes need nothing but the Redis they already have), a batch's state and its files move
together, and the size is bounded: a file holds at most AETHERCORE_FILES_MAX_BYTES, an owner keeps at most
AETHERCORE_FILES_QUOTA of uploads in at most AETHERCORE_FILES_MAX_COUNT files, and every file expires
AETHERCORE_FILES_TTL after its creation (docs/PROTOCOLS.md).
Embeddings in an output file are kept as float32 bytes (tasks/results.py `compact`, ~2.3x smaller than their JSON
digits) and written out as the JSON numbers they were when the file is read; uploaded files are never rewritten.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import redis

from batches.uploads import FileTooLarge, LineSplitter, UploadLimits
from tasks.holdings import FILES, OUTPUTS, OWNER_BYTES, OWNER_COUNT, Held, Holdings, QuotaExceeded, with_holdings
from tasks.names import FILES_ALL, file_key, file_lines_key, files_index_key
from tasks.results import expand
from tasks.tensors import TAG

FILE_ID_RE = re.compile(r"^file-[0-9a-f]{32}$")
PURPOSE_BATCH = "batch"
PURPOSE_BATCH_OUTPUT = "batch_output"
PAGE = 1000  # lines read or written per Redis round trip
PAGE_BYTES = 1 << 20  # ... and at most about this many bytes
# An upload's pieces live this long while it is read (a process that dies mid-upload leaves nothing for long).
UPLOADING_S = 900
# Index entries are kept this long past the files' own retention (a file a batch reads lives a window longer).
INDEX_SLACK_S = 2 * 86400

# Delete a file unless an unfinished batch reads it, and take it out of its owner's account. KEYS: fields, pieces,
# owner's index, every file's index. ARGV: file id, owner. Returns 1 deleted, 0 no such file, -1 in use.
_DELETE = with_holdings(
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'in_use') or '0') > 0 then return -1 end
local kind = 'FILES'
if redis.call('HGET', KEYS[1], 'purpose') == 'PURPOSE_BATCH_OUTPUT' then kind = 'OUTPUTS' end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
hold_drop(ARGV[2], kind, ARGV[1])
return 1
""".replace("PURPOSE_BATCH_OUTPUT", PURPOSE_BATCH_OUTPUT)
    .replace("'FILES'", f"'{FILES}'")
    .replace("'OUTPUTS'", f"'{OUTPUTS}'")
)

# An upload whose pieces are written: charged to its owner and made visible in one step, or refused and its pieces
# deleted. KEYS: fields, pieces, owner's index, every file's index. ARGV: owner, file id, size, expires at, now,
# max bytes, max count, max total (tasks/holdings.py hold_put), ttl, index trim, index ttl, then field/value pairs.
# Returns 1, or hold_put's refusal (-1 owner's bytes, -2 owner's count, -3 every caller's share of Redis).
_PUBLISH_UPLOAD = with_holdings(
    """
local held = hold_put(ARGV[1], 'FILES', ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], false)
if held ~= 1 then
  redis.call('DEL', KEYS[2])
  return held
end
redis.call('HSET', KEYS[1], unpack(ARGV, 12))
redis.call('EXPIRE', KEYS[1], ARGV[9])
redis.call('EXPIRE', KEYS[2], ARGV[9])
for i = 3, 4 do
  redis.call('ZADD', KEYS[i], 'NX', ARGV[5], ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[10])
  redis.call('EXPIRE', KEYS[i], ARGV[11])
end
return 1
""".replace("'FILES'", f"'{FILES}'")
)

# What an owner's uploads hold now (expired ones taken out first). ARGV: owner, now. Returns {bytes, count}.
_HELD = with_holdings(
    """
hold_prune(ARGV[1], 'FILES', tonumber(ARGV[2]), 20)
local bytes, count = hold_used(ARGV[1], 'FILES')
return {bytes, count}
""".replace("'FILES'", f"'{FILES}'")
)

# A file kept until a later time (a batch reads it): its keys, its expires_at and its charge, never shortened.
# KEYS: fields, pieces. ARGV: owner, file id, until (epoch s), now. Returns 1, or 0 when the file is gone.
_KEEP_UNTIL = with_holdings(
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local until_, now = math.ceil(tonumber(ARGV[3])), tonumber(ARGV[4])
for i = 1, 2 do
  local ttl = redis.call('TTL', KEYS[i])
  if ttl >= 0 and now + ttl < until_ then redis.call('EXPIREAT', KEYS[i], until_) end
end
if tonumber(redis.call('HGET', KEYS[1], 'expires_at') or '0') < until_ then
  redis.call('HSET', KEYS[1], 'expires_at', until_)
end
local _, index = hold_keys(ARGV[1], 'FILES')
local charged = redis.call('ZSCORE', index, ARGV[2])
if charged and tonumber(charged) < until_ then hold_renew(ARGV[1], 'FILES', ARGV[2], until_, now) end
return 1
""".replace("'FILES'", f"'{FILES}'")
)


# The sizes of a file's pieces first..last. KEYS: pieces. ARGV: first, last.
_SIZES = """
local sizes = {}
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do sizes[#sizes + 1] = redis.call('HSTRLEN', KEYS[1], tostring(i)) end
return sizes
"""


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


_TAG = TAG.encode()


def rendered(line: bytes) -> bytes:
    """A stored line of a batch's output or error file as it is read: float32 arrays kept as bytes written out as
    JSON numbers again."""
    if _TAG not in line:
        return line
    return orjson.dumps(expand(orjson.loads(line)), option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


class FileStore:
    """`client` answers text (the files' fields, the indexes), `raw` bytes (their pieces, as uploaded); uploads are
    charged to their owners in `holdings` (kind FILES)."""

    def __init__(self, client: redis.Redis, raw: redis.Redis, ttl_s: int, holdings: Holdings) -> None:
        self.redis = client
        self.raw = raw
        self.ttl_s = ttl_s
        self.holdings = holdings
        self._delete = client.register_script(_DELETE)
        self._publish_upload = client.register_script(_PUBLISH_UPLOAD)
        self._held = client.register_script(_HELD)
        self._keep_until = client.register_script(_KEEP_UNTIL)
        self._sizes = client.register_script(_SIZES)

    # -- writes ----------------------------------------------------------------------------------------
    def upload(
        self, owner: str, filename: str, purpose: str, chunks: Iterable[bytes], ttl_s: int, limits: UploadLimits
    ) -> dict[str, Any]:
        """Store an upload read as it arrives (`read_chunks`), charged to `owner`: FileTooLarge, InvalidFile or
        QuotaExceeded as soon as it passes a limit, and then nothing of it is left in Redis."""
        file_id = new_file_id()
        try:
            size, splitter = self._write_pieces(owner, file_id, chunks, limits)
            return self._publish_new(owner, file_id, filename, purpose, size, splitter, ttl_s)
        except BaseException:
            self.raw.delete(file_lines_key(file_id))
            raise

    def _write_pieces(
        self, owner: str, file_id: str, chunks: Iterable[bytes], limits: UploadLimits
    ) -> tuple[int, LineSplitter]:
        """The upload's pieces, written in pages as they are read; its size and its splitter's counts."""
        room = self._room(owner)
        splitter = LineSplitter(limits.max_lines, limits.max_line_bytes)
        page = _Page(self.raw, file_lines_key(file_id))
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > limits.max_bytes:
                raise FileTooLarge(limits.max_bytes)
            if size > room.bytes:  # the owner's quota: the Lua step decides, this only stops reading early
                raise self._over(owner, OWNER_BYTES, size)
            page.add(splitter.feed(chunk))
        page.add(splitter.finish())
        page.flush()
        return size, splitter

    def _room(self, owner: str) -> Held:
        """The bytes an upload of `owner` may still take (QuotaExceeded now if they keep as many files as allowed)."""
        quota = self.holdings.quotas[FILES]
        used = Held(*(int(v) for v in self._held(args=[owner, f"{time.time():.3f}"])))
        if quota.max_count and used.count >= quota.max_count:
            raise self._over(owner, OWNER_COUNT, 0)
        return Held(quota.max_bytes - used.bytes if quota.max_bytes else 1 << 62, used.count)

    def _over(self, owner: str, reason: str, size: int) -> QuotaExceeded:
        used = self.holdings.usage(owner)[FILES]
        return QuotaExceeded(FILES, reason, self.holdings.quotas[FILES], used, size, self.holdings.total_limit)

    def _publish_new(
        self, owner: str, file_id: str, filename: str, purpose: str, size: int, splitter: LineSplitter, ttl_s: int
    ) -> dict[str, Any]:
        now = time.time()
        fields = {
            "id": file_id,
            "bytes": size,
            "created_at": int(now),
            "expires_at": int(now) + ttl_s,
            "filename": filename,
            "purpose": purpose,
            "owner": owner,
            "lines": splitter.lines,
            "pieces": splitter.pieces,
        }
        keys = [file_key(file_id), file_lines_key(file_id), files_index_key(owner), FILES_ALL]
        trim = now - self.ttl_s - INDEX_SLACK_S
        args = [owner, file_id, size, fields["expires_at"], f"{now:.6f}", *self.holdings.lua_limits(FILES)]
        args += [ttl_s, f"{trim:.6f}", self.ttl_s + INDEX_SLACK_S, *_flat(fields)]
        outcome = int(self._publish_upload(keys=keys, args=args))
        if outcome < 0:
            raise self.holdings.refusal(owner, FILES, outcome, size)
        return {k: str(v) for k, v in fields.items()}

    def keep_until(self, file_id: str, owner: str, until: float) -> bool:
        """Keep a file at least until `until` (epoch s): its keys, its expires_at and its owner's charge for it
        (a batch that reads it keeps it through its window); never shortened. False when the file is gone."""
        keys = [file_key(file_id), file_lines_key(file_id)]
        return bool(self._keep_until(keys=keys, args=[owner, file_id, f"{until:.3f}", f"{time.time():.3f}"]))

    def publish(self, file_id: str, owner: str, filename: str, size: int, lines: int) -> None:
        """A batch's output or error file, its lines already written: its fields, now listed like any file.
        Idempotent (a driver that died half-way does it again)."""
        now = int(time.time())
        fields = {
            "id": file_id,
            "bytes": size,
            "created_at": now,
            "expires_at": now + self.ttl_s,
            "filename": filename,
            "purpose": PURPOSE_BATCH_OUTPUT,
            "owner": owner,
            "lines": lines,
        }
        pipe = self.redis.pipeline(transaction=False)
        pipe.hsetnx(file_key(file_id), "created_at", now)  # a second publication keeps the first one's times
        pipe.hget(file_key(file_id), "created_at")
        created = int(pipe.execute()[1])
        fields.update(created_at=created, expires_at=created + self.ttl_s)
        self.redis.expire(file_lines_key(file_id), self.ttl_s)
        self._publish(file_id, owner, fields, self.ttl_s)

    def _publish(self, file_id: str, owner: str, fields: dict[str, Any], ttl_s: int) -> None:
        now = time.time()  # the index's score: exact, so files made in the same second list in their order
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(file_key(file_id), mapping=fields)
        pipe.expire(file_key(file_id), ttl_s)
        for index in (files_index_key(owner), FILES_ALL):
            pipe.zadd(index, {file_id: now}, nx=True)
            pipe.zremrangebyscore(index, "-inf", now - self.ttl_s - INDEX_SLACK_S)
            pipe.expire(index, self.ttl_s + INDEX_SLACK_S)
        pipe.execute()

    def delete(self, file_id: str, owner: str) -> int:
        """1 deleted (and no longer charged to `owner`), 0 gone already, -1 an unfinished batch reads it."""
        keys = [file_key(file_id), file_lines_key(file_id), files_index_key(owner), FILES_ALL]
        return int(self._delete(keys=keys, args=[file_id, owner]))

    # -- reads -----------------------------------------------------------------------------------------
    def get(self, file_id: str) -> dict[str, Any] | None:
        if not FILE_ID_RE.match(file_id):
            return None
        fields = self.redis.hgetall(file_key(file_id))
        if not fields or "id" not in fields:
            return None
        return fields

    def lines(self, file_id: str, indexes: list[int]) -> list[bytes | None]:
        """These lines of a file (None for one it does not have), in one round trip."""
        if not indexes:
            return []
        return self.raw.hmget(file_lines_key(file_id), [str(i) for i in indexes])

    def content(self, fields: dict[str, Any]) -> Iterator[bytes]:
        """The file's bytes, about PAGE_BYTES per round trip (a page of pieces' sizes first: a file of a few long
        lines is never read whole at once): an upload exactly as it was sent, a batch's output or error file with
        its stored results `rendered`."""
        count = int(fields.get("pieces") or fields.get("lines") or 0)
        render = fields.get("purpose") == PURPOSE_BATCH_OUTPUT
        for start in range(0, count, PAGE):
            stop = min(count, start + PAGE)
            sizes = self._sizes(keys=[file_lines_key(fields["id"])], args=[start, stop - 1])
            for group in _groups(range(start, stop), sizes):
                pieces = [piece for piece in self.lines(fields["id"], group) if piece is not None]
                yield b"".join(rendered(piece) for piece in pieces) if render else b"".join(pieces)

    def listing(
        self, owner: str | None, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of `owner`'s files (every file for None), after the file `after`; and whether more follow."""
        index = files_index_key(owner) if owner is not None else FILES_ALL

        def keep(fields: dict[str, Any]) -> bool:
            return not purpose or fields.get("purpose") == purpose

        return cursor_page(self.redis, index, file_key, after, limit, newest_first, keep)


class _Page:
    """An upload's pieces on their way to Redis: written PAGE pieces (or about PAGE_BYTES) per round trip, each
    write renewing the pieces' short life (UPLOADING_S) until the upload is published."""

    def __init__(self, raw: redis.Redis, key: str) -> None:
        self.raw, self.key = raw, key
        self.next = 0  # the index of the next piece
        self.pending: dict[str, bytes] = {}
        self.pending_bytes = 0

    def add(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.pending[str(self.next)] = piece
            self.next += 1
            self.pending_bytes += len(piece)
            if len(self.pending) >= PAGE or self.pending_bytes >= PAGE_BYTES:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        pipe = self.raw.pipeline(transaction=False)
        pipe.hset(self.key, mapping=self.pending)
        pipe.expire(self.key, UPLOADING_S)
        pipe.execute()
        self.pending, self.pending_bytes = {}, 0


def _groups(indexes: range, sizes: list[int]) -> Iterator[list[int]]:
    """`indexes` in runs of about PAGE_BYTES by their pieces' `sizes` (a larger piece alone)."""
    group: list[int] = []
    held = 0
    for index, size in zip(indexes, sizes):
        if group and held + size > PAGE_BYTES:
            yield group
            group, held = [], 0
        group.append(index)
        held += size
    if group:
        yield group


def _flat(fields: dict[str, Any]) -> list[Any]:
    return [item for pair in fields.items() for item in pair]


def cursor_page(
    client: redis.Redis, index: str, key: Any, after: str | None, limit: int, newest_first: bool, keep: Any
) -> tuple[list[dict[str, Any]], bool]:
    """A cursor page over a sorted set of ids (score: creation time) whose objects are hashes: the ids after
    `after` in the order asked, objects that expired skipped (and dropped from the index)."""
    ids = client.zrevrange(index, 0, -1) if newest_first else client.zrange(index, 0, -1)
    if after is not None:
        ids = ids[ids.index(after) + 1 :] if after in ids else []
    found: list[dict[str, Any]] = []
    gone: list[str] = []
    position = 0
    while position < len(ids) and len(found) <= limit:
        chunk = ids[position : position + PAGE]
        position += len(chunk)
        pipe = client.pipeline(transaction=False)
        for object_id in chunk:
            pipe.hgetall(key(object_id))
        for object_id, fields in zip(chunk, pipe.execute()):
            if not fields or "id" not in fields:
                gone.append(object_id)
            elif keep(fields):
                found.append(fields)
    if gone:
        client.zrem(index, *gone)
    return found[:limit], len(found) > limit


def file_object(fields: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI File object."""
    return {
        "id": fields["id"],
        "object": "file",
        "bytes": int(fields.get("bytes") or 0),
        "created_at": int(fields.get("created_at") or 0),
        "expires_at": int(fields["expires_at"]) if fields.get("expires_at") else None,
        "filename": fields.get("filename", ""),
        "purpose": fields.get("purpose", PURPOSE_BATCH),
        "status": "processed",
        "status_details": None,
    }
