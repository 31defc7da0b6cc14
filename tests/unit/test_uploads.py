"""An upload read as a stream (batches/files.py): the line splitter's pieces joined are the bytes fed however they were
cut, the blank tail is no line, the limits refuse as soon as they are passed; and the store against a real Redis:
byte for byte, charged to its owner in the step that makes it visible (concurrent uploads cannot pass the quota
together), nothing left behind by a refused upload, the charge dropped with the file and kept as long as it."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from batches.files import FileStore
from batches.uploads import FileTooLarge, InvalidFile, LineSplitter, UploadLimits, is_request_line
from tasks.holdings import FILES, OWNER_BYTES, OWNER_COUNT, TOTAL_BYTES, Held, Holdings, Quota, QuotaExceeded
from tasks.names import file_key, file_lines_key

LIMITS = UploadLimits(max_bytes=1 << 20, max_lines=5, max_line_bytes=100)


def split(content: bytes, cut: int, max_lines: int = 5, max_line_bytes: int = 100) -> tuple[list[bytes], int]:
    """The pieces of `content` fed `cut` bytes at a time, and its number of lines."""
    splitter = LineSplitter(max_lines, max_line_bytes)
    pieces: list[bytes] = []
    for start in range(0, len(content), cut):
        pieces += splitter.feed(content[start : start + cut])
    pieces += splitter.finish()
    assert splitter.pieces == len(pieces)
    return pieces, splitter.lines


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 1000])
def test_the_pieces_are_the_bytes_fed_however_they_were_cut(cut):
    for content in (b"", b"\n", b"a", b"a\nb", b"a\nb\n", b"\n\na\n\n\n", "é\r\nx\n\n".encode(), b"\xff\xfe\n{}"):
        pieces, _lines = split(content, cut)
        assert b"".join(pieces) == content


@pytest.mark.parametrize("cut", [1, 4, 1000])
def test_the_blank_tail_is_no_line_and_blank_lines_between_requests_are(cut):
    assert split(b"a\nb\n\n \n", cut) == ([b"a\n", b"b\n", b"\n", b" \n"], 2)
    assert split(b"a\n\n\nb", cut)[1] == 4  # blank lines before a request count
    assert split(b"\n\n", cut)[1] == 0
    # exactly max_lines requests, then blank lines: they pass, in the tail
    pieces, lines = split(b"a\n" * 5 + b"\n \n\t\n", cut)
    assert lines == 5 and b"".join(pieces) == b"a\n" * 5 + b"\n \n\t\n"


def test_millions_of_empty_lines_are_a_few_pieces_not_an_object_each():
    splitter = LineSplitter(max_lines=5, max_line_bytes=100)
    chunk = b"\n" * (1 << 20)
    pieces = [piece for _ in range(8) for piece in splitter.feed(chunk)] + splitter.finish()
    assert len(pieces) == 5 + 8 and splitter.lines == 0 and sum(map(len, pieces)) == 8 << 20


@pytest.mark.parametrize("cut", [1, 3, 1000])
def test_a_request_past_the_line_limit_is_refused_even_after_blank_lines(cut):
    with pytest.raises(InvalidFile, match="AETHERCORE_BATCH_MAX_LINES"):
        split(b"a\n" * 6, cut)
    with pytest.raises(InvalidFile, match="AETHERCORE_BATCH_MAX_LINES"):
        split(b"a\n" + b"\n" * 100 + b"b\n", cut)  # empty lines do not escape the count


def test_a_line_longer_than_any_request_is_refused_as_soon_as_it_is():
    splitter = LineSplitter(max_lines=5, max_line_bytes=100)
    assert splitter.feed(b"a\n" + b"x" * 60) == [b"a\n"]
    with pytest.raises(InvalidFile, match="line 2 .*AETHERCORE_MAX_REQUEST_BYTES"):
        splitter.feed(b"x" * 60)  # no newline yet: refused before the line ends
    assert split(b"x" * 99 + b"\n", 1000)[1] == 1  # 100 bytes with its newline: the largest line
    with pytest.raises(InvalidFile):
        split(b"x" * 100 + b"\n", 7)


def test_a_request_line_is_one_with_anything_but_whitespace():
    assert not any(map(is_request_line, (b"", b"\n", b" \t\r\n", b"\x0b\x0c\n")))
    assert all(map(is_request_line, (b"{}\n", b" x ", b"\xff\n", b"$nd\n")))


# -- the store, against a real Redis --------------------------------------------------------------------------------
def _store(client: redis.Redis, quota: Quota = Quota(1000, 3), total: int = 0) -> FileStore:
    raw = redis.Redis(connection_pool=redis.ConnectionPool(**{**client.connection_pool.connection_kwargs}))
    raw.connection_pool.connection_kwargs["decode_responses"] = False
    return FileStore(client, raw, 600, Holdings(client, {FILES: quota}, total))


def _chunks(content: bytes, size: int = 7) -> list[bytes]:
    return [content[i : i + size] for i in range(0, len(content), size)]


def test_an_upload_is_stored_byte_for_byte_and_charged_to_its_owner(scratch_redis):
    files = _store(scratch_redis)
    content = b'{"a": "$nd"}\n\n{"b": 1}\n \n\n'
    fields = files.upload("key:a", "f.jsonl", "batch", _chunks(content), 60, LIMITS)
    assert (int(fields["bytes"]), int(fields["lines"])) == (len(content), 3)
    assert b"".join(files.content(files.get(fields["id"]))) == content
    assert files.lines(fields["id"], [0, 2]) == [b'{"a": "$nd"}\n', b'{"b": 1}\n']
    assert files.holdings.usage("key:a")[FILES] == Held(len(content), 1)
    assert files.delete(fields["id"], "key:a") == 1
    assert files.holdings.usage("key:a")[FILES] == Held(0, 0)
    assert not scratch_redis.keys("*file*")


def test_a_refused_upload_leaves_nothing_behind(scratch_redis):
    files = _store(scratch_redis, Quota(500, 2))
    refusals = [
        (b"a\n" * 50, UploadLimits(1 << 20, 10, 100), InvalidFile),
        (b"x" * 200, UploadLimits(1 << 20, 10, 100), InvalidFile),
        (b"a\n" * 50, UploadLimits(99, 100, 100), FileTooLarge),
        (b"a\n" * 300, UploadLimits(1 << 20, 1000, 100), QuotaExceeded),
    ]
    for content, limits, refusal in refusals:
        with pytest.raises(refusal):
            files.upload("key:a", "f", "batch", _chunks(content, 16), 60, limits)
    assert not scratch_redis.keys("*file*") and files.holdings.usage("key:a")[FILES] == Held(0, 0)


def test_the_quota_is_checked_in_the_step_that_makes_the_file_visible(scratch_redis):
    files = _store(scratch_redis, Quota(1000, 5))
    gate = threading.Barrier(8)
    outcomes: list[str] = []

    def slow_chunks():  # every upload has read its whole file before any is published
        yield b"x" * 299 + b"\n"
        gate.wait(timeout=10)

    def upload():
        try:
            files.upload("key:a", "f", "batch", slow_chunks(), 60, UploadLimits(1 << 20, 10, 1000))
            outcomes.append("stored")
        except QuotaExceeded as exc:
            outcomes.append(exc.reason)

    threads = [threading.Thread(target=upload) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["owner_bytes"] * 5 + ["stored"] * 3
    assert files.holdings.usage("key:a")[FILES] == Held(900, 3)
    assert len(scratch_redis.keys(file_lines_key("*"))) == 3


def test_the_file_count_and_every_callers_share_refuse(scratch_redis):
    files = _store(scratch_redis, Quota(10_000, 2), total=2500)
    for _ in range(2):
        files.upload("key:a", "f", "batch", [b"x\n" * 500], 60, UploadLimits(1 << 20, 1000, 100))
    with pytest.raises(QuotaExceeded) as count:
        files.upload("key:a", "f", "batch", [b"x\n"], 60, LIMITS)
    assert count.value.reason == OWNER_COUNT
    with pytest.raises(QuotaExceeded) as share:
        files.upload("key:b", "f", "batch", [b"x\n" * 300], 60, UploadLimits(1 << 20, 1000, 100))
    assert share.value.reason == TOTAL_BYTES and share.value.global_limit
    assert len(scratch_redis.keys(file_lines_key("*"))) == 2 and len(scratch_redis.keys(file_key("*"))) == 4  # 2 files


def test_a_file_kept_longer_keeps_its_charge_and_an_expired_one_leaves_the_account(scratch_redis):
    files = _store(scratch_redis, Quota(1000, 2))
    fields = files.upload("key:a", "f", "batch", [b"x\n" * 100], 60, UploadLimits(1 << 20, 200, 100))
    until = time.time() + 7200
    assert files.keep_until(fields["id"], "key:a", until)
    assert 7000 < scratch_redis.ttl(file_key(fields["id"])) <= 7201
    assert 7000 < scratch_redis.ttl(file_lines_key(fields["id"])) <= 7201
    assert int(files.get(fields["id"])["expires_at"]) >= int(until)
    index = f"aethercore:holdings:key:a:{FILES}"
    assert float(scratch_redis.zscore(index, fields["id"])) >= int(until)
    assert files.keep_until(fields["id"], "key:a", time.time() + 10)  # never shortened
    assert scratch_redis.ttl(file_key(fields["id"])) > 7000
    assert not files.keep_until("file-" + "0" * 32, "key:a", until)

    # an expired file leaves the account: the next upload finds its room
    scratch_redis.zadd(index, {fields["id"]: time.time() - 1})
    files.upload("key:a", "g", "batch", [b"y\n" * 200], 60, UploadLimits(1 << 20, 300, 100))
    files.upload("key:a", "h", "batch", [b"z\n" * 200], 60, UploadLimits(1 << 20, 300, 100))
    assert files.holdings.usage("key:a")[FILES] == Held(800, 2)


def test_the_owners_bytes_refuse_while_reading(scratch_redis):
    files = _store(scratch_redis, Quota(1000, 5))
    files.upload("key:a", "f", "batch", [b"x" * 799 + b"\n"], 60, UploadLimits(1 << 20, 10, 1000))
    read: list[int] = []

    def chunks():
        for index in range(100):
            read.append(index)
            yield b"y" * 99 + b"\n"

    with pytest.raises(QuotaExceeded) as over:
        files.upload("key:a", "g", "batch", chunks(), 60, UploadLimits(1 << 20, 1000, 1000))
    assert over.value.reason == OWNER_BYTES and len(read) == 3  # stopped at the chunk that passed it
