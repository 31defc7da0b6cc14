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


def configure(process: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on for this process (`process`: api, worker, dispatcher, batches) if the environment asks for it;
    whether it is on. Once per process: a later call (another app built in the same process) keeps the first set-up."""
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
        provider = TracerProvider(resource=Resource.create(attributes))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        STATE.provider, STATE.process = provider, process
        STATE.parent_based = isinstance(provider.sampler, ParentBased)
        STATE.tracer = provider.get_tracer(TRACER_NAME)
        if environ.get(REDIS_COMMANDS_VARIABLE, "").strip() in ("1", "true", "yes"):
            from opentelemetry.instrumentation.redis import RedisInstrumentor

            RedisInstrumentor().instrument(tracer_provider=provider)
        return True


def flush(timeout_ms: int = 5000) -> None:
    """Export what is buffered now (a process about to exit, a test about to read its receiver)."""
    if STATE.provider is not None:
        STATE.provider.force_flush(timeout_ms)


def shutdown() -> None:
    """Flush and stop exporting (the SDK also does this at interpreter exit)."""
    if STATE.provider is not None:
        STATE.provider.shutdown()
