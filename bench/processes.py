"""The benchmarks' own deployments: cli/supervise.py's processes with the benchmarks' environment and admin key
(never the tests'), their logs in var/bench-logs/."""

from __future__ import annotations

import os

from cli.supervise import Api, BatchDriver, RedisServer, Worker
from config.values import REPO_ROOT

__all__ = ["AUTH", "BENCH_KEY", "RedisServer", "api", "batch_driver", "bench_env", "worker"]

BENCH_KEY = "bench-admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}
LOGS = REPO_ROOT / "var" / "bench-logs"


def bench_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AETHERCORE_API_KEY", None)
    env.update(
        {
            "AETHERCORE_API_KEYS": f"{BENCH_KEY}:admin",
            "AETHERCORE_REDIS_URL": redis_url,
            "AETHERCORE_BROKER_URL": "",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "AETHERCORE_LOG_LEVEL": "INFO",
        }
    )
    # The benchmark's clients are one caller holding as many streams and waits as it measures (up to 256
    # generation streams): neither the per-caller cap nor the process's admission may refuse them (api/limits.py).
    # gthread starts threads as they are needed, so a high ceiling costs nothing below it.
    env.setdefault("AETHERCORE_MAX_STREAMS_PER_CALLER", "100000")
    env.setdefault("AETHERCORE_API_THREADS", "264")
    env.update(extra)
    return env


def worker(redis_url: str, name: str, device: str = "cpu", **env: str) -> Worker:
    return Worker(redis_url, bench_env(redis_url, **env), name, device, LOGS)


def api(redis_url: str, name: str, **env: str) -> Api:
    return Api(bench_env(redis_url, **env), name, log_dir=LOGS)


def batch_driver(api: Api, name: str) -> BatchDriver:
    """`manage.py batches` beside `api`, with its environment (as `manage.py up` runs it)."""
    return BatchDriver(api.env, name, LOGS)
