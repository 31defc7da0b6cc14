"""A real HTTP receiver for completion webhooks (tests only): a threaded server on a loopback address that records
every POST (headers, body) and answers what the test scripts (a status per request, then a default), and can be
stopped and started again on the same port (a receiver that is down for a while); and receivers that misbehave at
the TCP level (HostileReceiver: trickle, hang, huge headers, redirect)."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook

from cli.supervise import free_port


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


class Receiver:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port()
        self.received: list[dict[str, Any]] = []
        self.script: list[int] = []  # the next answers' statuses, in order
        self.default = 200
        self._lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    status = receiver.script.pop(0) if receiver.script else receiver.default
                    receiver.received.append(
                        {"headers": dict(self.headers.items()), "body": body, "status": status, "at": time.time()}
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = _Server((self.host, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.received if r["headers"].get("webhook-id") == f"msg_{job_id}"]

    @staticmethod
    def verify(request: dict[str, Any], secret: str) -> dict[str, Any]:
        """The payload, verified with the standardwebhooks package (raises if the signature does not match)."""
        return Webhook(secret).verify(request["body"], request["headers"])

    @staticmethod
    def payload(request: dict[str, Any]) -> dict[str, Any]:
        return json.loads(request["body"])


class HostileReceiver:
    """A receiver that misbehaves at the TCP level (tests only), on a loopback address: `trickle` answers its status
    line one byte every `interval` seconds, `hang` accepts and never answers, `huge_headers` answers a
    status line and then `size` bytes of headers as fast as the reader takes them, `redirect` answers 302 to
    `location`. Every connection it accepts is recorded (when, and the request's head as far as it was read)."""

    def __init__(
        self,
        behaviour: str,
        host: str = "127.0.0.1",
        interval: float = 2.0,
        size: int = 8 * 2**20,
        location: str = "",
    ) -> None:
        self.behaviour, self.host, self.interval, self.size, self.location = (
            behaviour,
            host,
            interval,
            size,
            location,
        )
        self.connections: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        assert self._listener is not None
        return f"http://{self.host}:{self._listener.getsockname()[1]}/hook"

    def start(self) -> HostileReceiver:
        self._listener = socket.create_server((self.host, 0), backlog=128)
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()

    def ids(self) -> list[str]:
        """The webhook-ids of the requests it read (a `hang` receiver reads none)."""
        with self._lock:
            return [c["webhook_id"] for c in self.connections if c["webhook_id"]]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        record: dict[str, Any] = {"at": time.time(), "webhook_id": None}
        with self._lock:
            self.connections.append(record)
        try:
            with conn:
                if self.behaviour == "hang":
                    self._until_hung_up(conn, None, record)
                    return
                record["webhook_id"] = _webhook_id(_read_head(conn))
                if self.behaviour == "trickle":
                    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                        conn.sendall(bytes([byte]))
                        if self._until_hung_up(conn, self.interval, record):
                            return
                elif self.behaviour == "huge_headers":
                    conn.sendall(b"HTTP/1.1 200 OK\r\n")
                    line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
                    for _ in range(self.size // len(line)):
                        conn.sendall(line)
                    conn.sendall(b"Content-Length: 0\r\n\r\n")
                elif self.behaviour == "redirect":
                    conn.sendall(
                        f"HTTP/1.1 302 Found\r\nLocation: {self.location}\r\nContent-Length: 0\r\n\r\n".encode()
                    )
                record["answered"] = True
        except OSError:  # the dispatcher hung up (its attempt's deadline)
            record["cut_at"] = time.time()

    def _until_hung_up(self, conn: socket.socket, seconds: float | None, record: dict[str, Any]) -> bool:
        """Wait `seconds` (None: until stopped) or until the client hangs up (recorded: `cut_at`); whether it did."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self._stop.is_set():
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if left <= 0:
                return False
            readable, _, _ = select.select([conn], [], [], left)
            if readable and not conn.recv(65536):
                record["cut_at"] = time.time()
                return True
        return True


def _read_head(conn: socket.socket) -> bytes:
    conn.settimeout(10)
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def _webhook_id(head: bytes) -> str | None:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"webhook-id":
            return value.strip().decode()
    return None
