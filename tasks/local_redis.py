"""Use the Redis at AETHERCORE_REDIS_URL, or start a local redis-server when none answers (for `up`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

from loguru import logger

from tasks.redis_client import make_redis

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


class RedisUnavailable(RuntimeError):
    pass


def redis_answers(url: str, **ssl: str) -> bool:
    try:
        return bool(make_redis(url, **ssl).ping())
    except Exception:
        return False


def _install_redis() -> str | None:
    """Install Debian's redis-server where we may (root with apt-get); None otherwise."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    logger.info("redis-server is not installed; installing Debian's package")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=False, env=env)
    return shutil.which("redis-server")


def ensure_redis(url: str, data_dir: Path, **ssl: str) -> subprocess.Popen | None:
    """None if Redis already answers; else the redis-server process started for `url`.
    `ssl`: redis-py's TLS options for a rediss:// URL (such a Redis is never started here)."""
    if redis_answers(url, **ssl):
        return None
    parsed = urlparse(url)
    if parsed.scheme == "rediss":
        raise RedisUnavailable(f"Redis at {url} does not answer over TLS (check AETHERCORE_REDIS_CA/CERT/KEY); "
                               "a TLS Redis is never started here")
    if parsed.scheme != "redis" or (parsed.hostname or "") not in LOCAL_HOSTS:
        raise RedisUnavailable(f"Redis at {url} does not answer, and it is not local, so it cannot be started here")
    binary = shutil.which("redis-server") or _install_redis()
    if not binary:
        raise RedisUnavailable(f"Redis at {url} does not answer and redis-server is not installed; "
                               "install it (apt-get install redis-server) or set AETHERCORE_REDIS_URL")
    data_dir.mkdir(parents=True, exist_ok=True)
    port = parsed.port or 6379
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(data_dir)],
        stdout=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if redis_answers(url):
            return proc
        if proc.poll() is not None:
            raise RedisUnavailable(f"redis-server exited with code {proc.returncode} (is port {port} taken?)")
        time.sleep(0.1)
    proc.terminate()
    raise RedisUnavailable(f"redis-server on port {port} did not answer within 10 s")
