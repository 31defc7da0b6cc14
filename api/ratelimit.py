"""The per-caller rate limit of inference submissions, counted in the same Redis round trip that creates
the job (tasks/jobs/records.py `create_limited`), so a /serve request pays no separate round trip for it.

Every other endpoint is limited by flask-limiter (api/security.py) with the same AETHERCORE_RATE_LIMIT,
per endpoint; the inference endpoints (/serve, /serve/batch, WS /serve/stream) share one counter per
caller. A caller's submissions to the `high` lane are also counted on a counter of their own, limited by
AETHERCORE_HIGH_LANE_RATE_LIMIT: a caller granted `high` cannot spend its whole limit there. Fixed windows: a counter
starts with the caller's first request and expires a window later.

Authenticated admins and operators are not limited per caller (`limited_per_caller`): they run the service, and
their load generators, dashboards and scripts must not be throttled by the limit that keeps tenants fair (the
same rule exempts them from the per-caller stream cap, api/limits.py). Anonymous callers (auth off) are limited
by address.
"""

from __future__ import annotations

from typing import Any

import limits
from flask import Flask, g
from flask_limiter.util import get_remote_address

from config.roles import ADMIN, OPERATOR
from tasks.names import DEFAULT_LANE, LANES, rate_limit_key

# The endpoints whose submissions are counted here rather than by flask-limiter.
INFERENCE_ENDPOINTS = frozenset({"serve.Serve", "serve.ServeBatch", "serve_stream", "oip.Infer", "oip.InferVersion"})


def caller_id() -> str:
    """Who a rate limit counts: the API key or JWT subject, else the client's address."""
    who = g.get("principal")
    return who.id if who is not None and who.id != "anonymous" else get_remote_address()


def limited_per_caller() -> bool:
    """Whether this request's caller counts against the per-caller limits: everyone but an authenticated admin or
    operator."""
    who = g.get("principal")
    return who is None or who.id == "anonymous" or who.role not in (ADMIN, OPERATOR)


def _parsed(spec: str) -> list[tuple[int, int]]:
    return [(item.amount, int(item.get_expiry())) for item in limits.parse_many(spec)] if spec else []


class InferenceRateLimit:
    def __init__(self, spec: str, high_lane_spec: str = "") -> None:
        self.items = _parsed(spec)
        self.high_items = _parsed(high_lane_spec)

    def __bool__(self) -> bool:
        return bool(self.items or self.high_items)

    def counters(self, caller: str, lane: str = DEFAULT_LANE) -> list[tuple[str, int, int]]:
        """The counters (key, amount, window s) one submission of `caller` to `lane` counts on."""
        counted = [(rate_limit_key(caller, amount, window), amount, window) for amount, window in self.items]
        if lane == LANES[0]:
            own = f"{lane}-lane|{caller}"  # callers are key:, env:, jwt: or an address: never this shape
            counted += [(rate_limit_key(own, amount, window), amount, window) for amount, window in self.high_items]
        return counted

    @staticmethod
    def remember(used: list[int], counted: list[tuple[str, int, int]]) -> None:
        """Headers for this response, like flask-limiter's: the tightest limit's use."""
        left = [(amount - count, amount, window) for count, (_key, amount, window) in zip(used, counted)]
        remaining, amount, window = min(left)
        g.rate_limit_headers = {
            "X-RateLimit-Limit": str(amount),
            "X-RateLimit-Remaining": str(max(0, remaining)),
            "X-RateLimit-Window": str(window),
        }


def init_rate_limit_headers(app: Flask) -> None:
    @app.after_request
    def _headers(response: Any) -> Any:
        headers = g.get("rate_limit_headers")
        if headers:
            response.headers.update(headers)
        return response
