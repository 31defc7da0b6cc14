"""An upload as it arrives, before it is stored (batches/files.py `FileStore.upload`): its body's limit, its bytes
read in chunks that let the process's other requests run between them, and split into lines (`LineSplitter`: each
line with its newline, the blank tail past AETHERCORE_BATCH_MAX_LINES in chunks), refused as soon as a limit is
passed. `is_request_line` is the one rule of what counts as a request, for the upload's line count and for a
batch's validation. No Redis here.
May import the standard library only; never api or flask.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

# An upload is read this much at a time: the CPU one chunk costs is short enough for the process's other requests
# to interleave with it (under gevent they run between chunks only).
CHUNK = 256 * 1024

# What a multipart upload may carry beyond the file itself (boundaries, part headers, the purpose field).
MULTIPART_SLACK = 64 * 1024


def upload_limit(max_file_bytes: int) -> int:
    """The largest body `POST /v1/files` reads (api/security.py sets it on the request before anything reads it)."""
    return max_file_bytes + MULTIPART_SLACK


class InvalidFile(ValueError):
    """An upload no batch could run: more lines than a batch may hold, or a line longer than any request."""


class FileTooLarge(ValueError):
    """An upload of more than AETHERCORE_FILES_MAX_BYTES."""


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int  # AETHERCORE_FILES_MAX_BYTES
    max_lines: int  # AETHERCORE_BATCH_MAX_LINES
    max_line_bytes: int  # AETHERCORE_MAX_REQUEST_BYTES: a longer line could never run


def is_request_line(line: bytes) -> bool:
    """What counts as a request: a line with anything but whitespace on it. Blank lines between requests are lines
    (each fails a batch's validation), the blank lines after the last request are the file's tail, no line: so
    the upload's line count and a batch's validation count requests the same way, through this one rule."""
    return bool(line.strip())


class LineSplitter:
    """An upload's pieces as its bytes arrive (`feed`, then `finish`): its lines, each with its newline, and past
    `max_lines` lines its blank tail in chunks as they came (never split into lines: millions of empty lines cost
    one C scan per chunk, not an object each). Joined, the pieces are the bytes fed. Refuses (InvalidFile) as soon
    as a limit is passed: a request after `max_lines` lines, or a line longer than `max_line_bytes`. `lines`: the
    lines up to the last request (what a batch reads); the pieces after them are the tail."""

    def __init__(self, max_lines: int, max_line_bytes: int) -> None:
        self.max_lines, self.max_line_bytes = max_lines, max_line_bytes
        self.pieces = 0  # pieces given so far
        self.lines = 0
        self._partial = bytearray()  # the line being read, before its newline arrives

    @property
    def _in_tail(self) -> bool:
        return self.pieces >= self.max_lines

    def feed(self, chunk: bytes) -> list[bytes]:
        out: list[bytes] = []
        start = 0
        while start < len(chunk) and not self._in_tail:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._partial += chunk[start:]
                self._check_length(len(self._partial))
                return out
            self._check_length(len(self._partial) + end + 1 - start)
            out.append(self._line(chunk[start : end + 1]))
            start = end + 1
        if start < len(chunk):
            out.append(self._tail(chunk[start:] if start else chunk))
        return out

    def finish(self) -> list[bytes]:
        """The last line, if the file does not end with a newline."""
        return [self._line(b"")] if self._partial else []

    def _line(self, rest: bytes) -> bytes:
        if self._partial:
            self._partial += rest
            line = bytes(self._partial)
            self._partial.clear()
        else:
            line = rest
        self.pieces += 1
        if is_request_line(line):
            self.lines = self.pieces
        return line

    def _tail(self, blank: bytes) -> bytes:
        if is_request_line(blank):
            raise InvalidFile(
                f"the file has more than {self.max_lines} lines; a batch takes at most {self.max_lines} "
                "(AETHERCORE_BATCH_MAX_LINES): split it"
            )
        self.pieces += 1
        return blank

    def _check_length(self, length: int) -> None:
        if length > self.max_line_bytes:
            raise InvalidFile(
                f"line {self.pieces + 1} is longer than {self.max_line_bytes} bytes, the largest request "
                "(AETHERCORE_MAX_REQUEST_BYTES): no batch could run it"
            )


def read_chunks(stream: IO[bytes]) -> Iterator[bytes]:
    """A stream's bytes, CHUNK at a time, letting the process's other requests run between chunks (under gevent,
    monkey-patched, `time.sleep(0)` yields to them; under threads it is a GIL hand-off)."""
    while chunk := stream.read(CHUNK):
        yield chunk
        time.sleep(0)


class YieldingInput:
    """A WSGI input stream that lets the process's other requests run between its reads: werkzeug parses a
    multipart body as fast as the socket gives it, 64 KB at a time, and a client on a fast link keeps the socket
    ready, so under gevent nothing else of the process would run until the whole body is parsed."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        time.sleep(0)
        return self.stream.read(size)

    def readline(self, size: int = -1) -> bytes:
        time.sleep(0)
        return self.stream.readline(size)
