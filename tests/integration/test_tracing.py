"""OpenTelemetry traces against real processes (issue 37): a redis-server, a worker with its model processes, the API
(gunicorn, auth on), its batch driver, the webhook dispatcher, a webhook receiver and a real OTLP/HTTP receiver
(bench/otlp_receiver.py, decoding with opentelemetry-proto) that every process exports to.

One /serve job, one streamed generation, one /v1/embeddings call with the client's traceparent, one Batch API line and
one webhook delivery each form one connected trace with the expected spans, parents and links, across the API, the
worker and its model process; no span carries an API key, a JWT or a webhook signing secret; the job histograms carry
trace ids as OpenMetrics exemplars; the trace id is in the job's JSON, the response headers and the job's log lines."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from typing import Any

import jwt
import pytest
import redis
import requests

from bench.otlp_receiver import OtlpReceiver
from tests.support import (
    ADMIN_KEY,
    JWT_SECRET,
    USER_KEY,
    ApiProcess,
    ManagedProcess,
    RedisServer,
    WorkerProcess,
    base_env,
    wait_until,
)
from tests.webhook_receiver import Receiver
from webhooks.owners import WebhookOwners

pytestmark = pytest.mark.slow

USER = {"Authorization": f"Bearer {USER_KEY}"}
OWNER = f"env:{hashlib.sha256(USER_KEY.encode()).hexdigest()[:12]}"
SERVER, CLIENT = 2, 3  # opentelemetry-proto's SpanKind values
STATUS_ERROR = 2


@pytest.fixture(scope="module")
def env():
    collector = OtlpReceiver().start()
    server = RedisServer().start()
    url = server.url(0)
    tracing = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within a tenth of a second, so the tests read spans soon
        "AETHERCORE_WEBHOOK_ALLOW": "127.0.0.1",
    }
    worker = WorkerProcess(url, name="trace-worker", **tracing).start()
    api = ApiProcess(url, name="trace-api", batches=True, AETHERCORE_AUTH="true", **tracing).start()
    r = redis.Redis.from_url(url, decode_responses=True)
    secret = WebhookOwners(r).secret(OWNER, create=True)["current"]
    dispatcher = ManagedProcess("trace-dispatcher", base_env(url, **tracing)).spawn("dispatcher")
    wait_until(lambda: r.zcard("aethercore:webhook:dispatchers") > 0 or dispatcher.died(), 30, 0.1, "the dispatcher")
    receiver = Receiver().start()
    yield {
        "api": api,
        "worker": worker,
        "dispatcher": dispatcher,
        "collector": collector,
        "receiver": receiver,
        "secret": secret,
        "redis": r,
    }
    receiver.stop()
    dispatcher.stop()
    api.stop()
    worker.stop()
    collector.stop()
    server.cleanup()


def spans_of(env, trace_id: str, *names: str, timeout: float = 30) -> list[dict[str, Any]]:
    """The trace's spans once every one of `names` has arrived."""

    def arrived():
        found = env["collector"].trace(trace_id)
        have = {span["name"] for span in found}
        return found if all(name in have for name in names) else None

    try:
        return wait_until(arrived, timeout, 0.1, f"spans {names} of trace {trace_id}")
    except Exception:
        got = sorted(span["name"] for span in env["collector"].trace(trace_id))
        raise AssertionError(f"trace {trace_id} has {got}, wanted {names}") from None


