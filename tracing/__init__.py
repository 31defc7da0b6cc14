"""OpenTelemetry traces of a job's whole life: W3C Trace Context in and out (w3c.py), the SDK set up from the
standard OTEL_* variables and off without an endpoint (setup.py), and the few span helpers every process uses
(spans.py). docs/OPERATIONS.md "Tracing" lists the spans and what each tells.

Imports nothing of ours; the OpenTelemetry SDK only once tracing is on."""
