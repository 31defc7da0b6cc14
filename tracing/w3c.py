"""W3C Trace Context (https://www.w3.org/TR/trace-context/): `traceparent` and `tracestate` read and written as
strings, without the OpenTelemetry SDK. Cheap enough for every request, and what carries a caller's context through
the service (job record, Celery message, webhook) when tracing is off.

A traceparent is kept in its version-00 form, `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`."""

from __future__ import annotations

import re

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
# tracestate: at most 32 list members `key=value`, 512 characters in all (what a service must pass on).
_STATE_MEMBER = re.compile(
    r"[a-z0-9][_0-9a-z\-*/@]{0,255}=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
MAX_STATE_CHARS = 512
MAX_STATE_MEMBERS = 32
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def parse(value: str | None) -> str | None:
    """A caller's `traceparent` header in version-00 form, or None when it is absent or invalid (a trace then starts
    here, as the specification asks). A later version is read by its first four fields."""
    if not value or len(value) > 512:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return f"00-{trace_id}-{span_id}-{flags}"


def parse_state(value: str | None) -> str | None:
    """A caller's `tracestate` header, passed on as it came when well formed; None otherwise (dropped, as allowed)."""
    if not value or len(value) > MAX_STATE_CHARS:
        return None
    members = [member.strip() for member in value.split(",") if member.strip()]
    if not members or len(members) > MAX_STATE_MEMBERS:
        return None
    if not all(_STATE_MEMBER.fullmatch(member) for member in members):
        return None
    return ",".join(members)


def make(trace_id: int, span_id: int, flags: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def trace_id(traceparent: str) -> str:
    return traceparent[3:35]


def span_id(traceparent: str) -> str:
    return traceparent[36:52]


def sampled(traceparent: str) -> bool:
    return bool(int(traceparent[53:55], 16) & 1)
