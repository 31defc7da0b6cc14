"""api/server.py OneSendResponse: gunicorn's own HTTP/1 writer with the head and the first body bytes in one send,
and every other ending (no body, HEAD, 204, chunked, more writes) framed exactly as gunicorn frames it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from gunicorn.config import Config
from gunicorn.http.wsgi import Response

from api.server import OneSendResponse


class Socket:
    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))


def respond(cls, method: str, status: str, headers: list[tuple[str, str]], chunks: list[bytes]) -> list[bytes]:
    sock = Socket()
    req = SimpleNamespace(version=(1, 1), method=method, should_close=lambda: False, headers=[])
    resp = cls(req, sock, Config())
    resp.start_response(status, headers)
    for chunk in chunks:
        resp.write(chunk)
    resp.close()
    return sock.sends


def wire(sends: list[bytes]) -> bytes:
    # The Date header may tick between two responses.
    return b"\r\n".join(line for line in b"".join(sends).split(b"\r\n") if not line.startswith(b"Date: "))


CASES = [
    ("POST", "200 OK", [("Content-Type", "application/json"), ("Content-Length", "11")], [b'{"ok":true}']),
    ("POST", "202 ACCEPTED", [("Content-Length", "5")], [b"ab", b"cde"]),
    ("HEAD", "200 OK", [("Content-Length", "5")], [b"abcde"]),
    ("GET", "204 NO CONTENT", [], [b""]),
    ("GET", "200 OK", [("Content-Type", "text/event-stream")], [b"data: 1\n\n", b"data: 2\n\n"]),  # chunked
    ("GET", "200 OK", [("Content-Length", "0")], []),
    ("GET", "200 OK", [("Content-Length", "3")], [b"abcdef"]),  # more than declared: cut as gunicorn cuts it
]


@pytest.mark.parametrize("method,status,headers,chunks", CASES)
def test_same_bytes_on_the_wire_as_gunicorns_writer(method, status, headers, chunks):
    assert wire(respond(OneSendResponse, method, status, headers, chunks)) == wire(
        respond(Response, method, status, headers, chunks)
    )


def test_a_small_json_answer_is_one_send():
    body = b'{"status": "succeeded"}'
    sends = respond(OneSendResponse, "POST", "200 OK", [("Content-Length", str(len(body)))], [body])
    assert len(sends) == 1 and sends[0].startswith(b"HTTP/1.1 200 OK\r\n") and sends[0].endswith(b"\r\n\r\n" + body)
    assert len(respond(Response, "POST", "200 OK", [("Content-Length", str(len(body)))], [body])) == 2


def test_the_head_goes_alone_when_no_body_may_follow():
    sends = respond(OneSendResponse, "HEAD", "200 OK", [("Content-Length", "5")], [b"abcde"])
    assert len(sends) == 1 and sends[0].endswith(b"\r\n\r\n")


def test_a_streams_head_goes_with_its_first_event_and_each_event_after_is_its_own_send():
    events = [b"event: chunk\ndata: {}\n\n", b"event: done\ndata: {}\n\n"]
    sends = respond(OneSendResponse, "GET", "200 OK", [("Content-Type", "text/event-stream")], events)
    assert len(sends) == 3  # head + first event, second event, the chunked body's end
    assert b"Transfer-Encoding: chunked" in sends[0] and sends[0].endswith(
        b"\r\n\r\n" + b"%X\r\n" % len(events[0]) + events[0] + b"\r\n"
    )
    assert sends[2] == b"0\r\n\r\n"
