"""What the tests share: their credentials and environment, and the real processes they start (a redis-server on a
spare port, `manage.py` workers, APIs and batch drivers, from cli/supervise.py), with each child's log in
test-artifacts/."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import simple_websocket
import yaml

from cli.supervise import Api, BatchDriver, Child, RedisServer, Worker, free_port, wait_until
from config.values import REPO_ROOT

ARTIFACTS = REPO_ROOT / "test-artifacts"

__all__ = [
    "ARTIFACTS",
    "REPO_ROOT",
    "RedisServer",
    "free_port",
    "wait_until",
    "metric",
    "read_sse",
    "close_quietly",
    "ws_connect",
    "read_until",
    "base_env",
    "ManagedProcess",
    "WorkerProcess",
    "ApiProcess",
    "BatchDriverProcess",
]


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


class WsClient(simple_websocket.Client):
    """simple_websocket's client, keeping the frames that arrive with the handshake's answer: its own handshake
    reads them with the answer but hands on only the answer, and its reader thread then waits for bytes that never
    come (a server that answers at once and closes, like a refused viewer's error, was seen as a close with no
    status, 1005, and the message lost)."""

    def handshake(self) -> None:
        super().handshake()
        self._handle_events()  # whatever came with the answer: messages into the buffer, a close noted
        self.connected = True  # the reader thread starts, and sees the close (or the end of the stream) itself


def ws_connect(url: str, **kwargs: Any) -> WsClient:
    return WsClient(url, **kwargs)


def close_quietly(ws) -> None:
    """Close a WebSocket client the server may already have closed (after `done`, or an error): its reader thread
    may have closed the socket between our check and our close frame (ConnectionClosed, or OSError EBADF)."""
    try:
        ws.close()
    except (simple_websocket.ConnectionClosed, OSError):
        pass


def read_sse(response) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    """(event, id, data) from a streaming `requests` response of Server-Sent Events."""
    event, event_id, data = None, None, []
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if event:
                yield event, event_id, json.loads("\n".join(data))
            event, event_id, data = None, None, []
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])


def read_until(subscription, count: int, timeout_ms: int = 5000) -> list:
    """Entries a stream hub subscription delivers, until `count` of them or `timeout_ms`."""
    got = []
    for _ in range(timeout_ms // 50):
        got += subscription.read(50)
        if len(got) >= count:
            break
    return got


def models_with_a_broken_onnx(folder: Path, **extra: Any) -> dict[str, Any]:
    """config/models.yaml's models plus `broken-onnx` (with `extra` fields): a file in `folder` that is not an ONNX
    model, so its load fails."""
    (folder / "broken.onnx").write_bytes(b"this is not an onnx model")
    models = yaml.safe_load((REPO_ROOT / "config" / "models.yaml").read_text())
    models["models"]["broken-onnx"] = {
        "model_type": "onnx",
        "source": "local",
        "task": "tensor",
        "model_path": str(folder / "broken.onnx"),
        "device": "cpu",
        **extra,
    }
    return models


# Test credentials (AETHERCORE_API_KEYS of every process the tests start).
ADMIN_KEY = "test-admin-key-0123456789"
OPERATOR_KEY = "test-operator-key-0123456789"
USER_KEY = "test-user-key-0123456789"
OTHER_USER_KEY = "test-other-user-key-0123456789"
VIEWER_KEY = "test-viewer-key-0123456789"
JWT_SECRET = "test-jwt-secret-not-for-production-0123456789"


def base_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AETHERCORE_API_KEY", None)
    env.update(
        {
            "AETHERCORE_API_KEYS": f"{ADMIN_KEY}:admin,{OPERATOR_KEY}:operator,{USER_KEY}:user,"
            f"{OTHER_USER_KEY}:user,{VIEWER_KEY}:viewer",
            "AETHERCORE_JWT_SECRET": JWT_SECRET,
            "AETHERCORE_RATE_LIMIT": "",
            # The suite makes hundreds of deliberate failed authentications from 127.0.0.1 (schemathesis alone sends
            # them by the dozen); the limit on them is tested where it is set (tests/hostile/test_security.py).
            "AETHERCORE_AUTH_FAILURE_LIMIT": "0",
            "AETHERCORE_REDIS_URL": redis_url,
            "AETHERCORE_BROKER_URL": "",
            "HF_HUB_OFFLINE": "1",
            "AETHERCORE_HEARTBEAT_INTERVAL": "1",
            "AETHERCORE_WORKER_TTL": "5",
            "AETHERCORE_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class ManagedProcess(Child):
    """A `manage.py` child in its own session, its output kept in test-artifacts/."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        super().__init__(name, env, ARTIFACTS)


