"""`@idempotent(store_response=True)`, the strategy for what is not a job (files, batches), on a real app and the
session's real Redis: the first 2xx answer is stored and replayed, a different request under the key is 422, a
failure frees the key, concurrent duplicates run the view once, and a multipart body is fingerprinted by its
fields and file contents (not its boundary)."""

from __future__ import annotations

import io
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask import request

from api.errors import ApiError
from api.idempotency import idempotent
from tests.conftest import DB_SCRATCH, settings_for
from tests.support import ADMIN_KEY


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