def one(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    named = [span for span in spans if span["name"] == name]
    assert len(named) == 1, f"{len(named)} spans named {name}: {[s['name'] for s in spans]}"
    return named[0]


def connected(spans: list[dict[str, Any]]) -> None:
    """Every span of the trace hangs on one root: no span names a parent the trace lacks (but the root's)."""
    ids = {span["span_id"] for span in spans}
    roots = [span for span in spans if span["parent_span_id"] not in ids]
    assert len(roots) == 1, f"more than one root: {[(s['name'], s['parent_span_id']) for s in roots]}"


def serve(env, body: dict, wait: float = 60, headers: dict | None = None) -> requests.Response:
    response = requests.post(
        f"{env['api'].base}/serve", params={"wait": wait}, json=body, headers={**USER, **(headers or {})}, timeout=90
    )
    assert response.status_code in (200, 202), response.text
    return response


def test_a_serve_job_is_one_trace_from_the_request_to_the_forward_pass(env):
    response = serve(env, {"model_id": "minilm", "inputs": {"text": "where did my time go"}})
    job = response.json()
    assert job["status"] == "succeeded"
    trace_id = job["trace_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    assert response.headers["traceresponse"].split("-")[1] == trace_id  # the trace id in the response headers

    spans = spans_of(
        env, trace_id, "POST /serve", "aethercore.admission", "aethercore.queue", "aethercore.batch",
        "aethercore.forward", "aethercore.job.end",
    )  # fmt: skip
    connected(spans)
    http, admission = one(spans, "POST /serve"), one(spans, "aethercore.admission")
    queue, batch, forward = (
        one(spans, "aethercore.queue"),
        one(spans, "aethercore.batch"),
        one(spans, "aethercore.forward"),
    )
    end = one(spans, "aethercore.job.end")
    assert http["parent_span_id"] == "" and http["kind"] == SERVER  # no traceparent sent: the trace starts here
    assert http["attributes"]["http.route"] == "/serve" and http["attributes"]["http.response.status_code"] == 200
    assert http["attributes"]["aethercore.caller.role"] == "user"
    assert admission["parent_span_id"] == http["span_id"]
    assert admission["attributes"]["aethercore.job.id"] == job["job_id"]
    assert (
        admission["attributes"]["aethercore.lane"] == "normal" and "aethercore.queue.depth" in admission["attributes"]
    )
    for below in (queue, batch, end):  # everything the job does is under its admission
        assert below["parent_span_id"] == admission["span_id"], below["name"]
    assert queue["attributes"]["aethercore.lane"] == "normal" and queue["attributes"]["aethercore.queue"] == "cpu"
    assert batch["attributes"]["aethercore.batch.size"] >= 1 and batch["attributes"]["aethercore.batch.wait_ms"] >= 0
    assert end["attributes"]["aethercore.job.status"] == "succeeded"
    # The forward pass: in the first traced job's trace, linked to every job of the pass, and each linked back.
    assert forward["parent_span_id"] == batch["span_id"]
    assert {"trace_id": trace_id, "span_id": batch["span_id"]} in [
        {"trace_id": link["trace_id"], "span_id": link["span_id"]} for link in forward["links"]
    ]
    assert [(link["trace_id"], link["span_id"]) for link in batch["links"]] == [(trace_id, forward["span_id"])]
    # Across three processes: the API's, the worker's, and the model process that timed the pass.
    assert http["resource"]["service.name"] == "aethercore-api" and http["resource"]["aethercore.process"] == "api"
    assert batch["resource"]["service.name"] == "aethercore-worker"
    worker_pid = batch["resource"]["process.pid"]
    model_pid = forward["attributes"]["aethercore.model_process.pid"]
    assert model_pid not in (worker_pid, http["resource"]["process.pid"])
    assert batch["start_ns"] <= forward["start_ns"] <= forward["end_ns"] <= batch["end_ns"] + 1_000_000
    # The trace id in the job's log lines (the worker's line for its end).
    wait_until(lambda: trace_id in env["worker"].log(), 10, 0.1, "the job's log line with its trace id")


def test_a_streamed_generation_has_its_time_to_first_token_and_an_event_per_chunk(env):
    response = serve(
        env,
        {"model_id": "tiny-gpt2", "inputs": {"text": "Tell me a story"}, "parameters": {"max_length": 24}},
        wait=60,
    )
    job = response.json()
    assert job["status"] == "succeeded" and job["chunks"] >= 2
    spans = spans_of(env, job["trace_id"], "aethercore.admission", "aethercore.generate", "aethercore.job.end")
    connected(spans)
    generate, admission = one(spans, "aethercore.generate"), one(spans, "aethercore.admission")
    assert generate["parent_span_id"] == admission["span_id"]
    events = [event["name"] for event in generate["events"]]
    assert events[0] == "first_token" and events.count("first_token") == 1
    assert events.count("chunk") == job["chunks"] - 1  # one event per chunk, not a span per token
    assert generate["attributes"]["aethercore.ttft_ms"] > 0
    assert generate["attributes"]["aethercore.stream.chunks"] == job["chunks"]
    assert not [span for span in spans if span["name"] == "aethercore.forward"]  # no span per decoding step


def test_v1_embeddings_continues_the_callers_trace_and_passes_its_tracestate_on(env):
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    headers = {**USER, "traceparent": f"00-{trace_id}-{parent}-01", "tracestate": "vendor=abc,other=1"}
    response = requests.post(
        f"{env['api'].base}/v1/embeddings",
        json={"model": "minilm", "input": ["a client's own trace"]},
        headers=headers,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["traceresponse"].split("-")[1] == trace_id
    spans = spans_of(env, trace_id, "POST /v1/embeddings", "aethercore.admission", "aethercore.forward")
    http = one(spans, "POST /v1/embeddings")
    assert http["parent_span_id"] == parent  # the caller's span is the request's parent
    connected(spans)  # the caller's span is the one root outside it
    assert one(spans, "aethercore.admission")["parent_span_id"] == http["span_id"]


def test_an_unsampled_callers_trace_is_passed_on_and_not_recorded(env):
    trace_id = secrets.token_hex(16)
    response = serve(
        env,
        {"model_id": "minilm", "inputs": {"text": "not sampled"}},
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-00"},
    )
    assert response.json()["trace_id"] == trace_id  # its context travels with the job
    serve(env, {"model_id": "minilm", "inputs": {"text": "a later, sampled job"}})
    time.sleep(0.5)  # both exported by now, had they been recorded
    assert env["collector"].trace(trace_id) == []


def test_a_batch_line_is_a_child_of_its_batch(env):
    import openai

    oai = openai.OpenAI(base_url=f"{env['api'].base}/v1", api_key=USER_KEY, max_retries=0, timeout=60)
    line = {"custom_id": "one", "method": "POST", "url": "/v1/embeddings", "body": {"model": "minilm", "input": "x"}}
    source = oai.files.create(file=("lines.jsonl", (json.dumps(line) + "\n").encode()), purpose="batch")
    created = oai.batches.with_raw_response.create(
        input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    trace_id = created.headers["traceresponse"].split("-")[1]
    batch = created.parse()
    wait_until(lambda: oai.batches.retrieve(batch.id).status == "completed", 120, 0.25, f"batch {batch.id}")
    spans = spans_of(env, trace_id, "POST /v1/batches", "aethercore.admission", "aethercore.forward")
    connected(spans)
    http, admission = one(spans, "POST /v1/batches"), one(spans, "aethercore.admission")
    assert admission["parent_span_id"] == http["span_id"]  # the line's job, submitted by the driver, in its trace
    assert admission["resource"]["aethercore.process"] == "batches"
    assert admission["attributes"]["aethercore.lane"] == "low"


def test_each_webhook_attempt_is_a_span_and_carries_the_trace_to_the_receiver(env):
    receiver = env["receiver"]
    receiver.script = [500]  # the first attempt fails, the retry is delivered
    job = serve(env, {"model_id": "minilm", "inputs": {"text": "call me back"}, "webhook": {"url": receiver.url}})
    job = job.json()
    got = wait_until(
        lambda: (hits := receiver.for_job(job["job_id"])) and any(h["status"] == 200 for h in hits) and hits,
        60,
        0.05,
        "the delivery",
    )

    def both_attempts():
        found = env["collector"].trace(job["trace_id"])
        tried = [span for span in found if span["name"] == "aethercore.webhook.attempt"]
        return (found, tried) if len(tried) == 2 else None

    spans, attempts = wait_until(both_attempts, 30, 0.1, "both attempts' spans")
    connected(spans)  # the request, the job and both deliveries: one trace
    attempts.sort(key=lambda span: span["attributes"]["aethercore.webhook.retry"])
    admission = one(spans, "aethercore.admission")
    assert [span["attributes"]["aethercore.webhook.retry"] for span in attempts] == [0, 1]
    assert [span["attributes"]["http.response.status_code"] for span in attempts] == [500, 200]
    assert attempts[0]["status"] == STATUS_ERROR and attempts[1]["status"] != STATUS_ERROR
    assert all(span["parent_span_id"] == admission["span_id"] and span["kind"] == CLIENT for span in attempts)
    # each request carried its own attempt's span as the receiver's parent
    sent = [hit["headers"]["traceparent"].split("-") for hit in got]
    assert [(trace, parent) for _v, trace, parent, _flags in sent] == [
        (job["trace_id"], s["span_id"]) for s in attempts
    ]
    assert all(int(flags, 16) & 1 for *_ids, flags in sent)  # sampled (the SDK also sets W3C's random-id flag)
    assert f"trace_id={job['trace_id']}" in env["dispatcher"].log()  # the delivery's log lines name the trace


def test_no_span_carries_a_key_a_token_or_a_signing_secret(env):
    token = jwt.encode({"sub": "tracer", "role": "user", "exp": int(time.time()) + 600}, JWT_SECRET, "HS256")
    response = requests.post(
        f"{env['api'].base}/serve",
        params={"wait": 60},
        json={
            "model_id": "minilm",
            "inputs": {"text": "a token"},
            "webhook": {"url": env["receiver"].url + "?token=s3cr3t-query"},
        },
        headers={"Authorization": f"Bearer {token}"},
        timeout=90,
    )
    assert response.status_code in (200, 202, 409), response.text  # 409: the JWT's owner has no signing secret
    serve(env, {"model_id": "minilm", "inputs": {"text": "an admin"}}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    time.sleep(1.0)
    everything = json.dumps(env["collector"].all())
    for secret in (USER_KEY, ADMIN_KEY, token, JWT_SECRET, env["secret"], "s3cr3t-query"):
        assert secret not in everything
    assert "Bearer" not in everything


def test_the_job_histograms_carry_trace_ids_as_exemplars(env):
    job = serve(env, {"model_id": "minilm", "inputs": {"text": "an exemplar"}}).json()
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Accept": "application/openmetrics-text; version=1.0.0"}

    def exemplar():
        response = requests.get(f"{env['api'].base}/metrics", headers=headers, timeout=10)
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        lines = [line for line in response.text.splitlines() if line.startswith("aethercore_inference_seconds_bucket")]
        return [line for line in lines if '# {trace_id="' in line] or None

    def traced():
        found = {re.search(r'trace_id="([0-9a-f]{32})"', line).group(1) for line in exemplar() or []}
        return found if job["trace_id"] in found else None

    # the latest job in its bucket: its trace is that bucket's exemplar once the worker's heartbeat flushed it
    wait_until(traced, 15, 0.2, "the job's trace id as an exemplar on aethercore_inference_seconds")
    plain = requests.get(f"{env['api'].base}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert "trace_id" not in plain.text  # the Prometheus text format has no exemplars


def test_probes_and_scrapes_are_not_traced(env):
    trace_id = secrets.token_hex(16)
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    for path in ("/health", "/health/live", "/health/ready", "/heartbeat", "/metrics"):
        response = requests.get(f"{env['api'].base}{path}", headers=headers, timeout=10)
        assert response.status_code in (200, 503) and "traceresponse" not in response.headers
    job = serve(env, {"model_id": "minilm", "inputs": {"text": "after the probes"}}).json()
    spans_of(env, job["trace_id"], "aethercore.job.end")  # exported since, so the probes' would be too
    time.sleep(0.3)
    assert env["collector"].trace(trace_id) == []
