"""Hostile uploads (issue 34, cases 1, 6, 7 and 11): `POST /v1/files` read as a stream by a real API process.

45 MB of bare newlines once took an API process to 4.6 GB and held its other requests for the whole parse; a line
holding the bytes `$nd` came back cut short; concurrent uploads passed the quota together; exactly
AETHERCORE_BATCH_MAX_LINES requests and a blank tail failed their batch. Each attack runs as an ordinary `user`;
while a large upload is read, /health/live of the same (single) API process answers within a second and the
process's memory stays flat; refusals are 4xx in OpenAI's error shape and leave nothing in Redis; once the attack's
files are deleted, Redis's used memory is back near where it was; afterwards the process serves another caller.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tasks.holdings import Holdings
from tests.hostile.conftest import assert_still_serving, auth, ensure_loaded
from tests.support import USER_KEY, ApiProcess, base_env, wait_until

MB = 1 << 20
BIG = 45 * MB
# Callers of their own for the quota races (a clean account each, whatever the suite's `user` holds); role `user`.
RACERS = [f"upload-racer-{i}-key-0123456789" for i in range(8)]
SMALL_QUOTA, SMALL_COUNT, SMALL_LINES = 1_000_000, 4, 50


def upload(api: ApiProcess, content: bytes, key: str = USER_KEY, filename: str = "f.jsonl") -> requests.Response:
    return requests.post(
        f"{api.base}/v1/files",
        headers=auth(key),
        files={"file": (filename, content)},
        data={"purpose": "batch"},
        timeout=300,
    )


def delete(api: ApiProcess, file_id: str, key: str = USER_KEY) -> None:
    response = requests.delete(f"{api.base}/v1/files/{file_id}", headers=auth(key), timeout=30)
    assert response.status_code == 200 and response.json()["deleted"], response.text


def assert_openai_error(response: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["type"] and error["message"], error
    return error


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def assert_memory_back(client: redis.Redis, baseline: int, slack: int = 4 * MB) -> None:
    """Redis's used memory returns near `baseline` (what the attack's objects took is freed, not kept)."""
    wait_until(lambda: used_memory(client) <= baseline + slack, 10, 0.2, "Redis's used memory to return")


def file_keys(client: redis.Redis) -> set[str]:
    return set(client.scan_iter("aethercore:file:*", count=1000))


def worker_pid(api: ApiProcess) -> int:
    """The (single) gunicorn worker of `api`: the process that reads the uploads."""
    master = api.proc.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def memory_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


@contextmanager
def watched(api: ApiProcess) -> Iterator[dict[str, float]]:
    """While the block runs: the slowest /health/live of another caller, and how far the API process's peak RSS
    (VmHWM, reset first) rose above its RSS before."""
    pid = worker_pid(api)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak RSS starts again from the RSS now
    before = memory_mb(pid, "VmRSS")
    seen = {"slowest_live_s": 0.0, "rss_growth_mb": 0.0}
    stop, failed = threading.Event(), []

    def probe() -> None:
        session = requests.Session()
        try:
            while not stop.is_set():
                started = time.monotonic()
                assert session.get(f"{api.base}/health/live", timeout=120).status_code == 200
                seen["slowest_live_s"] = max(seen["slowest_live_s"], time.monotonic() - started)
                stop.wait(0.02)
        except Exception as exc:  # noqa: BLE001 - reported by the test's thread
            failed.append(exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=130)
        seen["rss_growth_mb"] = memory_mb(pid, "VmHWM") - before
    assert not failed and not thread.is_alive(), failed


def bare_newlines() -> bytes:
    return b"\n" * BIG


def full_file() -> bytes:
    """50,000 embeddings requests (the line limit) of ~943 bytes each: 45 MB."""
    size = BIG // 50_000
    lines = []
    for i in range(50_000):
        head = json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "x"}})
        lines.append(head[:-2] + ', "input": "' + "w" * (size - len(head) - 14) + '"}}\n')
    return "".join(lines).encode()


def download(api: ApiProcess, file_id: str, key: str = USER_KEY) -> tuple[bytes, str]:
    response = requests.get(f"{api.base}/v1/files/{file_id}/content", headers=auth(key), timeout=300)
    assert response.status_code == 200, response.text[:300]
    return response.content, response.headers["Content-Length"]


# -- case 1: read as a stream -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [bare_newlines, full_file], ids=["bare-newlines", "50000-requests"])
def test_a_45_mb_upload_is_read_as_a_stream(hostile_api, hostile_redis, make: Callable[[], bytes]):
    content = make()
    baseline = used_memory(hostile_redis)
    with watched(hostile_api) as seen:
        started = time.monotonic()
        response = upload(hostile_api, content)
        took = time.monotonic() - started
    print(f"{make.__name__}: {len(content)} bytes in {took:.2f} s, {seen}")
    assert response.status_code == 200, response.text
    created = response.json()
    assert created["bytes"] == len(content)
    assert seen["slowest_live_s"] < 1.0, seen  # was 25 s: the whole parse held the process
    assert seen["rss_growth_mb"] < 200, seen  # was 4.4 GB for the newlines
    got, length = download(hostile_api, created["id"])
    assert hashlib.sha256(got).digest() == hashlib.sha256(content).digest() and int(length) == len(content)
    delete(hostile_api, created["id"])
    assert_memory_back(hostile_redis, baseline)
    assert_still_serving(hostile_api, hostile_redis)


def test_a_request_after_millions_of_empty_lines_is_refused_and_leaves_nothing(hostile_api, hostile_redis):
    keys, baseline = file_keys(hostile_redis), used_memory(hostile_redis)
    with watched(hostile_api) as seen:
        response = upload(hostile_api, b"\n" * BIG + b'{"custom_id": "late"}\n')
    error = assert_openai_error(response, 400, "invalid_file")
    assert "AETHERCORE_BATCH_MAX_LINES" in error["message"]
    assert seen["slowest_live_s"] < 1.0 and seen["rss_growth_mb"] < 200, seen
    assert file_keys(hostile_redis) == keys
    assert_memory_back(hostile_redis, baseline)
    assert_still_serving(hostile_api, hostile_redis)


def test_one_line_larger_than_any_request_is_refused_cleanly(hostile_api, hostile_redis):
    keys = file_keys(hostile_redis)
    with watched(hostile_api) as seen:
        response = upload(hostile_api, b'{"custom_id": "huge", "body": "' + b"x" * (12 * MB) + b'"}\n')
    error = assert_openai_error(response, 400, "invalid_file")
    assert "line 1 " in error["message"] and "AETHERCORE_MAX_REQUEST_BYTES" in error["message"]
    assert seen["rss_growth_mb"] < 200, seen
    assert file_keys(hostile_redis) == keys
    assert_still_serving(hostile_api, hostile_redis)


# -- the multipart body itself ----------------------------------------------------------------------------------------
BOUNDARY = b"hostile-boundary"


def multipart(content: bytes, purpose: bytes = b"batch", filename: bytes = b"f.jsonl", close: bool = True) -> bytes:
    parts = [
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + purpose + b"\r\n",
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n",
    ]
    return b"".join(parts) + (b"--" + BOUNDARY + b"--\r\n" if close else b"")


def raw_upload(api: ApiProcess, body: bytes, content_length: int | None, hold_s: float = 0.0) -> bytes:
    """The body with the Content-Length given (None: chunked), then the write side closed after `hold_s`; what the
    server answered (its first response's bytes, or b"" if it closed without one)."""
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=60)
    try:
        head = (
            f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {USER_KEY}\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}\r\n"
        )
        if content_length is None:
            sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            try:
                for start in range(0, len(body), 65536):
                    piece = body[start : start + 65536]
                    sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                sock.sendall(b"0\r\n\r\n")
            except OSError:  # refused mid-body: its answer is read below
                pass
        else:
            sock.sendall(f"{head}Content-Length: {content_length}\r\n\r\n".encode() + body)
        time.sleep(hold_s)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        return answer
    finally:
        sock.close()


