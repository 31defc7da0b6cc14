"""What a submission is: one typed, frozen request that every way in builds from its own body (`SubmitRequest`),
and the narrow views of the caller's HTTP context it carries without this room importing the HTTP layer.

May import: config/, tasks/, access/."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from access.principal import Principal
from tasks.names import DEFAULT_LANE
from tasks.states import INFERENCE


class IdempotencyClaim(Protocol):
    """The request's Idempotency-Key as the Lua step that creates the job takes it (submission/idempotency.py
    `Claim`)."""

    record: str
    owner: str

    def as_lua(self) -> tuple[str, str, int, str]: ...

    def mark_replayed(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """One job to submit. `kind`: inference, load or unload.

    `inputs`, `parameters`: an inference job's body (a batch job's `inputs` is a list, `batch` true). `checked`: the
    protocol already checked them against the model's declarations in its own terms (OIP tensors, /v1 bodies, a
    batch line's `prepare`), so they are not checked twice. `lane`: the priority lane asked for. `webhook`: the URL
    the request names (`webhook_field` names it in errors), else the caller's default endpoint when
    `default_webhook`. `caller`: who submits (None when nobody authenticated); `caller_key`: whom the rate limit
    counts (the key or subject, else the address). `traceparent`,
    `tracestate`: the trace the job joins (the submitting request's span, a batch's, or the caller's context passed
    on). `wait_s`: how long to wait for its end (0: answer queued)."""

    model_id: str
    kind: str = INFERENCE
    inputs: Any = None
    parameters: dict[str, Any] = field(default_factory=dict)
    batch: bool = False
    checked: bool = False
    lane: str = DEFAULT_LANE
    timeout_s: float | None = None
    encoding_format: str | None = None
    result_ttl: int | None = None
    webhook: str | None = None
    webhook_field: str = "webhook.url"
    default_webhook: bool = True
    force: bool = False  # unload: end the model's running jobs at once rather than drain them
    caller: Principal | None = None
    caller_key: str = "anonymous"
    request_id: str | None = None
    # W3C Trace Context the job carries (tracing/w3c.py): the request's span, or the caller's as it came
    traceparent: str | None = None
    tracestate: str | None = None
    idempotency: IdempotencyClaim | None = None
    replay_of: str | None = None
    wait_s: float = 0.0
    # Filled with the rate limit's use for the response (headers, like flask-limiter's); None: not reported.
    limit_headers: dict[str, str] | None = None
