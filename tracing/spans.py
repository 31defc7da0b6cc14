"""The span helpers every process uses. Each takes and gives contexts as traceparent strings (what the job record,
the Celery message and the webhook carry) and does nothing when tracing is off (setup.py) or when the parent was
not sampled: the cost of an unsampled job is one comparison per helper.

Span names and attributes are listed in docs/OPERATIONS.md "Tracing". Attributes never hold a credential: a span
gets a caller's role, never a key, a token or a signing secret (tests/integration/test_tracing.py checks)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from tracing import w3c
from tracing.setup import STATE

Attributes = Mapping[str, Any]


_LOW_64 = (1 << 64) - 1


class Unsampled:
    """A new trace the sampler does not keep, decided without the SDK: its context travels, nothing is recorded."""

    __slots__ = ("context",)

    def __init__(self, trace_id: int) -> None:
        self.context = w3c.make(trace_id, random.getrandbits(64) or 1, 0)

    def is_recording(self) -> bool:
        return False

    def end(self, end_time: int | None = None) -> None:
        pass


def on() -> bool:
    return STATE.tracer is not None


def _context(traceparent: str, tracestate: str | None = None) -> Any:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    state = TraceState.from_header([tracestate]) if tracestate else None
    parent = SpanContext(
        int(w3c.trace_id(traceparent), 16),
        int(w3c.span_id(traceparent), 16),
        is_remote=True,
        trace_flags=TraceFlags(int(traceparent[53:55], 16)),
        trace_state=state,
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def _link(traceparent: str) -> Any:
    from opentelemetry.trace import Link, SpanContext, TraceFlags

    return Link(
        SpanContext(
            int(w3c.trace_id(traceparent), 16),
            int(w3c.span_id(traceparent), 16),
            is_remote=True,
            trace_flags=TraceFlags(int(traceparent[53:55], 16)),
        )
    )


def start(
    name: str,
    parent: str | None,
    *,
    kind: str = "internal",
    start_ns: int | None = None,
    attributes: Attributes | None = None,
    links: Iterable[str] = (),
    tracestate: str | None = None,
    root: bool = False,
) -> Any:
    """A started span (end it with `end`), child of `parent`; None when tracing is off, or when `parent` was not
    sampled under a parent-based sampler (nothing below an unsampled span is recorded). Without `parent` a span
    starts a trace only with `root` (the API's request span, a forward pass); otherwise there is nothing to hang it
    on and None comes back. `links`: traceparents this span serves (a forward pass: its jobs'). `kind`: internal,
    server, client or consumer."""
    tracer = STATE.tracer
    if tracer is None:
        return None
    if parent is None:
        if not root:
            return None
        context = STATE.empty_context  # a new trace, never the thread's current span
        bound = STATE.root_bound
        if bound is not None:  # a ratio sampler: decided here by its rule, the SDK only for a trace it keeps
            trace_id = random.getrandbits(128) or 1
            if trace_id & _LOW_64 >= bound:
                return Unsampled(trace_id)
            STATE.ids.preset(trace_id)
    else:
        if STATE.parent_based and not w3c.sampled(parent):
            return None
        context = _context(parent, tracestate)
    return tracer.start_span(
        name,
        context,
        kind=STATE.kinds[kind],
        attributes=attributes,
        links=[_link(link) for link in links],
        start_time=start_ns,
    )


def record(
    name: str,
    parent: str | None,
    start_s: float,
    end_s: float,
    attributes: Attributes | None = None,
    *,
    error: str | None = None,
) -> None:
    """A span that already happened (epoch seconds), e.g. a job's time in its queue, measured from its record."""
    span = start(name, parent, start_ns=int(start_s * 1e9), attributes=attributes)
    if span is not None:
        end(span, error, end_ns=int(end_s * 1e9))


def end(span: Any, error: str | None = None, end_ns: int | None = None) -> None:
    """End `span` (None: nothing); `error`: the error code it ended with (status ERROR, `error.type`)."""
    if span is None or isinstance(span, Unsampled):
        return
    if error:
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("error.type", error)
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=end_ns)


def traceparent(span: Any) -> str:
    if isinstance(span, Unsampled):
        return span.context
    ctx = span.get_span_context()
    return w3c.make(ctx.trace_id, ctx.span_id, int(ctx.trace_flags))


def child_traceparent(span: Any, parent: str | None) -> str | None:
    """What to pass on below `span`: its own context, else (no span: off or unsampled) the parent's unchanged."""
    return traceparent(span) if span is not None else parent


def recording(traceparent_: str | None) -> bool:
    """Whether spans under `traceparent_` are recorded here (tracing on and the parent sampled)."""
    return (
        STATE.tracer is not None and traceparent_ is not None and (not STATE.parent_based or w3c.sampled(traceparent_))
    )


def event(span: Any, name: str, attributes: Attributes | None = None, at_s: float | None = None) -> None:
    if span is not None:
        span.add_event(name, attributes or {}, int(at_s * 1e9) if at_s is not None else None)
