"""Run the API under gunicorn with threaded workers: an open long poll holds a thread, not a process."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import orjson
from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger
from gunicorn.http import wsgi as gunicorn_wsgi

from config.logging import InterceptHandler
from config.settings import Settings
from config.values import REPO_ROOT


class LoguruGunicornLogger(Logger):
    """gunicorn's own log lines go through loguru like everything else."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            log.handlers = [InterceptHandler()]
            log.propagate = False


# gunicorn's own answers to requests it refuses before the app sees them (a request line over 4094 bytes: 414, a
# header over its limits: 431, a malformed request line or header: 400) are HTML pages; the API's one error shape is
# JSON. Its workers write them through `gunicorn.util.write_error` alone, so that writer is replaced in the API
# process (before the workers fork); the status and reason stay gunicorn's.
GUNICORN_ERROR_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 417: "expectation_failed"}
GUNICORN_ERROR_CODES |= {431: "request_header_fields_too_large", 500: "internal_error", 501: "not_implemented"}


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    body = orjson.dumps(
        {
            "error": {
                "code": GUNICORN_ERROR_CODES.get(status_int, "bad_request"),
                # Never the whole offending line back: a few hundred characters say which part was refused.
                "message": f"{reason}: {mesg[:200]}" + ("..." if len(mesg) > 200 else ""),
                "details": {},
            }
        }
    )
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    gunicorn_util.write_nonblock(sock, head.encode("latin-1") + body)


class OneSendResponse(gunicorn_wsgi.Response):
    """gunicorn's HTTP/1 response writer, with the head sent in the same `sendall` as the first body bytes.

    gunicorn writes a response's head and its body in two system calls, so a small JSON answer cost two sends:
    ~7 % of an API process's CPU per /serve at GPU speed (py-spy, docs/CAPACITY.md); a stream's head goes with its
    first event the same way. Only `write` holds the head back; every other way gunicorn ends a response (no body,
    a HEAD request, sendfile, close) finds it already sent, as before.
    """

    _held: list[bytes] | None = None

    def write(self, arg: bytes) -> None:
        if self.headers_sent:
            return super().write(arg)
        self._held = []
        try:
            super().write(arg)
        finally:
            held, self._held = self._held, None
            if held:  # no body bytes went (none to send, or none allowed): the head alone
                gunicorn_util.write(self.sock, held[0])

    def send_headers(self) -> None:
        if self._held is None or self.headers_sent:
            return super().send_headers()
        sock, self.sock = self.sock, _Holding(self._held)
        try:  # gunicorn writes the head as ever, into the list
            super().send_headers()
        finally:
            self.sock = sock

    def _emit_body(self, data: bytes) -> None:
        if not self._held:
            return super()._emit_body(data)
        sock, self.sock = self.sock, _HeadFirst(self.sock, self._held.pop())
        try:  # gunicorn frames the body (chunked or not) and sends it, the head in front
            super()._emit_body(data)
        finally:
            self.sock = sock


class _Holding:
    """A response's socket while its head is written: the bytes are kept, to go out with the body's."""

    def __init__(self, held: list[bytes]) -> None:
        self.held = held

    def sendall(self, data: bytes) -> None:
        self.held.append(bytes(data))


class _HeadFirst:
    """A response's socket for one send: the held head goes out in front of whatever is sent."""

    def __init__(self, sock: Any, head: bytes) -> None:
        self.sock, self.head = sock, head

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(self.head + data)


GEVENT_CONNECTIONS_PER_THREAD = 4


class GunicornServer(BaseApplication):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        gunicorn_util.write_error = write_json_error
        gunicorn_wsgi.Response = OneSendResponse  # HTTP/1; HTTP/2 brings its own writer
        options: dict[str, Any] = {
            "bind": f"{self.settings.host}:{self.settings.port}",
            "workers": self.settings.workers,
            "worker_class": self.settings.api_worker,
            # gthread: a pool of this many threads, an idle keep-alive connection holding none. gevent: a greenlet
            # per connection for its whole life, idle keep-alive included, so room for more connections than
            # requests; long-held requests are capped at AETHERCORE_API_THREADS minus the reserve either way
            # (api/limits.py), so probes and short requests always find a greenlet.
            "threads": self.settings.api_threads,
            "worker_connections": GEVENT_CONNECTIONS_PER_THREAD * self.settings.api_threads,
            # Longer than the longest ?wait, so a waiting request is never cut off.
            "timeout": int(self.settings.max_wait) + 30,
            "graceful_timeout": 10,
            "keepalive": 5,
            "accesslog": None,
            "logger_class": LoguruGunicornLogger,
            "control_socket_disable": True,
            "child_exit": _child_exit,
            "loglevel": self.settings.log_level.lower() if self.settings.log_level != "TRACE" else "debug",
        }
        if self.settings.tls:  # gunicorn's own TLS: HTTP, SSE and WebSocket all go over it
            options.update(certfile=str(self.settings.tls_cert), keyfile=str(self.settings.tls_key))
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self):
        from api import create_app
        from config.logging import setup_logging

        setup_logging("api", self.settings.log_level, self.settings.log_format)
        return create_app(self.settings)


def _child_exit(server, worker) -> None:
    """A gunicorn worker's gauges (open streams) leave the multiprocess metrics with it."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def prepare_multiprocess_metrics(settings: Settings) -> Path:
    """prometheus-client multiprocess mode: every gunicorn worker writes its metric values to files in
    one directory, and /metrics (answered by any worker) adds them up. Must be set before
    prometheus_client is imported, i.e. before the workers are forked; emptied at each start."""
    directory = Path(
        os.environ.get("PROMETHEUS_MULTIPROC_DIR") or REPO_ROOT / "var" / "prometheus" / f"api-{settings.port}"
    )
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


def run_api(settings: Settings) -> None:
    from config.logging import setup_logging

    setup_logging("api", settings.log_level, settings.log_format)
    prepare_multiprocess_metrics(settings)
    from loguru import logger

    scheme = "https" if settings.tls else "http"
    logger.info(
        "API serving {} on {}://{}:{}{}",
        scheme.upper(),
        scheme,
        settings.host,
        settings.port,
        f" (certificate {settings.tls_cert})" if settings.tls else "",
    )
    GunicornServer(settings).run()