def first_response(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, rest = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    return status, json.loads(rest[:length])


def test_multipart_size_lies_and_broken_bodies_get_4xx_never_5xx(hostile_api, hostile_redis):
    lines = b'{"custom_id": "a"}\n' * 500
    body = multipart(lines)
    outcomes = {
        "content-length smaller": raw_upload(hostile_api, body, len(body) - 3000),
        "content-length larger, body cut": raw_upload(hostile_api, body[:-500], len(body), hold_s=1.5),
        "chunked, past the limit": raw_upload(hostile_api, multipart(b"x\n" * (26 * MB)), None),
        "no closing boundary": raw_upload(hostile_api, multipart(lines, close=False), None),
        "non-UTF-8 filename": raw_upload(hostile_api, multipart(lines, filename=b"\xff\xfe.jsonl"), None),
        "non-UTF-8 purpose": raw_upload(hostile_api, multipart(lines, purpose=b"\xff\xfe"), None),
    }
    for name, answer in outcomes.items():
        status, document = first_response(answer)
        assert 400 <= status < 500 and set(document["error"]) >= {"message", "type", "code"}, (name, answer[:300])
    assert first_response(outcomes["chunked, past the limit"])[1]["error"]["code"] == "file_too_large"

    # the body is complete before the Content-Length says: the file is what was sent
    status, created = first_response(raw_upload(hostile_api, body, len(body) + 1000, hold_s=0.5))
    if status == 200:
        assert download(hostile_api, created["id"])[0] == lines
        delete(hostile_api, created["id"])
    else:
        assert 400 <= status < 500, created

    no_file = requests.post(f"{hostile_api.base}/v1/files", headers=auth(), files={"purpose": (None, "batch")})
    assert assert_openai_error(no_file, 422, "validation_error")["param"] == "file"
    as_field = requests.post(
        f"{hostile_api.base}/v1/files", headers=auth(), files={"purpose": (None, "batch"), "file": (None, "{}\n")}
    )
    assert assert_openai_error(as_field, 422, "validation_error")["param"] == "file"
    assert_still_serving(hostile_api, hostile_redis)


# -- case 7: bytes come back as they were sent ------------------------------------------------------------------------
def test_uploaded_bytes_come_back_byte_for_byte(hostile_api, hostile_redis):
    content = (
        b'{"custom_id": "a",   "body": {"input": "$nd"}}\n'  # valid JSON holding the tag, spaced as sent
        b"$nd is not JSON at all\n"
        b'{"$nd": "AAAAAA==", "dtype": "<f4", "shape": [1]}\n'  # what a stored result looks like
        b"\xff\xfe not UTF-8 \xc3\x28\n"
        b'{"custom_id": "\\u00e9"}\r\n'
        b"\n \n"
    )
    response = upload(hostile_api, content)
    assert response.status_code == 200, response.text
    got, length = download(hostile_api, response.json()["id"])
    assert got == content and int(length) == len(content)
    delete(hostile_api, response.json()["id"])
    assert_still_serving(hostile_api, hostile_redis)


# -- case 6 (uploads) and case 11: an API with small limits, for races and a batch of exactly its line limit ----------
@pytest.fixture(scope="module")
def small_api(hostile_redis_url: str, hostile_worker) -> Iterator[ApiProcess]:
    keys = base_env(hostile_redis_url)["AETHERCORE_API_KEYS"] + "".join(f",{key}:user" for key in RACERS)
    # Its own batch driver (the suite's stands aside meanwhile): case 11's batch runs by this API's line limit and
    # its owner is one of this API's keys.
    server = ApiProcess(
        hostile_redis_url,
        name="hostile-api-uploads",
        batches=True,
        AETHERCORE_AUTH="true",
        AETHERCORE_WORKERS="1",
        AETHERCORE_AUTH_FAILURE_LIMIT="100",
        AETHERCORE_API_KEYS=keys,
        AETHERCORE_FILES_MAX_BYTES=str(SMALL_QUOTA),
        AETHERCORE_FILES_QUOTA=str(SMALL_QUOTA),
        AETHERCORE_FILES_MAX_COUNT=str(SMALL_COUNT),
        AETHERCORE_BATCH_MAX_LINES=str(SMALL_LINES),
        AETHERCORE_HOLDINGS_MAX_SHARE="0.05",
    ).start()
    yield server
    server.stop()


def blob(size: int) -> bytes:
    """`size` bytes in lines of 25,000 (under SMALL_LINES lines for any size the small API takes)."""
    return (b"x" * 24_999 + b"\n") * (size // 25_000)


def race(api: ApiProcess, key: str, contents: list[bytes]) -> list[requests.Response]:
    """Every upload sent at once (each has its body ready; they start together)."""
    gate = threading.Barrier(len(contents))
    answers: list[requests.Response] = []

    def one(content: bytes) -> None:
        gate.wait(timeout=30)
        answers.append(upload(api, content, key))

    threads = [threading.Thread(target=one, args=(content,)) for content in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


def listed(api: ApiProcess, key: str) -> list[dict[str, Any]]:
    response = requests.get(f"{api.base}/v1/files", headers=auth(key), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_concurrent_uploads_racing_the_quota_pass_exactly_as_many_as_fit(small_api, hostile_redis):
    baseline = used_memory(hostile_redis)
    size = 300_000  # three fit in SMALL_QUOTA, not four
    answers = race(small_api, RACERS[0], [blob(size)] * 10)
    assert sorted(a.status_code for a in answers) == [200] * 3 + [413] * 7, [a.text[:200] for a in answers]
    for refused in (a for a in answers if a.status_code != 200):
        assert_openai_error(refused, 413, "quota_exceeded")
    assert sorted(f["bytes"] for f in listed(small_api, RACERS[0])) == [size] * 3

    answers = race(small_api, RACERS[1], [b'{"n": 1}\n'] * 10)  # the number of files, not their bytes
    assert sorted(a.status_code for a in answers) == [200] * SMALL_COUNT + [429] * (10 - SMALL_COUNT)
    for refused in (a for a in answers if a.status_code != 200):
        assert "AETHERCORE_FILES_MAX_COUNT" in assert_openai_error(refused, 429, "quota_exceeded")["message"]

    for key in RACERS[:2]:  # deleting a file gives its room back, and its memory
        for kept in listed(small_api, key):
            delete(small_api, kept["id"], key)
    assert upload(small_api, blob(900_000), RACERS[0]).status_code == 200
    for kept in listed(small_api, RACERS[0]):
        delete(small_api, kept["id"], RACERS[0])
    assert_memory_back(hostile_redis, baseline)
    assert_still_serving(small_api, hostile_redis)


def test_uploads_stop_at_every_callers_share_of_redis(small_api, hostile_redis):
    maxmemory = int(hostile_redis.config_get("maxmemory")["maxmemory"])
    room = used_memory(hostile_redis) + 32 * MB  # the share (0.05) is then a few MB: the racers fill it
    hostile_redis.config_set("maxmemory", room)
    size, accepted, refused = 250_000, 0, None
    try:
        time.sleep(1.5)  # the API reads maxmemory at most once a second
        for key in RACERS:  # each owner up to its own quota: no owner's quota stands in the way of the share
            for _ in range(SMALL_COUNT):
                response = upload(small_api, blob(size), key)
                if response.status_code != 200:
                    refused = response
                    break
                accepted += 1
            if refused is not None:
                break
        held = sum(kind.bytes for kind in Holdings(hostile_redis, {}).totals().values())
    finally:
        hostile_redis.config_set("maxmemory", maxmemory)
        for key in RACERS:
            for kept in listed(small_api, key):
                delete(small_api, kept["id"], key)
    limit = int(room * 0.05)
    assert refused is not None, f"{accepted} uploads of {size} bytes under a limit of {limit}"
    assert_openai_error(refused, 503, "storage_full")
    assert held + size > limit and (accepted == 0 or held <= limit), (held, limit, accepted)
    assert_still_serving(small_api, hostile_redis)


def test_exactly_the_line_limit_then_a_blank_tail_uploads_and_runs(small_api, hostile_redis):
    ensure_loaded(small_api, "minilm")
    line = {"method": "POST", "url": "/v1/embeddings", "body": {"model": "minilm", "input": "hi"}}
    lines = [json.dumps({"custom_id": f"r{i}", **line}) + "\n" for i in range(SMALL_LINES)]
    content = "".join(lines).encode() + b"\n\n \n"
    key = RACERS[2]
    response = upload(small_api, content, key)
    assert response.status_code == 200, response.text
    file_id = response.json()["id"]
    created = requests.post(
        f"{small_api.base}/v1/batches",
        headers=auth(key),
        json={"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"},
        timeout=30,
    )
    assert created.status_code == 200, created.text

    def ended() -> dict[str, Any] | None:
        batch = requests.get(f"{small_api.base}/v1/batches/{created.json()['id']}", headers=auth(key), timeout=30)
        return batch.json() if batch.json()["status"] in ("completed", "failed", "expired", "cancelled") else None

    batch = wait_until(ended, 180, 0.5, "the batch to end")
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": SMALL_LINES, "completed": SMALL_LINES, "failed": 0}
    assert download(small_api, file_id, key)[0] == content
    delete(small_api, batch["output_file_id"], key)
    delete(small_api, file_id, key)
    assert_still_serving(small_api, hostile_redis)
