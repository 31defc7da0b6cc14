"""Every AetherCore setting: one env var each, a default that works on a laptop, validated at start-up.

Each setting is declared once, as a field of `Settings` (`setting(default, parser, doc)`; its env var is
AETHERCORE_<NAME>). `SETTINGS` is derived from those fields; README's configuration table and `.env.example`
are generated from it (scripts/sync-config-docs.sh) and checked against it by the test suite.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from config.roles import ROLES
from config.units import parse_bool, parse_size

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A setting or a models.yaml entry is invalid; the message names it and the bad value."""


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"{value!r} must be a whole number >= 1")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:  # also rejects NaN
        raise ValueError(f"{value!r} must be a number >= 0")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 65535:
        raise ValueError(f"{value!r} is not a TCP port (1-65535)")
    return number


def _choice(*options: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        lowered = value.strip().lower()
        if lowered not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return lowered

    return parse


def _redis_url(value: str) -> str:
    scheme = urlparse(value).scheme
    if scheme not in {"redis", "rediss", "unix", "sentinel"}:
        raise ValueError(f"{value!r} is not a redis://, rediss://, unix:// or sentinel:// URL")
    return value


def _broker_url(value: str) -> str:
    if not urlparse(value).scheme:
        raise ValueError(f"{value!r} is not a broker URL (redis://... or amqp://...)")
    return value


def _path(value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _optional_file(value: str) -> Path | None:
    if not value.strip():
        return None
    path = _path(value)
    if not path.is_file():
        raise ValueError(f"{path} is not a readable file")
    return path


def _paths(value: str) -> tuple[Path, ...]:
    return tuple(_path(part) for part in value.split(":") if part.strip())


def _basic_auth(value: str) -> str:
    if value and any(":" not in pair for pair in value.split(",")):
        raise ValueError("must be user:password pairs separated by commas")
    return value


def _api_keys(value: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in value.split(","))):
        key, sep, role = pair.rpartition(":")
        if not sep or not key or role not in ROLES:
            raise ValueError(f"each entry must be key:role with role one of {', '.join(ROLES)}")
        if len(key) < 16:
            raise ValueError("API keys must be at least 16 characters")
        keys[key] = role
    return keys


def _optional_index(value: str) -> int | None:
    if value == "":
        return None
    number = int(value)
    if number < 0:
        raise ValueError(f"{value!r} must be a GPU index >= 0")
    return number


def _jwt_secret(value: str) -> str:
    if value and len(value.encode()) < 32:
        raise ValueError("must be at least 32 bytes (RFC 7518 3.2); generate one with `openssl rand -hex 32`")
    return value


def _rate_limit(value: str) -> str:
    if value and not re.match(r"^\s*\d+\s*(/|per)\s*\w+", value):
        raise ValueError("use flask-limiter syntax like 600/minute")
    return value.strip()


def _log_level(value: str) -> str:
    upper = value.strip().upper()
    if upper not in {"TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError(f"{value!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
    return upper


_DEVICE_RE = re.compile(r"^(cpu|cuda:\d+)$")


def parse_worker_device(value: str) -> str:
    device = value.strip().lower()
    if device == "cuda":
        device = "cuda:0"
    if not _DEVICE_RE.match(device):
        raise ValueError(f"{value!r} is not a worker device (cpu or cuda:N)")
    return device


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: str
    parse: Callable[[str], Any]
    doc: str


def setting(default: str, parse: Callable[[str], Any], doc: str) -> Any:
    """One setting, declared once: its field here; its env var is AETHERCORE_<NAME>, `default` is what an unset
    variable means, `parse` validates the text, `doc` is its line in README and .env.example."""
    return field(metadata={"default": default, "parse": parse, "doc": doc})


@dataclass(frozen=True)
class Settings:
    host: str = setting("0.0.0.0", str, "Address the API binds to.")
    port: int = setting("8001", _port, "Port the API listens on.")
    tls_cert: Path | None = setting(
        "",
        _optional_file,
        "Certificate chain (PEM) the API serves HTTPS with, with AETHERCORE_TLS_KEY; empty: plain HTTP.",
    )
    tls_key: Path | None = setting("", _optional_file, "Private key (PEM) of AETHERCORE_TLS_CERT.")
    workers: int = setting("1", _positive_int, "gunicorn worker processes for the API.")
    api_threads: int = setting(
        "64", _positive_int, "Threads per API process: each request, open long poll (?wait) or open stream holds one."
    )
    log_level: str = setting("INFO", _log_level, "Log level of every process.")
    log_format: str = setting(
        "text", _choice("text", "json"), "`text` for people, `json` for one JSON object per line."
    )
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        _redis_url,
        "Redis for jobs, results, cluster state and (by default) the Celery broker.",
    )
    redis_sentinel_master: str = setting(
        "mymaster",
        str,
        "Master name when AETHERCORE_REDIS_URL is `sentinel://host:26379[;sentinel://host2:26379][/db]`.",
    )
    redis_ca: Path | None = setting(
        "",
        _optional_file,
        "CA certificate (PEM) a `rediss://` Redis must present a certificate from (jobs, broker, limiter, "
        "Flower); empty: the system's trusted CAs.",
    )
    redis_cert: Path | None = setting(
        "", _optional_file, "Client certificate (PEM) for mutual TLS with Redis, with AETHERCORE_REDIS_KEY."
    )
    redis_key: Path | None = setting("", _optional_file, "Private key of AETHERCORE_REDIS_CERT.")
    broker_url: str = setting("", _broker_url, "Celery broker; empty means the same as AETHERCORE_REDIS_URL.")
    gpu_enabled: str = setting(
        "auto",
        _choice("auto", "true", "false"),
        "`auto` uses GPU workers when some are alive; `false` routes `device: auto` models to the CPU.",
    )
    model_cache_size: int = setting(
        "1GB",
        parse_size,
        "Memory budget for resident models per worker, each model counted by what its model process holds "
        "for it (weights, tokenizer, activations; not the shared libraries); the least recently used model is "
        "evicted beyond it.",
    )
    autoload: bool = setting(
        "true", parse_bool, "Serving a model that is not loaded loads it first; `false` answers 409 instead."
    )
    models_file: Path = setting("config/models.yaml", _path, "The model declarations.")
    model_store: Path = setting(
        "model_store/artifacts",
        _path,
        "Directory that `source: local` model paths are relative to (relative paths: to the repository).",
    )
    model_roots: tuple[Path, ...] = setting(
        "",
        _paths,
        "More directories (separated by `:`) that `source: local` model paths may point into, besides the "
        "model store; a path anywhere else is refused.",
    )
    hf_download: bool = setting(
        "false", parse_bool, "Allow `source: huggingface` models missing from the local cache to be downloaded."
    )
    result_ttl: int = setting(
        "3600", _positive_int, "Seconds a finished job and its result are kept in Redis (per request: `result_ttl`)."
    )
    max_wait: float = setting("60", _non_negative_float, "Upper bound in seconds for `?wait=` on job endpoints.")
    max_batch_inputs: int = setting(
        "256", _positive_int, "Most inputs one POST /serve/batch request may carry (413 beyond)."
    )
    load_timeout: float = setting(
        "300", _non_negative_float, "Seconds a load job waits for every replica of its device to report."
    )
    device: str = setting(
        "cpu",
        parse_worker_device,
        "Device a worker is pinned to (`cpu`, `cuda:N`); `manage.py worker --device` sets it.",
    )
    gpu_index: int | None = setting(
        "",
        _optional_index,
        "Physical GPU a `cuda:N` worker uses (CUDA_VISIBLE_DEVICES); empty: N. In a container that sees "
        "only its reserved GPU, set 0.",
    )
    worker_concurrency: int = setting(
        "64",
        _positive_int,
        "Task threads per worker process, and so the jobs it takes from its queue at once; at least the "
        "largest max_batch_size, so a batch can fill (models are shared by the threads, one copy each).",
    )
    torch_threads: int = setting(
        "0",
        int,
        "Intra-op threads of each model process's forward passes; 0 means the CPU cores shared out among "
        "the model's instances.",
    )
    heartbeat_interval: float = setting("2", _non_negative_float, "Seconds between worker heartbeats.")
    worker_ttl: int = setting(
        "10",
        _positive_int,
        "Seconds without a heartbeat after which a worker counts as dead and its running jobs are queued again.",
    )
    flower_port: int = setting("5555", _port, "Port of the Flower dashboard.")
    flower_max_tasks: int = setting(
        "10000",
        _positive_int,
        "Tasks Flower keeps in memory (~8 KB each; its own default of 100,000 held 840 MB in the soak).",
    )
    flower_basic_auth: str = setting(
        "", _basic_auth, "`user:password[,user2:password2]` to put Flower behind basic auth; empty: no auth."
    )
    url: str = setting("http://127.0.0.1:8001", str, "Where `manage.py` finds the API.")
    auth: bool = setting(
        "true",
        parse_bool,
        "Require an API key or JWT on every endpoint but /heartbeat, /health*, /docs and /openapi.json.",
    )
    api_keys: dict = setting(
        "", _api_keys, "Static API keys, `key:role` pairs separated by commas (roles: admin, operator, user, viewer)."
    )
    jwt_secret: str = setting(
        "", _jwt_secret, "HS256 secret for JWTs (`sub`, `role`, `exp` checked); empty: JWTs are not accepted."
    )
    metrics_auth: bool = setting("false", parse_bool, "Require credentials (any role) for /metrics.")
    rate_limit: str = setting(
        "60000/minute",
        _rate_limit,
        "Requests per caller (API key, JWT subject, or address) in flask-limiter syntax; empty: no limit.",
    )
    admin_key_file: Path = setting(
        "var/admin.key", _path, "Where `manage.py up` keeps the admin key it creates on first run (mode 600)."
    )
    max_request_bytes: int = setting("10MB", parse_size, "Largest request body; larger ones are refused with 413.")
    max_input_chars: int = setting("20000", _positive_int, "Longest `inputs.text` accepted (422 beyond).")
    dispatch_linger_ms: float = setting(
        "1",
        _non_negative_float,
        "Under load (several requests of an API process waiting), how long a submission waits for others to "
        "leave in the same Celery message; 0: never. At low load a submission never waits.",
    )
    max_queue_depth: int = setting(
        "10000", _positive_int, "Messages a device queue may hold; new submissions beyond it get 429 with Retry-After."
    )
    visibility_timeout: int = setting(
        "300",
        _positive_int,
        "Seconds before the broker redelivers an unacknowledged message (a second line: the reaper queues a "
        "dead worker's jobs again after AETHERCORE_WORKER_TTL); longer than the longest job.",
    )
    max_attempts: int = setting(
        "3",
        _positive_int,
        "Crashes charged to a job (it was alone in a forward pass when its model process or worker died) before "
        "it fails as `poison_job`.",
    )

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def redis_ssl(self, url: str | None = None) -> dict[str, str]:
        """redis-py's TLS options for a `rediss://` URL (the jobs' Redis by default); {} for plain redis://."""
        if not (url or self.redis_url).startswith("rediss://"):
            return {}
        options = {"ssl_cert_reqs": "required"}
        for option, path in (
            ("ssl_ca_certs", self.redis_ca),
            ("ssl_certfile", self.redis_cert),
            ("ssl_keyfile", self.redis_key),
        ):
            if path is not None:
                options[option] = str(path)
        return options

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for spec in SETTINGS:
            if spec.name in overrides:
                values[spec.name] = overrides.pop(spec.name)
                continue
            raw = env.get(spec.env, spec.default)
            if spec.name in {"broker_url", "flower_basic_auth", "jwt_secret", "rate_limit"} and raw == "":
                values[spec.name] = ""
                continue
            if spec.name == "gpu_index" and raw == "":
                values[spec.name] = None
                continue
            try:
                values[spec.name] = spec.parse(raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{spec.env}={raw!r} is invalid: {exc}") from None
        if overrides:
            raise TypeError(f"unknown settings: {', '.join(sorted(overrides))}")
        for cert, key in (("tls_cert", "tls_key"), ("redis_cert", "redis_key")):
            if (values.get(cert) is None) != (values.get(key) is None):
                raise ConfigError(f"{_ENV[cert]} and {_ENV[key]} go together: set both or neither")
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        current.update(overrides)
        return Settings(**current)


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f.name, f"AETHERCORE_{f.name.upper()}", f.metadata["default"], f.metadata["parse"], f.metadata["doc"])
    for f in fields(Settings)
)
_ENV = {spec.name: spec.env for spec in SETTINGS}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()
