"""WebSocket routes with limits: one request message, bounded, uncompressed, and nothing read after it.

A streaming WebSocket here takes exactly one message from the client (the request) and then only sends. The
socket (simple_websocket's server, whose reader thread keeps reading so that a disconnect is noticed) is held to
that:

* the request message may be at most AETHERCORE_MAX_REQUEST_BYTES, as any request body: beyond, the client gets
  an error message (`message_too_large`) and close code 1009, counted while the frames arrive (nothing larger
  is ever buffered);
* no extension is negotiated: permessage-deflate is declined in the handshake, so what arrives is what is kept
  (no decompression bomb);
* a data message after the request is a protocol violation: the socket is closed with 1008 at its first frame,
  which ends the stream and cancels its job as a disconnect does. At most one read (4 KB) of it is ever held,
  so frames sent after the request cannot pile up. Control frames (ping, pong, close) are answered as usual.

The route admits the socket among the process's long-held requests before the handshake (api/limits.py), so a
caller over its cap, or a full process, gets an HTTP 429/503 with Retry-After instead of an upgrade.

flask-sock's route is not used: it builds simple_websocket's server itself, with permessage-deflate offered
and every message kept.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from simple_websocket import ConnectionClosed, Server
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from api.json_provider import json_text
from api.services import services

# After refusing a client, what the socket still reads (and drops) so that the close frame reaches a client
# that was sending meanwhile (closing with unread data would reset the connection): at most this long/much.
LINGER_S = 1.0
LINGER_BYTES = 1 << 20


class RequestSocket(Server):
    """simple_websocket's server socket, reading one request message of at most `max_message_size` bytes and
    nothing after it, with no extension negotiated."""

    def __init__(self, environ: dict[str, Any], max_message_size: int) -> None:
        self.requests_read = 0
        self.parts: list[bytes] = []
        super().__init__(environ, max_message_size=max_message_size)

    def _handle_events(self) -> bool:  # runs on simple_websocket's reader thread (and once for the handshake)
        out, keep_going = b"", True
        try:
            for event in self.ws.events():
                if isinstance(event, Request):
                    self.subprotocol = self.choose_subprotocol(event)
                    out += self.ws.send(AcceptConnection(subprotocol=self.subprotocol, extensions=[]))
                elif isinstance(event, CloseConnection):
                    out += self.ws.send(event.response())
                    self.close_reason, self.close_message = event.code, event.reason
                    keep_going = False
                    break
                elif isinstance(event, Ping):
                    out += self.ws.send(event.response())
                elif isinstance(event, Pong):
                    self.pong_received = True
                elif isinstance(event, TextMessage | BytesMessage):
                    refusal = self._take(event)
                    if refusal is not None:
                        out += refusal
                        keep_going = False
                        break
        except LocalProtocolError:
            keep_going = False
        if out:
            self.sock.sendall(out)
        if not keep_going:
            if self.close_reason in (CloseReason.POLICY_VIOLATION, CloseReason.MESSAGE_TOO_BIG):
                self._linger()
            self.connected = False
            self.event.set()  # wakes a receive() waiting for the request, whichever way the race went
        return keep_going

    def _take(self, event: TextMessage | BytesMessage) -> bytes | None:
        """Keep a frame of the request message; the refusal to send instead, if the frame breaks the rules."""
        if self.requests_read:
            return self._refuse(CloseReason.POLICY_VIOLATION, "nothing is read after the request message")
        data = event.data.encode() if isinstance(event.data, str) else bytes(event.data)
        self.incoming_message_len += len(data)
        if self.incoming_message_len > self.max_message_size:
            error = {
                "code": "message_too_large",
                "message": f"the request message is larger than AETHERCORE_MAX_REQUEST_BYTES "
                f"({self.max_message_size} bytes) allows",
                "details": {"limit": self.max_message_size},
            }
            return self._refuse(CloseReason.MESSAGE_TOO_BIG, "message too big", error)
        self.parts.append(data)
        if event.message_finished:
            message = b"".join(self.parts)
            self.input_buffer.append(message.decode("utf-8") if isinstance(event, TextMessage) else message)
            self.parts, self.incoming_message_len, self.requests_read = [], 0, 1
            self.event.set()
        return None

    def _refuse(self, code: CloseReason, reason: str, error: dict[str, Any] | None = None) -> bytes:
        self.input_buffer.clear()  # a request not yet taken is not served either
        self.parts = []
        self.close_reason, self.close_message = code, reason
        out = self.ws.send(TextMessage(data=json_text({"type": "error", "error": error}))) if error else b""
        return out + self.ws.send(CloseConnection(code, reason))

    def _linger(self) -> None:
        """Half-close, then drop what the client still sends until it closes too (bounded), so that it reads
        our close frame instead of a reset."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline, dropped = time.monotonic() + LINGER_S, 0
            while dropped < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                data = self.sock.recv(65536)
                if not data:
                    break
                dropped += len(data)
        except OSError:
            pass


def websocket_route(app: Flask, rule: str, endpoint: str, handler: Callable[[RequestSocket], None]) -> None:
    """Serve `handler(ws)` at `rule` as a WebSocket, admitted among the long-held requests before the upgrade."""

    def view() -> Response:
        svc = services()
        with svc.long_requests.take():  # refused: an HTTP 429/503 in our error shape, no upgrade
            ws = RequestSocket(request.environ, svc.settings.max_request_bytes)
            try:
                handler(ws)
            except ConnectionClosed:
                pass
            finally:
                try:
                    ws.close()
                except Exception:  # noqa: BLE001 - already closed, by either side
                    pass
        return _upgraded(ws.mode)

    app.add_url_rule(rule, endpoint, view, websocket=True)


def _upgraded(mode: str) -> Response:
    """The response of a connection the WebSocket took over: gunicorn must write nothing more on it (it ends
    the connection on StopIteration); werkzeug's server finishes its own way."""

    class Upgraded(Response):
        def __call__(self, environ: Any, start_response: Any) -> Any:
            if mode == "gunicorn":
                raise StopIteration()
            if mode == "werkzeug":
                return super().__call__(environ, start_response)
            return []

    return Upgraded()
