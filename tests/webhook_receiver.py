"""A real HTTP receiver for completion webhooks (tests only): a threaded server on a loopback address that records
every POST (headers, body) and answers what the test scripts (a status per request, then a default), and can be
stopped and started again on the same port (a receiver that is down for a while)."""

from __future__ import annotations

import json
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
