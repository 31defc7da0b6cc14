"""Real processes for the tests: a redis-server on a spare port and Celery workers started by manage.py."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import redis

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


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


class RedisServer:
    """A throw-away redis-server; `appendonly` for the persistence tests."""

    def __init__(self, port: int | None = None, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise RuntimeError("redis-server is not installed; scripts/test.sh installs it (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="aethercore-redis-"))
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> "RedisServer":
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.dir), "--appendonly", "yes" if self.appendonly else "no", "--databases", "32"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_until(lambda: self._ping(client), 10, what=f"redis-server on port {self.port}")
        return self

    @staticmethod
    def _ping(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


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
    env.update({
        "AETHERCORE_API_KEYS": f"{ADMIN_KEY}:admin,{OPERATOR_KEY}:operator,{USER_KEY}:user,"
                               f"{OTHER_USER_KEY}:user,{VIEWER_KEY}:viewer",
        "AETHERCORE_JWT_SECRET": JWT_SECRET,
        "AETHERCORE_RATE_LIMIT": "",
        "AETHERCORE_REDIS_URL": redis_url,
        "AETHERCORE_BROKER_URL": "",
        "HF_HUB_OFFLINE": "1",
        "AETHERCORE_HEARTBEAT_INTERVAL": "1",
        "AETHERCORE_WORKER_TTL": "5",
        "AETHERCORE_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


class ManagedProcess:
    """A `manage.py` child process in its own session, with its output kept in test-artifacts/."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / f"{name}-{os.getpid()}-{int(time.time() * 1000)}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def spawn(self, *args: str) -> None:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "manage.py"), *args], env=self.env,
                                     cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if hasattr(self, "_log"):
            self._log.close()


class WorkerProcess(ManagedProcess):
    """`python manage.py worker --device cpu` as a child process, with its log kept for assertions."""

    def __init__(self, redis_url: str, name: str = "worker", device: str = "cpu", **env: str) -> None:
        super().__init__(name, base_env(redis_url, **env))
        self.redis_url = redis_url
        self.device = device

    def start(self, wait: bool = True) -> "WorkerProcess":
        self.spawn("worker", "--device", self.device)
        if wait:
            wait_until(lambda: self.record() is not None or self._died(), 90, 0.2, "the worker's heartbeat")
            if self._died():
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
        return self

    @property
    def name(self) -> str:
        host = socket.gethostname()
        return f"{self.device.replace(':', '')}.{self.proc.pid}@{host}"

    def record(self) -> dict[str, Any] | None:
        from config.settings import Settings
        from tasks.redis_client import make_redis

        ssl = Settings.from_env(self.env).redis_ssl(self.redis_url)  # rediss:// with the worker's own CA and cert
        client = make_redis(self.redis_url, self.env.get("AETHERCORE_REDIS_SENTINEL_MASTER", "mymaster"), **ssl)
        raw = client.get(f"aethercore:worker:{self.name}")
        return json.loads(raw) if raw else None


class ApiProcess(ManagedProcess):
    """`python manage.py api` (gunicorn, gthread) on a spare port: for WebSocket, SSE and multi-process tests."""

    def __init__(self, redis_url: str, name: str = "api", ca: str | None = None, **env: str) -> None:
        self.port = free_port()
        self.base = f"{'https' if env.get('AETHERCORE_TLS_CERT') else 'http'}://127.0.0.1:{self.port}"
        self.verify: str | bool = ca or True  # the CA a TLS API's certificate is checked against
        # Feature tests speak plain HTTP/WebSocket without credentials; tests/integration/test_security.py
        # starts one with auth on to check the same endpoints refuse anonymous callers.
        env.setdefault("AETHERCORE_AUTH", "false")
        super().__init__(name, base_env(redis_url, AETHERCORE_PORT=str(self.port), AETHERCORE_HOST="127.0.0.1",
                                        **env))

    def start(self) -> "ApiProcess":
        import requests

        self.spawn("api")

        def up() -> bool:
            if self._died():
                raise RuntimeError(f"API exited:\n{self.log()}")
            try:
                return requests.get(f"{self.base}/heartbeat", timeout=1, verify=self.verify).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, 60, 0.2, "the API to answer")
        return self
