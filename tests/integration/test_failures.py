"""Autoload off, Redis or the broker unreachable: clear answers, never a hang or an HTML page."""

import time

import orjson

from tasks.errors import http_status
from tasks.names import RECENT_JOBS, job_key
from tests.conftest import DB_SCRATCH, client_for, settings_for
from tests.support import free_port


def test_autoload_off_answers_409_until_the_model_is_loaded(main_redis_url, main_worker, client):
    client.post("/models/minilm-onnx/unload?wait=60")
    strict = client_for(settings_for(main_redis_url, autoload=False))
    response = strict.post("/serve", json={"model_id": "minilm-onnx", "inputs": {"text": "x"}})
    assert response.status_code == 409
    error = response.get_json()["error"]
    assert error["code"] == "model_not_loaded" and "/models/minilm-onnx/load" in error["message"]
    assert strict.post("/models/minilm-onnx/load?wait=60").get_json()["status"] == "succeeded"
    response = strict.post("/serve?wait=60", json={"model_id": "minilm-onnx", "inputs": {"text": "x"}})
    assert response.status_code == 200 and response.get_json()["status"] == "succeeded"


def test_unreachable_redis_is_a_quick_503():
    dead = client_for(settings_for(f"redis://127.0.0.1:{free_port()}/0"))
    for method, path, body in [
        ("post", "/serve", {"model_id": "minilm", "inputs": {"text": "x"}}),
        ("post", "/models/minilm/load", None),
        ("get", "/models/minilm/status", None),
        ("get", f"/jobs/{'a' * 32}", None),
        ("get", "/models", None),
    ]:
        started = time.monotonic()
        response = getattr(dead, method)(path, json=body)
        elapsed = time.monotonic() - started
        assert response.status_code == 503, (path, response.get_json())
        assert response.get_json()["error"]["code"] in {"redis_unavailable", "broker_unavailable"}
        assert response.headers.get("Retry-After")
        assert elapsed < 5, f"{path} took {elapsed:.1f} s"
    health = dead.get("/health")
    assert health.status_code == 503
    body = health.get_json()
    assert body["status"] == "degraded" and body["checks"]["redis"]["status"] == "fail"
    assert dead.get("/heartbeat").status_code == 200
    assert dead.get("/metrics").status_code == 200


def test_a_job_whose_message_cannot_be_queued_ends_with_the_503_it_answered(redis_server, scratch_redis):
    """The broker of its own is down: the request answers 503 `broker_unavailable`, and the job it created ends with
    that code, which the contract answers 503 too wherever the job is read (it answered 500: issue 35)."""
    broker_down = settings_for(redis_server.url(DB_SCRATCH), broker_url=f"redis://127.0.0.1:{free_port()}/0")
    response = client_for(broker_down).post("/serve", json={"model_id": "minilm", "inputs": {"text": "x"}})
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "broker_unavailable"
    [job_id] = scratch_redis.zrange(RECENT_JOBS, 0, -1)
    job = scratch_redis.hgetall(job_key(job_id))
    assert job["status"] == "failed"
    code = orjson.loads(job["error"])["code"]
    assert code == "broker_unavailable" and http_status(code) == 503
