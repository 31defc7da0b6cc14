"""Case 4 of issue 19: the WebSocket (/serve/stream) had no limits: no maximum message size, permessage-deflate
accepted (a decompression bomb), and frames after the request message piled up in memory.

Now: a request message over AETHERCORE_MAX_REQUEST_BYTES gets an error message and close code 1009; no extension
is ever negotiated; and any data message after the request closes the socket with 1008 (policy violation),
which cancels the job as a disconnect does. The client here speaks the protocol frame by frame (wsproto over a
plain socket), as an attacker would.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import psutil
import requests
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from config.settings import Settings
from tests.hostile.conftest import assert_still_serving, auth, ensure_loaded
from tests.support import USER_KEY, ApiProcess, base_env, wait_until

GENERATION = {"model_id": "tiny-gpt2", "inputs": {"text": "Once upon a time"}, "parameters": {"max_length": 256}}


class RawWebSocket:
    """A WebSocket client that sends exactly what the test asks for and reports every event it receives."""

    def __init__(self, api: ApiProcess, key: str = USER_KEY, deflate: bool = False) -> None:
        host, port = api.base.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.ws = WSConnection(ConnectionType.CLIENT)
        headers = [(name.lower().encode(), value.encode()) for name, value in auth(key).items()]
        extensions = [PerMessageDeflate()] if deflate else []
        self.sock.sendall(
            self.ws.send(Request(host=host, target="/serve/stream", extra_headers=headers, extensions=extensions))
        )
        self.handshake = self.next_event(30)
        self.closed: CloseConnection | None = None

    def next_event(self, timeout_s: float) -> Event | None:
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.ws.events():
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            except ConnectionResetError:
                data = b""
            self.ws.receive_data(data or None)
            if not data:
                for event in self.ws.events():
                    return event
                return None

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def messages(self, timeout_s: float) -> list[dict[str, Any]]:
        """Every message until the server closes (kept in `closed`) or `timeout_s` passes."""
        out, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            event = self.next_event(deadline - time.monotonic())
            if event is None:
                break
            if isinstance(event, TextMessage):
                out.append(json.loads(event.data))
            elif isinstance(event, CloseConnection):
                self.closed = event
                break
            elif isinstance(event, BytesMessage | RejectConnection | RejectData):
                out.append({"unexpected": repr(event)})
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def job_status(api: ApiProcess, job_id: str) -> str:
    return requests.get(f"{api.base}/jobs/{job_id}", headers=auth(USER_KEY), timeout=5).json()["status"]


def api_rss(api: ApiProcess) -> int:
    """Resident memory of the API's gunicorn worker process (the suite's API runs one)."""
    children = psutil.Process(api.proc.pid).children(recursive=True)
    return max(child.memory_info().rss for child in children)


def test_compression_is_never_negotiated(hostile_api, hostile_redis):
    client = RawWebSocket(hostile_api, deflate=True)
    try:
        assert isinstance(client.handshake, AcceptConnection), client.handshake
        assert client.handshake.extensions == []  # permessage-deflate offered, and declined
    finally:
        client.close()
    assert_still_serving(hostile_api, hostile_redis)


def test_an_oversized_request_message_is_refused_with_1009(hostile_api, hostile_redis):
    limit = Settings.from_env(base_env("redis://127.0.0.1:1/0")).max_request_bytes
    client = RawWebSocket(hostile_api)
    try:
        assert isinstance(client.handshake, AcceptConnection), client.handshake
        # a valid JSON body one byte over the limit (its text is also over the input limit: were the message
        # read, the answer would be a 422 instead)
        padding = limit - len(json.dumps({**GENERATION, "inputs": {"text": ""}})) + 1
        try:
            client.send_text(json.dumps({**GENERATION, "inputs": {"text": "a" * padding}}))
        except OSError:
            pass  # the server may close before the last bytes are written
        messages = client.messages(30)
    finally:
        client.close()
    assert [m.get("error", {}).get("code") for m in messages] == ["message_too_large"], messages
    assert client.closed is not None and client.closed.code == 1009, client.closed
    assert_still_serving(hostile_api, hostile_redis)


def test_a_message_after_the_request_closes_the_socket_and_cancels_the_job(hostile_api, hostile_redis):
    ensure_loaded(hostile_api)
    client = RawWebSocket(hostile_api)
    try:
        client.send_text(json.dumps(GENERATION))
        queued = client.next_event(30)
        assert isinstance(queued, TextMessage), queued
        job_id = json.loads(queued.data)["job_id"]
        client.send_text('{"type": "anything more"}')
        messages = client.messages(10)
    finally:
        client.close()
    assert client.closed is not None and client.closed.code == 1008, (client.closed, messages[-3:])
    assert not any(m.get("type") == "done" for m in messages)
    wait_until(lambda: job_status(hostile_api, job_id) in ("cancelled", "succeeded"), 30, 0.2, "the job to end")
    assert job_status(hostile_api, job_id) == "cancelled"
    assert_still_serving(hostile_api, hostile_redis)


def test_a_flood_of_frames_after_the_request_is_not_kept(hostile_api, hostile_redis):
    ensure_loaded(hostile_api)
    before = api_rss(hostile_api)
    client = RawWebSocket(hostile_api)
    flood_mb = 64
    sent = {"bytes": 0}

    def flood() -> None:
        frame = client.ws.send(TextMessage(data="x" * 65536))
        try:
            for _ in range(flood_mb * 16):
                client.sock.sendall(frame)
                sent["bytes"] += len(frame)
        except OSError:
            pass  # the server closed the connection: what this test expects

    try:
        client.send_text(json.dumps(GENERATION))
        flooding = threading.Thread(target=flood, daemon=True)
        flooding.start()
        flooding.join(30)
        peak = api_rss(hostile_api)
        client.messages(5)
    finally:
        client.close()
    grew_mb = (peak - before) / 2**20
    assert grew_mb < flood_mb / 4, f"the API process grew by {grew_mb:.0f} MB while {sent['bytes'] >> 20} MB came in"
    assert sent["bytes"] < flood_mb * 2**20, "the server read the whole flood instead of closing the socket"
    assert_still_serving(hostile_api, hostile_redis)
