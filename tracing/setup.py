"""Tracing on or off for this process, from the standard OpenTelemetry variables.

On when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`), unless
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. Then the SDK's TracerProvider exports over OTLP/HTTP
(protobuf) from a background batch processor; everything else is the SDK's own reading of the environment:
`OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default parentbased_always_on), `OTEL_EXPORTER_OTLP_HEADERS`,
`OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*` (the batch processor's queue and delay), `OTEL_RESOURCE_ATTRIBUTES`.
`OTEL_SERVICE_NAME` names every process of the service; without it each is `aethercore-<process>` (api, worker,
dispatcher, batches). Each span's resource also says `aethercore.process` and the pid.

Off, nothing of the SDK is imported and every helper of spans.py returns at its first line.
`AETHERCORE_TRACE_REDIS=1` (with tracing on) adds the contrib redis instrumentation: a span per Redis command, for
debugging only (docs/OPERATIONS.md "Tracing": it costs more than the request it traces)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from typing import Any

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
REDIS_COMMANDS_VARIABLE = "AETHERCORE_TRACE_REDIS"
TRACER_NAME = "aethercore"


class _State:
    tracer: Any = None  # the SDK's tracer once on; None: off
    provider: Any = None
    # The sampler decides a child by its parent's sampled flag (parentbased_*, the default): a span under an
    # unsampled parent is then skipped here at once, without the SDK making a non-recording span for it.
    parent_based = True
    # A ratio sampler's bound on a trace id's low 64 bits (the SDK's TraceIdRatioBased rule): a new trace it would
    # not keep is decided here, without the SDK (tracing/spans.py `start`); None: the SDK decides every root.
    root_bound: int | None = None
    ids: Any = None  # the provider's id generator (`PresetIds`): a root the SDK keeps gets the trace id decided here
    kinds: dict[str, Any] = {}  # span kinds by name, and the SDK's empty context: imported once, not per span
    empty_context: Any = None
    process = ""


STATE = _State()
_lock = threading.Lock()


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint, and neither the SDK nor the exporter turned off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def configure(process: str, environ: Mapping[str, str] = os.environ, trust_caller_sampling: bool = True) -> bool:
    """Turn tracing on for this process (`process`: api, worker, dispatcher, batches) if the environment asks for it;
    whether it is on. Once per process: a later call (another app built in the same process) keeps the first set-up.
    `trust_caller_sampling` false (the API's AETHERCORE_TRACE_CALLER_SAMPLING): a remote parent's sampled flag is not
    followed; the sampler's own root decision (its ratio, on the trace id) is taken for it too."""
    with _lock:
        if STATE.tracer is not None:
            return True
        if not wanted(environ):
            return False
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased

        attributes: dict[str, Any] = {
            "aethercore.process": process,
            "process.pid": os.getpid(),
            "host.name": socket.gethostname(),
        }
        if not environ.get("OTEL_SERVICE_NAME", "").strip():
            attributes["service.name"] = f"aethercore-{process}"
        STATE.ids = _preset_ids()
        provider = TracerProvider(resource=Resource.create(attributes), id_generator=STATE.ids)
        if not trust_caller_sampling:
            provider.sampler = _own_decision(provider.sampler)
        STATE.root_bound = _ratio_bound(provider.sampler)
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind

        STATE.kinds = {kind.name.lower(): kind for kind in SpanKind}
        STATE.empty_context = Context()
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        STATE.provider, STATE.process = provider, process
        STATE.parent_based = isinstance(provider.sampler, ParentBased)
        STATE.tracer = provider.get_tracer(TRACER_NAME)
        if environ.get(REDIS_COMMANDS_VARIABLE, "").strip() in ("1", "true", "yes"):
            from opentelemetry.instrumentation.redis import RedisInstrumentor

            RedisInstrumentor().instrument(tracer_provider=provider)
        return True


def _preset_ids() -> Any:
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        """Random ids, except the trace id this thread set for the root span it starts next (`preset`)."""

        def __init__(self) -> None:
            self.local = threading.local()  # a greenlet's own under gevent (patched)

        def preset(self, trace_id: int) -> None:
            self.local.trace_id = trace_id

        def generate_trace_id(self) -> int:
            preset = getattr(self.local, "trace_id", None)
            if preset is None:
                return super().generate_trace_id()
            self.local.trace_id = None
            return preset

    return PresetIds()


def _ratio_bound(sampler: Any) -> int | None:
    """The bound of a parent-based ratio sampler's root decision (trace id's low 64 bits < bound: kept); None for any
    other sampler (always_on keeps every root: nothing to decide ahead)."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    root = getattr(sampler, "_root", None) if isinstance(sampler, ParentBased) else None
    return root.bound if isinstance(root, TraceIdRatioBased) else None


def _own_decision(sampler: Any) -> Any:
    """The configured sampler, deciding a caller's (remote) traces as its roots: a caller's flag counts for nothing."""
    from opentelemetry.sdk.trace.sampling import ParentBased

    if not isinstance(sampler, ParentBased):
        return sampler  # not parent-based: it never followed a caller's flag
    root = sampler._root  # the SDK keeps the root sampler it was built with (no public accessor)
    return ParentBased(root, remote_parent_sampled=root, remote_parent_not_sampled=root)


def flush(timeout_ms: int = 5000) -> None:
    """Export what is buffered now (a process about to exit, a test about to read its receiver)."""
    if STATE.provider is not None:
        STATE.provider.force_flush(timeout_ms)
