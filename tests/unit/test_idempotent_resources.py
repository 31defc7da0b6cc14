"""`@idempotent(store_response=True)`, the strategy for what is not a job (files, batches), on a real app and the
session's real Redis: the first 2xx answer is stored and replayed, a different request under the key is 422, a
failure frees the key, concurrent duplicates run the view once, a multipart body is fingerprinted by its fields and
file contents (not its boundary), a claim that expired cannot free a later one's, and a new key (a resource's or a
job's) past the caller's AETHERCORE_IDEMPOTENCY_MAX_KEYS is 429 while a key it holds still answers."""

from __future__ import annotations

import io
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask import request

from api.idempotency import idempotent
from protocols.errors import ApiError
from tests.conftest import DB_SCRATCH, settings_for
from tests.support import ADMIN_KEY, USER_KEY


@pytest.fixture()
def app_and_calls(redis_server, scratch_redis):
    from api import create_app

    app = create_app(settings_for(redis_server.url(DB_SCRATCH)))
    calls: list[str] = []
    lock = threading.Lock()

    @idempotent(store_response=True)
    def create():
        with lock:
            calls.append(request.path)
        time.sleep(0.2)  # slow enough for duplicates to overlap
        if request.form.get("fail") or (request.is_json and request.get_json().get("fail")):
            raise ApiError(503, "service_unavailable", "try again")
        return {"id": f"thing-{len(calls)}", "object": "thing"}, 200

    app.add_url_rule("/things", "things", create, methods=["POST"])
    return app, calls


def _post(app, key: str, **kwargs):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Idempotency-Key": key}
    return app.test_client().post("/things", headers=headers, **kwargs)


def test_the_answer_is_stored_and_replayed(app_and_calls):
    app, calls = app_and_calls
    key = uuid.uuid4().hex
    first = _post(app, key, json={"a": 1})
    again = _post(app, key, json={"a": 1})
    assert first.status_code == again.status_code == 200 and first.get_json() == again.get_json()
    assert again.headers["Idempotency-Replayed"] == "true" and "Idempotency-Replayed" not in first.headers
    assert len(calls) == 1
    other = _post(app, key, json={"a": 2})
    assert other.status_code == 422 and other.get_json()["error"]["code"] == "idempotency_key_reused"


def test_a_failure_frees_the_key(app_and_calls):
    app, calls = app_and_calls
    key = uuid.uuid4().hex
    assert _post(app, key, json={"fail": True}).status_code == 503
    assert _post(app, key, json={"fail": True}).status_code == 503  # ran again: nothing was stored
    assert len(calls) == 2


def test_concurrent_duplicates_run_the_view_once(app_and_calls):
    app, calls = app_and_calls
    key = uuid.uuid4().hex
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _i: _post(app, key, json={"a": 1}), range(8)))
    assert all(a.status_code == 200 for a in answers) and len({a.get_json()["id"] for a in answers}) == 1
    assert len(calls) == 1


def test_multipart_is_fingerprinted_by_content_not_boundary(app_and_calls, monkeypatch):
    monkeypatch.setattr("api.security.MULTIPART_PATHS", ("/v1/files", "/things"))  # uploads go only where allowed
    app, calls = app_and_calls
    key = uuid.uuid4().hex

    def upload(content: bytes):
        return _post(app, key, data={"purpose": "batch", "file": (io.BytesIO(content), "x.jsonl")})

    first = upload(b'{"a": 1}\n')
    again = upload(b'{"a": 1}\n')  # another request, another boundary, the same content
    assert again.headers.get("Idempotency-Replayed") == "true" and again.get_json() == first.get_json()
    assert upload(b'{"a": 2}\n').status_code == 422
    assert len(calls) == 1


def test_a_claim_that_expired_cannot_free_a_later_ones(redis_server, scratch_redis, monkeypatch):
    """A request that outlives its claim (PENDING_S) and then fails frees only its own claim: a later request's
    claim under the same key stands, and a duplicate of it waits for its answer instead of running again."""
    from api import create_app

    monkeypatch.setattr("submission.idempotency.PENDING_S", 2)
    app = create_app(settings_for(redis_server.url(DB_SCRATCH)))
    calls: list[int] = []

    @idempotent(store_response=True)
    def create():
        calls.append(len(calls))
        number = len(calls)
        if number == 1:
            time.sleep(2.5)  # past its claim
            raise ApiError(503, "service_unavailable", "try again")
        time.sleep(1.2)
        return {"id": f"thing-{number}", "object": "thing"}, 200

    app.add_url_rule("/things", "things", create, methods=["POST"])
    key = uuid.uuid4().hex
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(_post, app, key, json={"a": 1})
        time.sleep(2.1)  # the first's claim expired: the second claims the key
        second = pool.submit(_post, app, key, json={"a": 1})
        time.sleep(0.7)  # the first has failed meanwhile; the second is still running
        third = pool.submit(_post, app, key, json={"a": 1})
        answers = [first.result(), second.result(), third.result()]
    assert [a.status_code for a in answers] == [503, 200, 200]
    assert answers[2].get_json() == answers[1].get_json() and answers[2].headers["Idempotency-Replayed"] == "true"
    assert len(calls) == 2


def test_a_new_key_past_the_callers_most_is_429_and_a_replay_is_not(redis_server, scratch_redis):
    from api import create_app
    from tasks.holdings import IDEMPOTENCY, Holdings

    app = create_app(settings_for(redis_server.url(DB_SCRATCH), idempotency_max_keys=2))

    @idempotent(store_response=True)
    def create():
        return {"id": uuid.uuid4().hex, "object": "thing"}, 200

    app.add_url_rule("/things", "things", create, methods=["POST"])
    first, second, third = (uuid.uuid4().hex for _ in range(3))
    answers = [_post(app, key, json={"a": 1}) for key in (first, second, third)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].get_json()["error"]["code"] == "quota_exceeded"
    assert "AETHERCORE_IDEMPOTENCY_MAX_KEYS" in answers[2].get_json()["error"]["message"]
    again = _post(app, first, json={"a": 1})  # a key the caller holds always answers
    assert again.status_code == 200 and again.get_json() == answers[0].get_json()
    owners = Holdings(scratch_redis, {}).owners()
    assert [Holdings(scratch_redis, {}).usage(o)[IDEMPOTENCY].count for o in owners] == [2]


def test_a_jobs_new_key_past_the_callers_most_is_429_too(redis_server, scratch_redis):
    from api import create_app

    app = create_app(settings_for(redis_server.url(DB_SCRATCH), idempotency_max_keys=1))
    body, first = {"model_id": "minilm", "inputs": {"text": "x"}}, uuid.uuid4().hex

    def serve(key: str):
        headers = {"Authorization": f"Bearer {USER_KEY}", "Idempotency-Key": key}
        return app.test_client().post("/serve", json=body, headers=headers)

    created, refused, again = serve(first), serve(uuid.uuid4().hex), serve(first)
    assert created.status_code == 202 and refused.status_code == 429, refused.get_json()
    assert refused.get_json()["error"]["code"] == "quota_exceeded"
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.get_json()["job_id"] == created.get_json()["job_id"]
