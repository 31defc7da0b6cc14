"""The OpenAI Files API's storage: every file lives in Redis, line by line.

A file is two keys: its fields (`file_key`: the OpenAI File object's, plus its owner, its number of lines and how
many unfinished batches read it) and its lines (`file_lines_key`: line index -> that line, newline included), so a
batch reads any line of its input in one HGET and the file's content is the lines joined in order, byte for byte
what was uploaded. A batch's output and error files are written the same way, one line per answered request, as its
requests end (api/batches.py); their fields are added when the batch ends, which is when they appear in listings.

Why Redis and not a volume: every API process and replica sees the same files without a shared filesystem
(compose and Kubernetes need nothing but the Redis they already have), a batch's state and its files move
together, and the size is bounded: a file holds at most AETHERCORE_FILES_MAX_BYTES, an owner keeps at most
AETHERCORE_FILES_QUOTA of uploads, and every file expires AETHERCORE_FILES_TTL after its creation (docs/PROTOCOLS.md).
Embeddings in an output file are kept as float32 bytes (tasks/results.py `compact`, ~2.3x smaller than their JSON
digits) and written out as the JSON numbers they were when the file is read.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import redis

from tasks.names import FILES_ALL, file_key, file_lines_key, files_index_key
from tasks.results import expand
from tasks.tensors import TAG

FILE_ID_RE = re.compile(r"^file-[0-9a-f]{32}$")
PURPOSE_BATCH = "batch"
PURPOSE_BATCH_OUTPUT = "batch_output"
PAGE = 1000  # lines read or written per Redis round trip
# Index entries are kept this long past the files' own retention (a file a batch reads lives a window longer).
INDEX_SLACK_S = 2 * 86400

# Delete a file unless an unfinished batch reads it. KEYS: fields, lines, owner's index, every file's index.
# ARGV: file id. Returns 1 deleted, 0 no such file, -1 in use.
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'in_use') or '0') > 0 then return -1 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""


# What a multipart upload may carry beyond the file itself (boundaries, part headers, the purpose field).
MULTIPART_SLACK = 64 * 1024


def upload_limit(max_file_bytes: int) -> int:
    """The largest body `POST /v1/files` reads (api/security.py sets it on the request before anything reads it)."""
    return max_file_bytes + MULTIPART_SLACK


class FileTooLong(ValueError):
    """An upload with more lines than a batch may hold."""


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def split_lines(content: bytes) -> list[bytes]:
    """The file's lines, each with its newline (the last one without, if the file does not end with one): joined,
    they are the file again. Bytes: whatever was uploaded is kept as it was (a line that is not UTF-8 JSON is a
    batch's validation error, with its line number)."""
    parts = content.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


_TAG = TAG.encode()


def rendered(line: bytes) -> bytes:
    """A stored line as it is read: float32 arrays kept as bytes written out as JSON numbers again."""
    if _TAG not in line:
        return line
    return orjson.dumps(expand(orjson.loads(line)), option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


class FileStore:
    """`client` answers text (the files' fields, the indexes), `raw` bytes (their lines, as uploaded)."""

    def __init__(self, client: redis.Redis, raw: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.raw = raw
        self.ttl_s = ttl_s
        self._delete = client.register_script(_DELETE)

    # -- writes ----------------------------------------------------------------------------------------
    def put(self, owner: str, filename: str, purpose: str, lines: list[bytes], size: int, ttl_s: int) -> dict[str, Any]:
        """Store an uploaded file (its lines, from `split_lines`); its fields last, so it is never seen half-written."""
        file_id, now = new_file_id(), int(time.time())
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(lines), PAGE):
            page = range(start, min(len(lines), start + PAGE))
            pipe.hset(file_lines_key(file_id), mapping={str(i): lines[i] for i in page})
        if lines:
            pipe.expire(file_lines_key(file_id), ttl_s)
        pipe.execute()
        fields = {
            "id": file_id,
            "bytes": size,
            "created_at": now,
            "expires_at": now + ttl_s,
            "filename": filename,
            "purpose": purpose,
            "owner": owner,
            "lines": len(lines),
        }
        self._publish(file_id, owner, fields, ttl_s)
        return self.get(file_id) or fields

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
        """1 deleted, 0 gone already, -1 an unfinished batch reads it."""
        keys = [file_key(file_id), file_lines_key(file_id), files_index_key(owner), FILES_ALL]
        return int(self._delete(keys=keys, args=[file_id]))

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
        """The file's bytes, PAGE lines per round trip."""
        count = int(fields.get("lines") or 0)
        for start in range(0, count, PAGE):
            page = self.lines(fields["id"], list(range(start, min(count, start + PAGE))))
            yield b"".join(rendered(line) for line in page if line is not None)

    def usage(self, owner: str) -> int:
        """Bytes of the files `owner` uploaded that are still kept (batch outputs are not counted)."""
        ids = self.redis.zrange(files_index_key(owner), 0, -1)
        if not ids:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for file_id in ids:
            pipe.hmget(file_key(file_id), "bytes", "purpose")
        return sum(int(size) for size, purpose in pipe.execute() if size and purpose != PURPOSE_BATCH_OUTPUT)

    def listing(
        self, owner: str | None, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of `owner`'s files (every file for None), after the file `after`; and whether more follow."""
        index = files_index_key(owner) if owner is not None else FILES_ALL

        def keep(fields: dict[str, Any]) -> bool:
            return not purpose or fields.get("purpose") == purpose

        return cursor_page(self.redis, index, file_key, after, limit, newest_first, keep)


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
