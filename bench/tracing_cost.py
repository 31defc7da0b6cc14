"""What a trace costs per request, per task and per Redis command: our own spans against the OpenTelemetry contrib
instrumentations (Flask, Celery, redis), side by side in one run.

    python -m bench.tracing_cost [--requests 4000] [--rounds 2]

Each mode runs in a fresh process (an instrumentation patches its library for the whole process) on the real app
(`api.create_app`, the Flask test client, a Redis on loopback) and exports over OTLP/HTTP to a receiver in this
process, as it would to a collector; the process's own CPU time (its exporter thread included) is divided by what it
served. Modes run interleaved, `--rounds` times each; the table gives the median and the range.

* GET /v1/models: the HTTP request's span alone (the probes and /metrics are never traced). `off`; `ours`
  (api/tracing.py, a WSGI wrapper and an after_request hook); `contrib-flask` (opentelemetry-instrumentation-flask:
  its WSGI middleware and request hooks).
* POST /serve (202, queued; no worker needed): a job's whole API side, off, and with our spans (request, admission,
  the context in the record and the message) sampled at 1.0 and at 0.01.
* a Celery task run (`task.apply`), off and with opentelemetry-instrumentation-celery (a span per task run).
* a Redis command (PING), off and with opentelemetry-instrumentation-redis (a span per command).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.otlp_receiver import OtlpReceiver

HTTP_MODES = ("off", "ours", "contrib-flask")
SERVE_MODES = ("off", "ours-1.0", "ours-0.01")
CELERY_MODES = ("off", "contrib-celery")
REDIS_MODES = ("off", "contrib-redis")


def _env(endpoint: str | None, ratio: float | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        if ratio is not None:
            env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
            env["OTEL_TRACES_SAMPLER_ARG"] = str(ratio)
    return env


def _child(kind: str, mode: str, count: int, redis_url: str, endpoint: str) -> float:
    """Microseconds of this process's CPU per operation."""
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(redis_url)
        if mode == "contrib-redis":
            from opentelemetry.instrumentation.redis import RedisInstrumentor

            from tracing.setup import configure

            assert configure("bench")
            RedisInstrumentor().instrument()
        client.ping()
        return _timed(count, client.ping)
    if kind == "celery":
        from celery import Celery

        app = Celery("bench", broker="memory://", backend="cache+memory://")
        app.conf.task_ignore_result = True

        @app.task(name="bench.noop")
        def noop(x: int) -> int:
            return x

        if mode == "contrib-celery":
            from opentelemetry.instrumentation.celery import CeleryInstrumentor

            from tracing.setup import configure

            assert configure("bench")
            CeleryInstrumentor().instrument()
        noop.apply(args=(1,))
        return _timed(count, lambda: noop.apply(args=(1,)))
    from api import create_app
    from config.settings import Settings

    settings = Settings.from_env().with_overrides(
        redis_url=redis_url, auth=False, rate_limit="", max_queue_depth=10**6, broker_url=""
    )
    app = create_app(settings)
    if mode == "contrib-flask":
        from opentelemetry.instrumentation.flask import FlaskInstrumentor

        from tracing.setup import configure

        assert configure("api", {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
        FlaskInstrumentor().instrument_app(app)
    client = app.test_client()
    if kind == "http":
        call = lambda: client.get("/v1/models")  # noqa: E731
    else:
        body = {"model_id": "minilm", "inputs": {"text": "what does a trace cost"}}
        call = lambda: client.post("/serve", json=body)  # noqa: E731
    response = call()
    assert response.status_code in (200, 202), response.get_data(as_text=True)
    return _timed(count, call)


def _timed(count: int, call: Any) -> float:
    for _ in range(min(200, count // 10)):  # warm
        call()
    began = time.process_time()
    for _ in range(count):
        call()
    from tracing.setup import flush

    flush()  # the exporter's work for these spans is counted too
    return (time.process_time() - began) / count * 1e6


def _run(kind: str, mode: str, count: int, redis_url: str, endpoint: str) -> float:
    ratio = {"ours-1.0": 1.0, "ours-0.01": 0.01}.get(mode)
    # contrib-flask turns tracing on itself, after the app is built without ours
    traced = mode not in ("off", "contrib-flask")
    env = _env(endpoint if traced else None, ratio)
    env.setdefault("AETHERCORE_LOG_LEVEL", "WARNING")
    out = subprocess.run(
        [sys.executable, "-m", "bench.tracing_cost", "--child", kind, mode, str(count), redis_url, endpoint],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind}/{mode} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, mode, count, redis_url, endpoint = args.child
        print(_child(kind, mode, int(count), redis_url, endpoint))
        return
    import redis

    redis.Redis.from_url(args.redis_url).flushdb()
    receiver = OtlpReceiver(keep=False).start()
    plan = [
        ("http", HTTP_MODES, args.requests),
        ("serve", SERVE_MODES, args.requests // 2),
        ("celery", CELERY_MODES, args.requests),
        ("redis", REDIS_MODES, args.requests * 2),
    ]
    results: dict[tuple[str, str], list[float]] = {}
    for _round in range(args.rounds):
        for kind, modes, count in plan:
            for mode in modes:
                results.setdefault((kind, mode), []).append(_run(kind, mode, count, args.redis_url, receiver.endpoint))
                redis.Redis.from_url(args.redis_url).flushdb()
    receiver.stop()
    print(f"| what | mode | CPU µs per operation (median of {args.rounds}; range) | vs off |")
    print("| --- | --- | ---: | ---: |")
    for kind, modes, _count in plan:
        base = statistics.median(results[(kind, "off")])
        for mode in modes:
            values = results[(kind, mode)]
            median = statistics.median(values)
            print(
                f"| {kind} | {mode} | {median:.1f} ({min(values):.1f}-{max(values):.1f}) | "
                f"{'' if mode == 'off' else f'+{median - base:.1f} ({(median / base - 1) * 100:+.0f} %)'} |"
            )
    print(f"spans received: {receiver.count}")
    print(json.dumps({f"{k}/{m}": v for (k, m), v in results.items()}))


if __name__ == "__main__":
    main()
