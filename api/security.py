"""Request gatekeeping, run before every view: body size and type, authentication, rate limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, g, request
from flask_limiter import Limiter
from werkzeug.middleware.proxy_fix import ProxyFix

from access.keys import KeyStore
from api.auth import Authenticator, FailedAuthLimit
from api.callers import INFERENCE_ENDPOINTS, caller_id, init_rate_limit_headers, limited_per_caller
from batches.uploads import upload_limit
from config.settings import Settings
from protocols.errors import ApiError
from tasks.redis_client import sentinel_hosts, sentinel_hosts_and_password, sentinel_options

# Open without credentials: probes, and the API's own documentation.
OPEN_PATHS = (
    "/heartbeat",
    "/health",
    "/health/live",
    "/health/ready",
    "/v2/health/live",
    "/v2/health/ready",
    "/openapi.json",
    "/docs",
)
OPEN_PREFIXES = ("/docs/assets/",)
# OIP's binary data extension sends a JSON header followed by raw tensor bytes, with no JSON content type.
ANY_BODY_PREFIXES = ("/v2/",)
# File uploads (the OpenAI Files API) are multipart/form-data, and only there.
MULTIPART_PATHS = ("/v1/files",)


def _is_open(settings: Settings) -> bool:
    path = request.path
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return True
    return path == "/metrics" and not settings.metrics_auth


class ApiLimiter(Limiter):
    """flask-limiter, not entered at all for a request its limits exempt: the inference endpoints (their
    submissions are counted with the job's creation, submission/ratelimit.py), the open paths, unmatched URLs, and the
    callers not limited per caller. Exempted through flask-limiter's own hooks (`default_limits_exempt_when`, a
    request filter), each such request still resolved the app's limits, meta limits and exemption scopes first:
    5 % of an API process's CPU per /serve at GPU speed, 7 % of a stream's (py-spy, docs/CAPACITY.md)."""

    def __init__(self, *args: Any, exempt: Callable[[], bool], **kwargs: Any) -> None:
        self.exempt = exempt
        super().__init__(*args, **kwargs)

    def _check_request_limit(self, callable_name: str | None = None, in_middleware: bool = True) -> None:
        if self.exempt():
            return
        super()._check_request_limit(callable_name, in_middleware)


def limiter_options(settings: Settings) -> dict[str, Any]:
    """flask-limiter's connection options: short timeouts, TLS; through Sentinel, the sentinels' password and TLS."""
    tls = settings.redis_ssl()
    options: dict[str, Any] = {"socket_connect_timeout": 1, "socket_timeout": 2}
    if not settings.redis_url.startswith("sentinel://"):
        return {**options, **tls}
    # The data nodes' password is the URL's; the sentinels' their own (or none: limits would send the other).
    _hosts, _db, password = sentinel_hosts_and_password(settings.redis_url)
    if password:
        options["password"] = password
    if tls:
        options.update(ssl=True, **tls)
    return {**options, "sentinel_kwargs": sentinel_options(settings.redis_sentinel_password, tls)}


def limiter_storage(settings: Settings) -> str:
    """flask-limiter's (`limits`) URL for the same Redis; Sentinel has its own scheme there."""
    if not settings.redis_url.startswith("sentinel://"):
        return settings.redis_url
    hosts, db = sentinel_hosts(settings.redis_url)
    return f"redis+sentinel://{','.join(f'{h}:{p}' for h, p in hosts)}/{settings.redis_sentinel_master}?db={db}"


def init_security(app: Flask, settings: Settings, client: redis.Redis) -> Authenticator:
    if settings.proxy_hops:
        # The client's address as the trusted proxies saw it (werkzeug takes the last `proxy_hops` entries).
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops)  # type: ignore[method-assign]
    failures = FailedAuthLimit(client, settings.auth_failure_limit, settings.auth_failure_window)
    authenticator = Authenticator(settings.auth, settings.api_keys, settings.jwt_secret, KeyStore(client), failures)
    app.extensions["aethercore_auth"] = authenticator

    @app.before_request
    def _gate() -> None:
        if (
            request.method in {"POST", "PUT", "PATCH"}
            and request.content_length
            and not request.is_json
            and not request.path.startswith(ANY_BODY_PREFIXES)
            and not (request.mimetype == "multipart/form-data" and request.path in MULTIPART_PATHS)
        ):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send the body as JSON with Content-Type: application/json, not {request.mimetype or 'no type'}",
            )
        if request.path in MULTIPART_PATHS and request.method == "POST":
            request.max_content_length = upload_limit(settings.files_max_bytes)  # a file, not a JSON body
        if request.url_rule is None or _is_open(settings):
            return
        g.principal = authenticator.authenticate()

    init_rate_limit_headers(app)
    if settings.rate_limit:
        ApiLimiter(
            caller_id,
            app=app,
            default_limits=[settings.rate_limit],
            storage_uri=limiter_storage(settings),
            storage_options=limiter_options(settings),
            strategy="fixed-window",
            headers_enabled=True,
            swallow_errors=True,
            exempt=lambda: (
                request.endpoint in INFERENCE_ENDPOINTS
                or request.url_rule is None
                or _is_open(settings)
                or not limited_per_caller()
            ),
        )
    return authenticator
