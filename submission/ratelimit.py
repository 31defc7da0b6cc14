"""The per-caller rate limit of inference submissions, counted in the same Redis round trip that creates
the job (tasks/jobs/records.py `create_limited`), so a /serve request pays no separate round trip for it.

Every other endpoint is limited by flask-limiter (api/security.py) with the same AETHERCORE_RATE_LIMIT,
per endpoint; the inference endpoints (/serve, /serve/batch, WS /serve/stream) share one counter per
caller. A caller's submissions to the `high` lane are also counted on a counter of their own, limited by
AETHERCORE_HIGH_LANE_RATE_LIMIT: a caller granted `high` cannot spend its whole limit there. Fixed windows: a counter
starts with the caller's first request and expires a window later.

Authenticated admins and operators are not limited per caller (submission/caller.py `limited_per_caller`): they
run the service, and their load generators, dashboards and scripts must not be throttled by the limit that keeps
tenants fair (the same rule exempts them from the per-caller stream cap, api/limits.py). Anonymous callers (auth off)
are limited by address (api/callers.py `caller_id`).

May import: config/, tasks/.
"""

from __future__ import annotations

import limits

from tasks.names import DEFAULT_LANE, LANES, rate_limit_key


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
    def headers(used: list[int], counted: list[tuple[str, int, int]]) -> dict[str, str]:
        """Headers for the response, like flask-limiter's: the tightest limit's use."""
        left = [(amount - count, amount, window) for count, (_key, amount, window) in zip(used, counted)]
        remaining, amount, window = min(left)
        return {
            "X-RateLimit-Limit": str(amount),
            "X-RateLimit-Remaining": str(max(0, remaining)),
            "X-RateLimit-Window": str(window),
        }
