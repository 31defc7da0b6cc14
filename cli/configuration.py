"""`config`: every AETHERCORE_* setting, its effective value, or the documentation formats."""

from __future__ import annotations

import typer
from rich.table import Table

from cli.common import console, settings

# What docker-compose.yml reads from .env besides the settings: the secrets have no default (compose refuses to
# start until they are set; the API refuses placeholders), the addresses publish on loopback unless set.
COMPOSE_VARIABLES = (
    ("REDIS_PASSWORD", "", "Redis's password (required; hex: it goes into a URL). `openssl rand -hex 32`"),
    ("PROMETHEUS_FLOWER_PASSWORD", "", "Password of Flower's `prometheus` login, which Prometheus scrapes with."),
    (
        "PROMETHEUS_API_KEY",
        "",
        "The API key Prometheus scrapes /metrics with (required; a viewer in the API's keys). `openssl rand -hex 32`",
    ),
    ("GRAFANA_ADMIN_USER", "admin", "Grafana's admin login."),
    ("GRAFANA_ADMIN_PASSWORD", "", "Grafana's admin password (required). `openssl rand -hex 16`"),
    (
        "REDIS_MAXMEMORY",
        "2gb",
        "Redis's maxmemory (noeviction: the API answers 503 `redis_full` near it); half of it for what callers keep "
        "(AETHERCORE_HOLDINGS_MAX_SHARE): docs/DEPLOYMENT.md sizes it.",
    ),
    (
        "REDIS_MIN_REPLICAS_TO_WRITE",
        "0",
        "Redis's min-replicas-to-write on every data node; with `--profile ha` set 1, so a primary cut off from its "
        "replicas stops taking writes it would lose (docs/OPERATIONS.md, Redis failover).",
    ),
    ("API_PUBLISH_ADDRESS", "127.0.0.1", "Host address the API's port is published on; 0.0.0.0: every interface."),
    ("DASHBOARD_PUBLISH_ADDRESS", "127.0.0.1", "Host address Flower's and Grafana's ports are published on."),
    ("API_PUBLISH_PORT", "8001", "Host port the API is published on."),
    ("FLOWER_PUBLISH_PORT", "5555", "Host port Flower is published on."),
    ("GRAFANA_PUBLISH_PORT", "3000", "Host port Grafana is published on."),
    (
        "GPU_STREAM_INTERVAL",
        "4",
        "Tokens per streamed chunk after the first on the GPU workers (their AETHERCORE_STREAM_INTERVAL): four are "
        "~20 ms at GPU speed and a quarter of the stack's cost per token; 1 streams every token.",
    ),
    ("PROMETHEUS_PUBLISH_PORT", "9090", "Host port Prometheus is published on (always on 127.0.0.1: it has no login)."),
    (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "",
        "Where every process exports its traces (OTLP/HTTP, e.g. http://otel-collector:4318); empty: tracing off "
        "(docs/OPERATIONS.md, Tracing).",
    ),
    ("OTEL_EXPORTER_OTLP_HEADERS", "", "Headers of every export (a backend's API key: `x-honeycomb-team=...`)."),
    (
        "OTEL_SERVICE_NAME",
        "",
        "One service name for every process; empty: aethercore-api, -worker, -dispatcher, -batches.",
    ),
    ("OTEL_RESOURCE_ATTRIBUTES", "", "Attributes of every process's spans (`deployment.environment=prod`)."),
    (
        "OTEL_TRACES_SAMPLER",
        "parentbased_always_on",
        "Which traces are kept; under load parentbased_traceidratio with OTEL_TRACES_SAMPLER_ARG 0.01 (1 %).",
    ),
    ("OTEL_TRACES_SAMPLER_ARG", "1.0", "The ratio of parentbased_traceidratio."),
    ("TRACES_UI_URL", "http://localhost:16686", "Where Grafana's exemplar links open a trace (`<url>/trace/<id>`)."),
    (
        "OTEL_COLLECTOR_IMAGE",
        "otel/opentelemetry-collector-contrib:0.115.0",
        "The example collector's image (the commented otel-collector service).",
    ),
    (
        "BASE_IMAGE",
        "python:3.11-slim",
        "Base of the API and CPU worker images: any Debian-like image with python3 3.11 and venv (no registry: "
        "scripts/base-images.sh makes aethercore/python:3.11-bookworm).",
    ),
    (
        "CUDA_BASE",
        "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04",
        "Base of the GPU worker image (CUDA runtime and cuDNN; Python 3.11 comes from its packages when missing).",
    ),
    (
        "REDIS_IMAGE",
        "redis:7.2-alpine",
        "Redis image (no registry: aethercore/redis:bookworm from scripts/base-images.sh).",
    ),
    (
        "PROMETHEUS_IMAGE",
        "prom/prometheus:v2.53.0",
        "Prometheus image (no registry: aethercore/prometheus:bookworm from scripts/base-images.sh).",
    ),
    (
        "GRAFANA_IMAGE",
        "grafana/grafana:11.1.0",
        "Grafana image (Debian has no package: it needs a registry or a mirror).",
    ),
)


def config_show(
    fmt: str = typer.Option(
        "table", "--format", help="table (effective values), env (.env.example) or markdown (README's table)"
    ),
) -> None:
    """Every AETHERCORE_* setting: its effective value, or the documentation formats."""
    from config.settings import SETTINGS

    if fmt == "env":
        print("# Every AetherCore setting with its default. Copy to .env and edit; docker compose reads .env.")
        for spec in SETTINGS:
            print(f"# {spec.doc}\n{spec.env}={spec.default}")
        print("\n# docker compose only (docker-compose.yml); AETHERCORE_FLOWER_BASIC_AUTH is required there too.")
        for name, default, doc in COMPOSE_VARIABLES:
            print(f"# {doc}\n{name}={default}")
    elif fmt == "markdown":
        print("| variable | default | meaning |\n| --- | --- | --- |")
        for spec in SETTINGS:
            print(f"| `{spec.env}` | `{spec.default}` | {spec.doc} |")
    else:
        from cli.context import masked

        cfg = settings()
        table = Table("variable", "value", "default")
        for spec in SETTINGS:
            value = getattr(cfg, spec.name)
            table.add_row(spec.env, masked(spec.name, value), spec.default)  # secrets as ***
        console.print(table)
