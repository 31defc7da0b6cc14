"""Issue 35: one way in. Every route that creates a job, read from the app's own URL map (a new route that creates
something fails here until it is listed), creates its job through the app's one `Submitter.submit`: a real app on
the session's real Redis, no worker on its database (the protocols that answer at the end get their 504 after a
short AETHERCORE_MAX_WAIT, their job created all the same), the submitter spied on, and every job record that
appears in Redis matched to a job that `submit` returned. A batch line (the real batch driver, in-process) and a
dead letter's replay too."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from config.settings import Settings
from tasks.deadletters import EXPIRED_IN_QUEUE
from tasks.errors import DEADLINE_EXCEEDED
from tasks.jobs.lifecycle import JobEnd
from tasks.states import EXPIRED
from tests.conftest import DB_SCRATCH
from tests.support import ADMIN_KEY, base_env

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TEXT = {"model_id": "minilm", "inputs": {"text": "one way in"}}
OIP_BODY = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["one way in"]}]}

# Every POST (and WebSocket) route, by whether it creates a job. A new route must be put in one of the two.
CREATES_A_JOB = {
    "/serve",
    "/serve/batch",
    "/serve/stream",
    "/models/<string:model_id>/load",
    "/models/<string:model_id>/unload",
    "/v2/models/<string:model_name>/infer",
    "/v2/models/<string:model_name>/versions/<string:model_version>/infer",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/chat/completions",
    "/dead-letters/<string:job_id>/replay",
}
CREATES_NO_JOB = {
    "/v1/files",  # an uploaded file
    "/v1/batches",  # a batch: its lines are submitted by the batch driver (test_a_batch_line_...)
    "/v1/batches/<string:batch_id>/cancel",
    "/webhooks/failed/<string:delivery_id>/retry",  # a delivery sent again; no job runs again
}
_JOB_KEY = re.compile(r"^aethercore:job:([0-9a-f]{32})$")


@pytest.fixture()
def app(redis_server, scratch_redis) -> Iterator[Any]:
    from api import create_app

    env = base_env(redis_server.url(DB_SCRATCH), AETHERCORE_AUTH="true", AETHERCORE_MAX_WAIT="0.3")
    yield create_app(Settings.from_env(env))


@pytest.fixture()
def submitted(app) -> list[str]:
    """The ids of the jobs the app's one Submitter returned, in order."""
    submitter = app.extensions["aethercore"].submitter
    original = submitter.submit
    returned: list[str] = []

    def spy(request: Any) -> dict[str, Any]:
        job = original(request)
        returned.append(job["job_id"])
        return job

    submitter.submit = spy
    return returned


def _jobs(app) -> set[str]:
    client = app.extensions["aethercore"].jobs.redis
    return {m.group(1) for key in client.scan_iter("aethercore:job:*", count=1000) if (m := _JOB_KEY.match(key))}


def _creates_through_submit(app, submitted: list[str], call: Any) -> Any:
    before, calls = _jobs(app), len(submitted)
    answer = call()
    new = _jobs(app) - before
    assert len(submitted) == calls + 1, "the way in did not call Submitter.submit exactly once"
    assert new == {submitted[-1]}, f"jobs created: {new}; by Submitter.submit: {submitted[calls:]}"
    return answer


def test_the_routes_that_create_jobs_are_the_known_ones(app):
    posting = {
        rule.rule
        for rule in app.url_map.iter_rules()
        if "POST" in (rule.methods or ()) or getattr(rule, "websocket", False)
    }
    assert posting == CREATES_A_JOB | CREATES_NO_JOB, (
        f"unclassified: {sorted(posting - CREATES_A_JOB - CREATES_NO_JOB)}; "
        f"gone: {sorted((CREATES_A_JOB | CREATES_NO_JOB) - posting)}"
    )
    paths = set(orjson.loads(app.test_client().get("/openapi.json").data)["paths"])
    documented = {re.sub(r"<string:(\w+)>", r"{\1}", route) for route in CREATES_A_JOB - {"/serve/stream"}}
    assert documented <= paths


