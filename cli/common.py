"""What every verb shares: settings with a clean error, the consoles, failing, and the API client."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import requests
import typer
from rich.console import Console

from config.settings import Settings
from config.values import ConfigError

console = Console()
err = Console(stderr=True, soft_wrap=True, highlight=False)


def settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None


def checked_models(cfg: Settings) -> None:
    """Validate models.yaml before starting a process that serves it: a clean one-line error, not a traceback."""
    from config.models import load_models

    try:
        load_models(cfg.models_file)
    except ConfigError as exc:
        fail(f"configuration error: {exc}", 2)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def reachable_redis() -> Any:
    """A client of the configured Redis (AETHERCORE_REDIS_URL), for the verbs that talk to it directly; a clear
    error and exit when it does not answer."""
    from tasks.redis_client import make_redis

    cfg = settings()
    try:
        redis = make_redis(cfg.redis_url, cfg.redis_sentinel_master, **cfg.redis_options())
        redis.ping()
    except Exception:
        fail(f"Redis is not reachable at {cfg.redis_url} (AETHERCORE_REDIS_URL)")
    return redis


def print_json(data: Any) -> None:
    console.print_json(json.dumps(data))


def api_key(cfg: Settings) -> str | None:
    """AETHERCORE_API_KEY, else the admin key `manage.py up` keeps on this machine (if readable)."""
    key = os.environ.get("AETHERCORE_API_KEY", "").strip()
    if key:
        return key
    try:
        return cfg.admin_key_file.read_text().strip() or None
    except OSError:
        return None


class ApiClient:
    def __init__(self, base_url: str, key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def request(
        self, method: str, path: str, *, ok: tuple[int, ...] = (200, 202), timeout: float = 75, **kwargs: Any
    ) -> tuple[int, Any]:
        url = f"{self.base_url}{path}"
        try:
            response = requests.request(method, url, timeout=timeout, headers=self.headers, **kwargs)
        except requests.ConnectionError:
            fail(
                f"the API is not reachable at {self.base_url} (tried {method} {url}); start it with "
                "`python manage.py up` or set AETHERCORE_URL"
            )
        except requests.Timeout:
            fail(f"the API at {self.base_url} did not answer {method} {path} within {timeout:.0f} s")
        try:
            body = response.json()
        except ValueError:
            fail(f"{method} {url} answered {response.status_code} with a non-JSON body")
        if response.status_code == 401:
            fail(
                f"{method} {path} -> 401: {body.get('error', {}).get('message', '')}; set AETHERCORE_API_KEY "
                "(`python manage.py up` writes an admin key to AETHERCORE_ADMIN_KEY_FILE)"
            )
        if response.status_code not in ok:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            fail(f"{method} {path} -> {response.status_code} {error.get('code', '')}: {error.get('message', body)}")
        return response.status_code, body


def client() -> ApiClient:
    cfg = settings()
    return ApiClient(cfg.url, api_key(cfg))


def probe(url: str) -> tuple[str, float]:
    """`up`, or `down (why)`, for an HTTP endpoint, and how long it took to answer (ms)."""
    began = time.perf_counter()
    try:
        code = requests.get(url, timeout=2).status_code
    except requests.RequestException as exc:
        return f"down ({type(exc).__name__})", (time.perf_counter() - began) * 1000
    state = "up" if code < 500 or code == 503 else f"down (HTTP {code})"
    return state, (time.perf_counter() - began) * 1000
