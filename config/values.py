"""How each setting's text is read and checked (config/settings.py declares every setting with one of these
parsers): numbers and sizes within bounds, URLs, ports, paths, secrets that are not placeholders, rate limits, lane
grants, devices. A parser raises ConfigError naming what is wrong and what to write instead.

Imports nothing of ours but config/."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse, urlsplit, urlunsplit

from config.roles import ROLES
from config.units import parse_size

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A setting or a models.yaml entry is invalid; the message names it and the bad value."""


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"{value!r} must be a whole number >= 1")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{value!r} must be a whole number >= 0")
    return number


def _json_depth(value: str) -> int:
    # 16: a /serve/batch body around a rank-8 tensor nests 12 deep; 200: under orjson's encoder limit (254), which
    # job payloads go through.
    number = int(value)
    if not 16 <= number <= 200:
        raise ValueError(f"{value!r} must be a whole number from 16 to 200")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:  # also rejects NaN
        raise ValueError(f"{value!r} must be a number >= 0")
    return number


def _file_size(value: str) -> int:
    number = parse_size(value)
    if not 1024 <= number <= 2**30:
        raise ValueError(f"{value!r} must be a size from 1KB to 1GiB")
    return number


Number = TypeVar("Number", int, float)


def _shown(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


def _bounded(read: Callable[[str], Number], low: Number, high: Number, what: str) -> Callable[[str], Number]:
    def parse(value: str) -> Number:
        number = read(value)
        if not low <= number <= high:  # also rejects NaN
            raise ValueError(f"{value!r} must be {what} from {_shown(low)} to {_shown(high)}")
        return number

    return parse


def _bounded_float(low: float, high: float) -> Callable[[str], float]:
    return _bounded(float, low, high, "a number")


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    return _bounded(int, low, high, "a whole number")


def _bounded_size(low: int, high: int) -> Callable[[str], int]:
    return _bounded(parse_size, low, high, "a size in bytes")


_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def _webhook_allow(value: str) -> tuple[str, ...]:
    """Hosts, addresses and networks (CIDR) webhooks may reach beyond the default (webhooks/outbound.py)."""
    import ipaddress

    entries = []
    for raw in filter(None, (part.strip().lower() for part in value.split(","))):
        try:
            entries.append(str(ipaddress.ip_network(raw.strip("[]"), strict=False)))
            continue
        except ValueError:
            pass
        if not _HOSTNAME_RE.match(raw.rstrip(".")):
            raise ValueError(f"{raw!r} is neither a host name, an IP address nor a network (10.0.0.0/8)")
        entries.append(raw.rstrip("."))
    return tuple(entries)


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
        raise ValueError(f"{without_password(value)!r} is not a redis://, rediss://, unix:// or sentinel:// URL")
    _url_password(value)
    return value


def _broker_url(value: str) -> str:
    if not urlparse(value).scheme:
        raise ValueError(f"{without_password(value)!r} is not a broker URL (redis://... or amqp://...)")
    _url_password(value)
    return value


def without_password(url: str) -> str:
    """A URL (or Sentinel's `;`-separated URLs) with any password taken out: for messages and for processes that
    must not hold it."""
    parts = []
    for part in url.split(";"):
        split = urlsplit(part)
        if split.password is not None:
            host = split.netloc.rpartition("@")[2]
            user = split.username or ""
            split = split._replace(netloc=f"{user}@{host}" if user else host)
        parts.append(urlunsplit(split))
    return ";".join(parts)


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


# Secrets that ship in examples and templates, or that anyone would guess: refused at start wherever a secret
# goes (API keys, the JWT secret, Flower's login, the password in a Redis or broker URL), so that a deployment
# copied from a template never runs with its placeholder. Markers match anywhere in the secret (any case);
# whole values match exactly.
PLACEHOLDER_MARKERS = (
    "replace-me",
    "replace_me",
    "replaceme",
    "change-me",
    "change_me",
    "changeme",
    "changeit",
    "example",
    "placeholder",
    "your-",
    "your_",
    "<",
    "xxxxxxxx",
)
PLACEHOLDER_VALUES = frozenset(
    {"admin", "password", "passw0rd", "secret", "guest", "redis", "root", "test", "default", "letmein", "1234"}
)


def is_placeholder(secret: str) -> bool:
    lowered = secret.strip().lower()
    return lowered in PLACEHOLDER_VALUES or any(marker in lowered for marker in PLACEHOLDER_MARKERS)


class PlaceholderSecret(ValueError):
    pass


def _refuse_placeholder(secret: str, what: str) -> None:
    if is_placeholder(secret):
        raise PlaceholderSecret(
            f"{what} is a placeholder or a well-known value (e.g. replace-me, change-me, example, admin, password); "
            "set a random one, e.g. `openssl rand -hex 32`"
        )


def _basic_auth(value: str) -> str:
    if value and any(":" not in pair for pair in value.split(",")):
        raise ValueError("must be user:password pairs separated by commas")
    for pair in filter(None, value.split(",")):
        _refuse_placeholder(pair.partition(":")[2], "a password")
    return value


def _api_keys(value: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in value.split(","))):
        key, sep, role = pair.rpartition(":")
        if not sep or not key or role not in ROLES:
            raise ValueError(f"each entry must be key:role with role one of {', '.join(ROLES)}")
        if len(key) < 16:
            raise ValueError("API keys must be at least 16 characters")
        _refuse_placeholder(key, f"the {role} key")
        keys[key] = role
    return keys


LOOPBACK_HOSTS = ("localhost", "::1")


def _is_loopback(host: str | None) -> bool:
    return host is not None and (host in LOOPBACK_HOSTS or host.startswith("127."))


def _url_password(value: str) -> None:
    """A well-known password in a Redis or broker URL is refused, except to a server on this host's loopback (a
    developer's own Redis, RabbitMQ's `guest`, which RabbitMQ itself admits only over loopback): nothing past the
    host can use it there."""
    for part in value.split(";"):  # sentinel://a:26379;sentinel://b:26379
        parsed = urlparse(part)
        if parsed.password is not None and not _is_loopback(parsed.hostname):
            _refuse_placeholder(parsed.password, "the URL's password")


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
    if value:
        _refuse_placeholder(value, "the secret")
    return value


def _rate_limit(value: str) -> str:
    if value and not re.match(r"^\s*\d+\s*(/|per)\s*\w+", value):
        raise ValueError("use flask-limiter syntax like 600/minute")
    return value.strip()


def _lanes_by_role(value: str) -> dict[str, frozenset[str]]:
    """`role:lane+lane,...` -> the lanes each role may use: the listed roles', the others' by default (admins and
    operators every lane, everyone else `normal` and `low`)."""
    from config.lanes import LANES
    from config.roles import ADMIN, OPERATOR, ROLES

    allowed = {role: frozenset(LANES if role in (ADMIN, OPERATOR) else LANES[1:]) for role in ROLES}
    for item in filter(None, (part.strip() for part in value.split(","))):
        role, _, lanes = item.partition(":")
        chosen = frozenset(filter(None, (lane.strip() for lane in lanes.split("+"))))
        if role.strip() not in ROLES or not chosen or not chosen <= set(LANES):
            raise ValueError(
                f"use role:lane+lane,... with roles from {ROLES} and lanes from {LANES}, e.g. user:normal+low"
            )
        allowed[role.strip()] = chosen
    return allowed


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