def test_every_route_that_creates_a_job_creates_it_through_the_submitter(app, submitted, monkeypatch):
    client = app.test_client()
    calls = {
        "/serve": lambda: client.post("/serve", json=TEXT, headers=ADMIN),
        "/serve?wait": lambda: client.post("/serve?wait=0.1", json=TEXT, headers=ADMIN),
        "/serve/batch": lambda: client.post(
            "/serve/batch", json={**TEXT, "inputs": [TEXT["inputs"]] * 2}, headers=ADMIN
        ),
        "load": lambda: client.post("/models/minilm/load", headers=ADMIN),
        "unload": lambda: client.post("/models/minilm/unload", headers=ADMIN),
        "oip": lambda: client.post("/v2/models/minilm/infer", json=OIP_BODY, headers=ADMIN),
        "oip version": lambda: client.post("/v2/models/minilm/versions/1/infer", json=OIP_BODY, headers=ADMIN),
        "embeddings": lambda: client.post("/v1/embeddings", json={"model": "minilm", "input": "x"}, headers=ADMIN),
        "completions": lambda: client.post(
            "/v1/completions", json={"model": "tiny-gpt2", "prompt": "x", "max_tokens": 2}, headers=ADMIN
        ),
        "chat": lambda: client.post(
            "/v1/chat/completions",
            json={"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
            headers=ADMIN,
        ),
    }
    # no worker: what answers at the job's end (OIP, /v1) answers 504 after AETHERCORE_MAX_WAIT, the rest 202
    at_end = {"oip", "oip version", "embeddings", "completions", "chat"}
    for name, call in calls.items():
        answer = _creates_through_submit(app, submitted, call)
        assert answer.status_code == (504 if name in at_end else 202), (name, answer.get_json())

    streams = {  # /v1 streams, both endpoints
        "/v1/completions": {"model": "tiny-gpt2", "prompt": "x", "stream": True},
        "/v1/chat/completions": {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "x"}], "stream": True},
    }
    for path, body in streams.items():
        answer = _creates_through_submit(
            app, submitted, lambda p=path, b=body: client.post(p, json=b, headers=ADMIN, buffered=False)
        )
        assert answer.status_code == 200
        answer.close()

    from api.auth import ANONYMOUS_ADMIN
    from api.blueprints import serve

    relayed: list[Any] = []
    monkeypatch.setattr(serve, "relay_to_socket", lambda ws, relay: relayed.append(relay))

    class Socket:  # the WebSocket's one request message; what the relay would send is recorded instead
        def receive(self, timeout: float) -> str:
            return orjson.dumps(TEXT).decode()

        def send(self, frame: str) -> None:
            raise AssertionError(frame)

    def stream() -> None:
        with app.test_request_context("/serve/stream"):
            from flask import g

            g.principal = ANONYMOUS_ADMIN
            serve.serve_stream(Socket())

    _creates_through_submit(app, submitted, stream)
    assert len(relayed) == 1


def test_a_dead_letters_replay_is_submitted_through_the_submitter(app, submitted):
    client = app.test_client()
    created = client.post("/serve", json={**TEXT, "timeout": 0.001}, headers=ADMIN).get_json()
    jobs = app.extensions["aethercore"].jobs
    payload = jobs.redis.hget(f"aethercore:job:{created['job_id']}", "payload")
    assert jobs.lifecycle.mark_running(created["job_id"], "a-worker", payload) == 1
    ending = JobEnd(created["job_id"], EXPIRED, DEADLINE_EXCEEDED, "waited", dead=EXPIRED_IN_QUEUE)
    assert jobs.lifecycle.end_jobs([ending]) == [True]
    answer = _creates_through_submit(
        app, submitted, lambda: client.post(f"/dead-letters/{created['job_id']}/replay", headers=ADMIN)
    )
    assert answer.status_code == 202 and answer.get_json()["job"]["replay_of"] == created["job_id"]


def test_a_batch_line_is_submitted_through_the_submitter(app, submitted):
    from batches.driver import BatchDriver
    from batches.services import DriverServices

    client = app.test_client()
    line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "minilm", "input": "x"}}
    upload = client.post(
        "/v1/files",
        data={"purpose": "batch", "file": (io.BytesIO(orjson.dumps(line) + b"\n"), "in.jsonl")},
        content_type="multipart/form-data",
        headers=ADMIN,
    )
    assert upload.status_code == 200, upload.get_json()
    batch = client.post(
        "/v1/batches",
        json={"input_file_id": upload.get_json()["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"},
        headers=ADMIN,
    )
    assert batch.status_code == 200, batch.get_json()
    svc, stores = app.extensions["aethercore"], app.extensions["aethercore_batches"]
    services = DriverServices(
        svc.settings, svc.jobs, svc.submitter, stores["batches"], stores["files"], app.extensions["aethercore_auth"]
    )
    driver = BatchDriver(services, services.batches, services.files)
    before = _jobs(app)
    deadline = time.monotonic() + 30
    while not submitted and time.monotonic() < deadline:
        driver.tick()
        time.sleep(0.05)
    driver._pool.shutdown(wait=True)
    assert len(submitted) == 1, "the batch's line was not submitted through Submitter.submit"
    assert _jobs(app) - before == {submitted[0]}
    job = app.extensions["aethercore"].jobs.records.get(submitted[0])
    assert job is not None and job["kind"] == "inference"