class WorkerProcess(Worker):
    """`python manage.py worker --device cpu` with the tests' environment, its log kept for assertions."""

    def __init__(self, redis_url: str, name: str = "worker", device: str = "cpu", **env: str) -> None:
        super().__init__(redis_url, base_env(redis_url, **env), name, device, ARTIFACTS)


class BatchDriverProcess(BatchDriver):
    """`python manage.py batches` with an API's environment, its log kept for assertions."""

    def __init__(self, env: dict[str, str], name: str = "batches") -> None:
        super().__init__(env, name, ARTIFACTS)


# Per Redis database, the APIs whose batch driver was asked for; the last one's driver is the one running. A driver
# drives every batch of its database by its own settings (a batch's limits, the keys its owner is checked against),
# so two APIs with different settings on one database must not both have one: the test talking to one API would
# see its batches driven by the other's rules.
_DRIVING: dict[str, list[ApiProcess]] = {}


class ApiProcess(Api):
    """`python manage.py api` (gunicorn, gthread) on a spare port: for WebSocket, SSE and multi-process tests.

    `batches=True`: a batch driver (`manage.py batches`, `driver`) with the API's environment runs while the API does;
    `driving()` for a part of a test. Either way it is then the only driver on the API's database (`_DRIVING`)."""

    def __init__(
        self, redis_url: str, name: str = "api", ca: str | None = None, batches: bool = False, **env: str
    ) -> None:
        # Feature tests speak plain HTTP/WebSocket without credentials; tests/integration/test_security.py
        # starts one with auth on to check the same endpoints refuse anonymous callers.
        env.setdefault("AETHERCORE_AUTH", "false")
        super().__init__(base_env(redis_url, **env), name, ca, ARTIFACTS)
        self.redis_url = redis_url
        self.batches = batches
        self.driver: BatchDriverProcess | None = None

    def start(self, timeout_s: float = 60) -> ApiProcess:
        super().start(timeout_s)
        if self.batches:
            self.drive()
        return self

    def stop(self, timeout_s: float = 20) -> None:
        self.undrive()
        super().stop(timeout_s)

    def drive(self) -> None:
        """This API's batch driver runs; the driver of another API on the same database stops until it stops."""
        apis = _DRIVING.setdefault(self.redis_url, [])
        if apis:
            apis[-1].stop_driver()
        apis.append(self)
        self.start_driver()

    def undrive(self) -> None:
        """This API's batch driver stops; the one it stood in for starts again."""
        apis = _DRIVING.get(self.redis_url, [])
        if self not in apis:
            return
        running = apis[-1] is self
        apis.remove(self)
        self.stop_driver()
        if running and apis:
            apis[-1].start_driver()

    @contextmanager
    def driving(self) -> Iterator[ApiProcess]:
        self.drive()
        try:
            yield self
        finally:
            self.undrive()

    def start_driver(self) -> BatchDriverProcess:
        """A new batch driver with this API's environment (a killed one's successor, too)."""
        self.driver = BatchDriverProcess(self.env, f"{self.label}-batches").start()
        return self.driver

    def stop_driver(self) -> None:
        if self.driver is not None:
            self.driver.stop()
            self.driver = None
