"""What gunicorn refuses before the app sees it (over-long request lines and headers, malformed request lines)
is answered in the API's JSON error shape, never an HTML page, and the process goes on serving others."""

from __future__ import annotations

import json
import socket

import pytest

from tests.hostile.conftest import assert_still_serving


def raw_request(api, data: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = api.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET /jobs/" + b"a" * 6000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
        (b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431),
        (b"\x16\x03\x01garbage that is no request line\r\n\r\n", 400),
        (b"GET /health/live HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n", 400),
    ],
    ids=["request-line-too-long", "header-too-long", "too-many-headers", "not-http", "bad-header-name"],
)
def test_requests_gunicorn_refuses_get_json_errors(hostile_api, hostile_redis, request_bytes, status):
    code, headers, body = raw_request(hostile_api, request_bytes)
    assert code == status, body[:300]
    assert headers["content-type"] == "application/json", headers
    error = json.loads(body)["error"]
    assert error["code"] and error["message"] and "<html" not in body.decode("utf-8", "replace")
    assert len(error["message"]) < 300  # the refused line is not echoed back whole
    assert_still_serving(hostile_api, hostile_redis)
